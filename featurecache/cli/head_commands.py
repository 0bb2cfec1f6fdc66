"""Commands on heads: ``fit-head``, ``score``, ``compare``, ``predict``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import options
from .app import _friendly, cli


@cli.command("fit-head", epilog="""\b
Examples:
  featurecache fit-head logreg feats.h5 --layer avgpool -o heads/avgpool-logreg.joblib
  featurecache fit-head svm feats.h5 --layer blocks.10 --kernel rbf -o heads/b10-svm.joblib
  featurecache fit-head knn feats.h5 --layer avgpool -o heads/avgpool-knn.joblib
  featurecache fit-head mlp feats.h5 --layer avgpool -o heads/avgpool-mlp.joblib
  featurecache fit-head logreg feats.h5 --layer blocks.5+avgpool -o heads/concat.skops
joblib files are pickles: load only heads you trust; .skops heads are safe to share.""")
@click.argument("kind", type=click.Choice(options.HEAD_KINDS))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("--layer", required=True, help="Stored layer, or several joined with + (concatenated).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Head file: .joblib (a pickle) or .skops (safe to share and load).")
@options.click_options(options.SIGNATURES["fit_head"].options, skip=("kind",))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def fit_head_cmd(kind, features, layer, output, quiet, **kwargs):
    """Search hyperparameters by stratified CV, refit on the train split, save the head.

    logreg and svm walk C = 1e-6..1e6 a decade apart (each fold stops two decades past its
    best), then quarter-decades around the best; knn (cosine, temperature-weighted votes)
    picks k from 10, 20, 50; mlp (one hidden layer, early stopping) searches the widths of
    --mlp-widths with alpha 1, 1e-2, 1e-4.
    """
    from ..files import require_folder, same_file
    from ..heads import fit_head

    require_folder(output)  # before the search, not after it
    if same_file(output, features):
        raise click.ClickException(f"-o {output} is the feature file itself; give the head "
                                   f"another name (.joblib or .skops).")
    head = fit_head(features, layer, kind, progress=not quiet, **kwargs)
    path = head.save(output)
    from ..report.rows import format_params

    params = format_params(head.params_)
    done = sum(r["status"] == "evaluated" for r in head.cv_results_)
    click.echo(f"{kind} on {layer}: best {params}, CV {head.scoring} {head.cv_score_:.3f} "
               f"({done} of {len(head.cv_results_)} grid points evaluated); saved {path}")


@cli.command(epilog="""\b
Examples:
  featurecache score reports/run1/best.joblib feats.h5
  featurecache score heads/avgpool-logreg.skops other-photos.h5 --split train --json""")
@click.argument("head", type=click.Path())
@click.argument("features", type=click.Path(dir_okay=False))
@options.click_options(options.SIGNATURES["score"].options)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly
def score(head, features, split, as_json):
    """Evaluate a saved head on a feature file (accuracy, balanced accuracy, macro-F1).

    The file must be made the same way as the head's training features (backbone, weights,
    preprocessing, layer and pooling); otherwise the differing field is named. HEAD may be a
    fine-tuned model (ft/ or ft/model.pt): it is scored on the file's stored map.
    """
    from ..predict import score as run_score

    what, res = run_score(head, features, split=split)
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    click.echo(f"{what}, {res['n']} {split} rows of {res['feature_file']}: "
               f"accuracy {res['accuracy']:.3f}, balanced accuracy "
               f"{res['balanced_accuracy']:.3f}, macro-F1 {res['macro_f1']:.3f}")


@cli.command(epilog="""\b
Examples:
  featurecache compare feats.h5 -o reports/run1/
  featurecache compare feats.h5 --heads logreg --layers blocks.5,avgpool --extra blocks.5+avgpool -o r/
  featurecache compare feats.h5 --shots 1,5,10,25,all --repeats 3 -o r/
  featurecache compare lite0.h5 lite2.h5 -o r/        # two backbones, same images
  featurecache compare feats.h5 --heads logreg,mlp --mlp-widths 128,512 -o r/
  featurecache compare feats.h5 --heads logreg,mlp --finetuned ft/ --finetuned ft-img/ -o r/""")
@click.argument("features", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--finetuned", "finetuned", multiple=True, type=click.Path(exists=True),
              help="A fine-tune folder (`featurecache finetune`) of the same images, compared "
                   "as its own strategy (repeatable).")
@options.click_options(options.SIGNATURES["compare"].options)  # --heads (of the kinds), ...
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def compare(features, output, quiet, **kwargs):
    """Compare every stored layer x head (x backbone); pick the winner by CV; report on test.

    FEATURES is one feature file, or several files of the same images made with different
    backbones. Every candidate is scored on the same CV folds of the train split and the
    winner is chosen from those scores alone; the test split is read once, to report.
    Writes results.csv/json, report.md (table + verdict), layer_depth.png, confusion.png,
    few_shot.png (with --shots), heads/*.joblib and best.joblib (ready for `predict`).
    """
    from ..report import compare as run_compare

    kwargs["class_weight"] = options.class_weight(kwargs["class_weight"])
    res = run_compare(list(features), output, progress=not quiet, **kwargs)
    click.echo(res.table())
    click.echo(res.verdict.replace("**", ""))
    click.echo(f"\nreport: {res.out_dir / 'report.md'}; best frozen head: "
               f"{res.out_dir / 'best.joblib'}")


@cli.command(epilog="""\b
Examples:
  featurecache predict reports/run1/best.joblib photos/ -o preds.csv
  featurecache predict ft/ photos/ -o preds.csv          # a fine-tuned model
  featurecache predict heads/avgpool-logreg.joblib 'shots/*.jpg' --format json
  featurecache predict --imagenet cat.jpg
  featurecache predict reports/seg/best.joblib scenes/ -o masks/    # a segmentation head
  featurecache predict reports/det/best.joblib scenes/ -o boxes.json  # a detection head""")
@click.argument("args", nargs=-1, required=True)
@click.option("--imagenet", is_flag=True, help="Use the backbone's own 1000-class ImageNet head; "
              "then every argument is an image.")
@options.click_options(options.PREDICT, only=("backbone", "weights"))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here (default: print).")
@options.click_options(options.PREDICT, only=("fmt", "top_k", "batch_size"))
@_friendly
def predict(args, imagenet, backbone, weights, output, fmt, top_k, batch_size):
    """Classify images: HEAD IMAGES... (files, folders or globs), or --imagenet IMAGES...

    HEAD is a head file (.joblib, .skops) or a fine-tuned model (ft/ or ft/model.pt).
    A dense head (from `segment` or `detect`) writes one mask PNG per image into the -o
    folder (named by the image's stem, pixel = class id) or the boxes into one COCO JSON.

    Unreadable images get a row with the reason; the others are still predicted.
    """
    from ..files import require_folder, same_file
    from ..predict import predict as run_predict
    from ..predict import predict_imagenet, write_predictions

    if output:
        require_folder(output)  # before any image is decoded
        inputs = [Path(a) for a in args if Path(a).is_file()]
        if any(same_file(output, p) for p in inputs):
            raise click.ClickException(f"-o {output} is one of the inputs (the head or an "
                                       f"image); write the predictions to another file.")
    if imagenet:
        rows = predict_imagenet(args, backbone=backbone, weights=weights, top_k=top_k,
                                batch_size=batch_size)
    else:
        if len(args) < 2:
            raise click.UsageError("give a head file and at least one image (or use --imagenet).")
        from ..saved import load_model

        model = load_model(args[0])
        if getattr(model, "dense", False):  # masks (a folder of PNGs) or boxes (COCO JSON)
            if not output:
                raise click.UsageError(f"{model.describe()} writes files: give -o (a folder "
                                       f"for the mask PNGs, a .json for the COCO boxes).")
            message, failed = model.predict_to(args[1:], output, batch_size=batch_size)
            click.echo(message + (f" ({len(failed)} unreadable, e.g. {failed[0][1]})"
                                  if failed else ""))
            return
        rows = run_predict(model, args[1:], top_k=top_k, batch_size=batch_size)
    if output:
        write_predictions(rows, output, fmt)
        bad = sum(1 for r in rows if r["error"])
        click.echo(f"wrote {len(rows)} predictions to {output}" + (f" ({bad} unreadable)" if bad else ""))
    else:
        write_predictions(rows, click.get_text_stream("stdout"), fmt)
    if all(r["error"] for r in rows):
        raise click.ClickException("no image could be read.")



@cli.command(epilog="""\b
Examples:
  featurecache export reports/run1/best.joblib -o clip.onnx      # onnxruntime, no torch
  featurecache export heads/concat.skops -o concat.onnx          # an a+b head: both taps
  featurecache export ft/ -o ft.onnx                             # a fine-tuned model
  featurecache export reports/run1/best.joblib -o clip.pt2       # torch.export.load(...)
The input is RGB uint8 (N, crop, crop, 3), resized and center-cropped as the file's
`preprocess` metadata says; the README has a ten-line onnxruntime script.""")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Model file: .onnx (ONNX, onnxruntime) or .pt2 (torch.export).")
@options.click_options(options.SIGNATURES["export"].options)
@_friendly
def export(model, output, **kwargs):
    """Export a saved head or fine-tune with its backbone as one self-contained model file.

    MODEL is a head file (.joblib, .skops) or a fine-tuned model (ft/ or ft/model.pt). The
    file holds one graph from uint8 RGB images through the normalisation, the frozen backbone
    up to the layer(s), the pooling as embed does it and the head (a linear head's scaler
    folded into its linear layer); its outputs are in the head's class order, the last one
    the class probabilities (an SVM fitted without --probability: its decision scores).
    The class names, the preprocessing and the provenance are in the file's metadata. The
    written file is run on random images against the model before it is kept.
    """
    from ..export import export as run_export

    res = run_export(model, output, **kwargs)  # checks the output's folder and name first
    pre, prov = res["preprocess"], res["provenance"]
    version = f", opset {prov['onnx_opset']}" if "onnx_opset" in prov else ""
    check = ("not checked" if res["max_difference"] is None
             else f"checked against the model: max difference {res['max_difference']:.1e}")
    click.echo(f"wrote {res['output']} ({res['bytes'] / 1e6:.1f} MB, {res['format']}{version}): "
               f"{len(res['classes'])} classes; {check}")
    click.echo(f"input 'images': uint8 RGB (N, {pre['crop_size']}, {pre['crop_size']}, 3), "
               + ("the whole image resized to that square"
                  if pre["whole"] else f"short side resized to {pre['resize_size']} "
                  f"({pre['interpolation']}) then center-cropped")
               + f"; outputs: {', '.join(res['outputs'])}")
    if res["outputs"][-1] == "scores":
        click.echo("note: the last output is the SVM's decision scores (argmax = the class); "
                   "refit with --probability for probabilities.")
