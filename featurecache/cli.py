"""The ``featurecache`` command: a thin click layer over the package's plain functions.

Every command parses its options, calls one function, and prints the result. A
:class:`~featurecache.errors.FeaturecacheError` becomes one clean line and exit code 1.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path

import click

from . import options
from .errors import FeaturecacheError

__all__ = ["cli", "main"]


def _friendly(fn=None, *, style: str = "cli"):
    """Turn the package's errors into one-line ClickExceptions, naming options as ``style``
    shows them (``cli``: --overwrite; ``pipeline``: embed.overwrite = true); a full disk is
    one line too; anything else is reported as a bug (``--debug`` for the traceback)."""
    if fn is None:
        return functools.partial(_friendly, style=style)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.meta["featurecache.style"] = style  # for the warnings main() prints
        try:
            return fn(*args, **kwargs)
        except FeaturecacheError as exc:
            raise click.ClickException(exc.message(style, _table_of)) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise click.ClickException(f"no space left on device while writing "
                                           f"{exc.filename or 'the output'}; nothing was "
                                           f"written under the final name.") from None
            if _debug(ctx):
                raise
            raise click.ClickException(f"{exc.strerror or exc}"
                                       f"{': ' + str(exc.filename) if exc.filename else ''}.") from None
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else is a bug in featurecache
            if _debug(ctx):
                raise
            raise click.ClickException(
                f"internal error ({type(exc).__name__}: {exc}). This is a bug in featurecache: "
                f"run again with --debug (or FEATURECACHE_DEBUG=1) for the traceback, and "
                f"report it.") from None

    return wrapper


def _debug(ctx) -> bool:
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and root.params.get("debug")) or \
        os.environ.get("FEATURECACHE_DEBUG", "") not in ("", "0")


def _table_of(name: str):
    """The pipeline table that holds key ``name`` (for messages in pipeline style)."""
    from .pipeline import SCHEMA

    return next((table for table, keys in SCHEMA.items() if name in keys and table), None)


def _shard(value: str) -> tuple:
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not INDEX/COUNT, e.g. 0/4") from None
    return index, count


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featurecache")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error.")
def cli(debug):
    """Embed images once with a frozen backbone; compare layer depths with shallow heads.

    \b
    Typical session:
      featurecache layers efficientnet_lite0
      featurecache embed DATA -o feats.h5 --layer blocks.5 --layer blocks.10 --layer avgpool
      featurecache compare feats.h5 --heads logreg,svm -o reports/run1/
      featurecache predict reports/run1/best.joblib photo.jpg
    """


@cli.command(epilog="\b\nExample:\n  featurecache backbones | grep resnet")
def backbones():
    """List the backbone names that --backbone accepts."""
    from .backbones import available_backbones

    for name in available_backbones():
        click.echo(name)


@cli.command(epilog="\b\nExamples:\n  featurecache layers efficientnet_lite0\n"
                    "  featurecache layers resnet50 --weights none --all")
@click.argument("backbone", default=options.DEFAULT_BACKBONE)
@click.option("--weights", default="none", show_default=True,
              help="Weights to load (shapes do not depend on them; none is fastest).")
@click.option("--all", "all_nodes", is_flag=True, help="Also list every FX graph node, not just modules.")
@click.option("--pool", default="avg", type=click.Choice(options.POOLS), show_default=True,
              help="Pooling the widths are computed for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly
def layers(backbone, weights, all_nodes, pool, as_json):
    """List the layers of BACKBONE that embed can store: name, kind, width, depth.

    Kinds: map (N,C,H,W), map-nhwc (N,H,W,C), tokens (N,L,D), vector (N,D). The width is
    the stored size after pooling. Aliases (avgpool, stageK) are shown beside their layer.
    """
    from .backbones import load_backbone
    from .layers import list_layers

    listing = list_layers(load_backbone(backbone, weights), all_nodes=all_nodes)
    rows = [{"name": l.name, "kind": l.kind, "shape": list(l.shape), "width": l.width(pool),
             "depth": l.depth, "aliases": list(l.aliases)} for l in listing.layers]
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "method": listing.method, "layers": rows}, indent=1))
        return
    click.echo(f"{backbone}: {len(rows)} storable layers (extraction: {listing.method}"
               f"{'; ' + listing.note if listing.note else ''})")
    w = max(len(r["name"]) for r in rows)
    click.echo(f"{'depth':>5}  {'name':<{w}}  {'kind':<8}  {'width':>6}  {'shape':<16}  aliases")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        click.echo(f"{r['depth']:>5}  {r['name']:<{w}}  {r['kind']:<8}  {r['width']:>6}  "
                   f"{shape:<16}  {', '.join(r['aliases'])}")


@cli.command(epilog="""\b
Examples:
  featurecache embed ../shared/data/clipart10 -o feats.h5 --layer blocks.5 --layer avgpool
  featurecache embed photos/ -o feats.h5 --backbone resnet50 --weights IMAGENET1K_V2 --layer stage4
  featurecache embed manifest.csv -o feats.h5 --weights-file my_weights.pth
  featurecache embed builtin:digits -o digits.h5 --layer stage3,avgpool --max-per-class 20
Run the same command again after an interruption: it resumes after the committed rows.""")
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="HDF5 file to write (its folder must exist).")
@click.option("--layer", "layer_opts", multiple=True,
              help="Layer to store (repeat, or comma-separate); see `featurecache layers NAME`. "
                   "Default: avgpool.")
@options.click_options(options.EMBED)
@options.click_options(options.DATA, skip=("root",))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
@click.option("--shard", default="0/1", show_default=True,
              help="INDEX/COUNT: embed only this part of the data into a self-contained file.")
@click.option("-q", "--quiet", is_flag=True, help="No phases, no progress bar.")
@_friendly
def embed(data, output, layer_opts, shard, quiet, **kwargs):
    """Embed the images in DATA and store pooled features of several layers in one file.

    DATA is an image folder (DATA/<class>/*.jpg, or DATA/train/<class>/..., DATA/test/...),
    a CSV manifest with columns path,label[,split], or builtin:digits. All layers come
    from one forward pass per batch.
    """
    from .embedding import embed as run_embed

    names = [n.strip() for opt in layer_opts for n in opt.split(",") if n.strip()] \
        if layer_opts else ["avgpool"]
    r = run_embed(data, output, layers=names, shard=_shard(shard), progress=not quiet, **kwargs)
    if r.already_complete:
        click.echo(f"{r.path} is already complete ({r.n_rows} rows); nothing to do.")
    else:
        resumed = f", resumed after {r.resumed_from} inputs" if r.resumed_from else ""
        see = " (see `featurecache info --skipped`)" if r.n_skipped else ""
        ignored = sum(r.ignored.values())
        ignored = f", {ignored} ignored (hidden, system or non-image files)" if ignored else ""
        click.echo(f"wrote {r.path}: {r.n_rows} rows x {len(r.layers)} layers "
                   f"({', '.join(f'{s.name}[{s.dim}]' for s in r.layers)}), {r.n_skipped} "
                   f"skipped{see}{ignored}{resumed}, {r.seconds:.1f}s")


@cli.command(epilog="\b\nExample:\n  featurecache info feats.h5 --skipped")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--skipped", "show_skipped", is_flag=True, help="List the skipped inputs and why.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly
def info(path, show_skipped, as_json):
    """Show what a feature file holds: layers, rows, splits, provenance."""
    from .store import open_features

    d = open_features(path).describe(skipped=show_skipped)
    if as_json:
        click.echo(json.dumps(d, indent=1, default=str))
        return
    p = d["provenance"]
    state = "complete" if d["complete"] else (
        f"INCOMPLETE: {d['n_done']} of {d['n_inputs']} inputs done; re-run the same embed to resume")
    n_skipped = len(d["skipped"]) if show_skipped else d["skipped"]
    click.echo(f"{d['path']}: {state}")
    click.echo(f"rows: {d['rows']}  splits: {d['splits']}  skipped: {n_skipped}")
    click.echo(f"classes ({len(d['classes'])}): {', '.join(d['classes'][:20])}"
               f"{' ...' if len(d['classes']) > 20 else ''}")
    click.echo(f"backbone: {p['backbone']}  weights: {p['weights']}  dtype: {p['dtype']}  "
               f"extraction: {p['extraction_method']}")
    pre = p["preprocess"]
    click.echo(f"preprocess: resize {pre['resize']}, crop {pre['crop']}, {pre['interpolation']}, "
               f"mean {pre['mean']}, std {pre['std']}, EXIF orientation "
               f"{'applied' if pre.get('exif') else 'not applied'}")
    click.echo("layers:")
    for s in d["layers"].values():
        click.echo(f"  {s['name']:<20} node={s['node']:<24} kind={s['kind']:<8} "
                   f"pool={s['pool']:<6} dim={s['dim']:<6} depth={s['depth']}")
    click.echo(f"data: {p['data_root']} ({p['data_kind']}, split {p['split_origin']}), "
               f"shard {p['shard_index']}/{p['shard_count']}")
    click.echo(f"made: {p['created']} with featurecache {p['featurecache_version']}, torch "
               f"{p['torch_version']}, torchvision {p['torchvision_version']} on {p['device']}")
    click.echo(f"rebuild: {p['rebuild']}")
    if show_skipped:
        for sp, reason in d["skipped"]:
            click.echo(f"skipped: {sp}: {reason}")


@cli.command(epilog="""\b
Example:
  for i in 0 1 2 3; do featurecache embed DATA -o part$i.h5 --shard $i/4 & done; wait
  featurecache join feats.h5 part0.h5 part1.h5 part2.h5 part3.h5""")
@click.argument("output", type=click.Path(dir_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--copy", is_flag=True, help="Copy the layers into OUTPUT: one self-contained file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_friendly
def join(output, shards, copy, overwrite):
    """Join the shard files of one embed run into OUTPUT.

    By default OUTPUT's layers are HDF5 virtual datasets that point into the shard files (no
    copy): keep the shards beside it. With --copy, OUTPUT holds everything itself.
    """
    from .store import join_shards, open_features

    path = join_shards(shards, output, overwrite=overwrite, copy=copy)
    how = "copied into one file" if copy else "virtual layers pointing into them"
    click.echo(f"wrote {path}: {open_features(path).n_rows} rows from {len(shards)} shards ({how})")


@cli.command("fit-head", epilog="""\b
Examples:
  featurecache fit-head logreg feats.h5 --layer avgpool -o heads/avgpool-logreg.joblib
  featurecache fit-head svm feats.h5 --layer blocks.10 --kernel rbf -o heads/b10-svm.joblib
  featurecache fit-head knn feats.h5 --layer avgpool -o heads/avgpool-knn.joblib
  featurecache fit-head logreg feats.h5 --layer blocks.5+avgpool -o heads/concat.skops
joblib files are pickles: load only heads you trust; .skops heads are safe to share.""")
@click.argument("kind", type=click.Choice(options.HEAD_KINDS))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("--layer", required=True, help="Stored layer, or several joined with + (concatenated).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Head file: .joblib (a pickle) or .skops (safe to share and load).")
@options.click_options(options.COMPARE, only=("kernel", "cv", "scoring", "class_weight"))
@click.option("--probability", is_flag=True, help="Fit SVM probability estimates (slower).")
@click.option("--n-jobs", default=-1, show_default=True, type=int,
              help="Parallel CV folds (-1: all cores).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def fit_head_cmd(kind, features, layer, output, kernel, cv, scoring, class_weight, probability,
                 n_jobs, seed, quiet):
    """Search hyperparameters by stratified CV, refit on the train split, save the head.

    logreg and svm walk C = 1e-6..1e6 a decade apart (each fold stops two decades past its
    best), then quarter-decades around the best; knn (cosine, temperature-weighted votes)
    picks k from 10, 20, 50.
    """
    from .files import require_folder, same_file
    from .heads import fit_head

    require_folder(output)  # before the search, not after it
    if same_file(output, features):
        raise click.ClickException(f"-o {output} is the feature file itself; give the head "
                                   f"another name (.joblib or .skops).")
    head = fit_head(features, layer, kind, kernel=kernel, cv=cv, scoring=scoring, seed=seed,
                    n_jobs=n_jobs, class_weight=options.class_weight(class_weight),
                    probability=probability, progress=not quiet)
    path = head.save(output)
    params = ", ".join(f"{k}={v:.3g}" for k, v in head.params_.items())
    done = sum(r["status"] == "evaluated" for r in head.cv_results_)
    click.echo(f"{kind} on {layer}: best {params}, CV {head.scoring} {head.cv_score_:.3f} "
               f"({done} of {len(head.cv_results_)} grid points evaluated); saved {path}")


@cli.command(epilog="""\b
Examples:
  featurecache score reports/run1/best.joblib feats.h5
  featurecache score heads/avgpool-logreg.skops other-photos.h5 --split train --json""")
@click.argument("head", type=click.Path(dir_okay=False))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("--split", default="test", show_default=True, help="Split of the file to score.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly
def score(head, features, split, as_json):
    """Evaluate a saved head on a feature file (accuracy, balanced accuracy, macro-F1).

    The file must be made the same way as the head's training features (backbone, weights,
    preprocessing, layer and pooling); otherwise the differing field is named.
    """
    from .heads import load_head

    h = load_head(head)
    res = h.evaluate(features, split=split)
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    click.echo(f"{h.kind} head on {h.layer}, {res['n']} {split} rows of {res['feature_file']}: "
               f"accuracy {res['accuracy']:.3f}, balanced accuracy "
               f"{res['balanced_accuracy']:.3f}, macro-F1 {res['macro_f1']:.3f}")


@cli.command(epilog="""\b
Examples:
  featurecache compare feats.h5 -o reports/run1/
  featurecache compare feats.h5 --heads logreg --layers blocks.5,avgpool --extra blocks.5+avgpool -o r/
  featurecache compare feats.h5 --shots 1,5,10,25,all --repeats 3 -o r/
  featurecache compare lite0.h5 lite2.h5 -o r/        # two backbones, same images""")
@click.argument("features", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--heads", default="logreg,svm,knn", show_default=True,
              help=f"Comma-separated head kinds ({', '.join(options.HEAD_KINDS)}).")
@click.option("--layers", default=None, help="Comma-separated stored layers (default: all).")
@click.option("--extra", "extra", multiple=True, help="A concatenation such as blocks.5+avgpool (repeatable).")
@options.click_options(options.COMPARE)
@click.option("--shots", default=None, help="Few-shot curve, e.g. 1,5,10,25,all (images per class).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def compare(features, output, heads, layers, extra, shots, seed, overwrite, quiet, **kwargs):
    """Compare every stored layer x head (x backbone); pick the winner by CV; report on test.

    FEATURES is one feature file, or several files of the same images made with different
    backbones. Every candidate is scored on the same CV folds of the train split and the
    winner is chosen from those scores alone; the test split is read once, to report.
    Writes results.csv/json, report.md (table + verdict), layer_depth.png, confusion.png,
    few_shot.png (with --shots), heads/*.joblib and best.joblib (ready for `predict`).
    """
    from .report import compare as run_compare

    kwargs["class_weight"] = options.class_weight(kwargs["class_weight"])
    res = run_compare(list(features), output, layers=_csv(layers), heads=_csv(heads) or [],
                      extra_layers=extra, shots=_csv(shots) or (), seed=seed,
                      overwrite=overwrite, progress=not quiet, **kwargs)
    click.echo(res.table())
    click.echo(res.verdict.replace("**", ""))
    click.echo(f"\nreport: {res.out_dir / 'report.md'}; best head: {res.out_dir / 'best.joblib'}")


@cli.command(epilog="""\b
Examples:
  featurecache predict reports/run1/best.joblib photos/ -o preds.csv
  featurecache predict heads/avgpool-logreg.joblib 'shots/*.jpg' --format json
  featurecache predict --imagenet cat.jpg""")
@click.argument("args", nargs=-1, required=True)
@click.option("--imagenet", is_flag=True, help="Use the backbone's own 1000-class ImageNet head; "
              "then every argument is an image.")
@click.option("--backbone", default=options.DEFAULT_BACKBONE, show_default=True,
              help="With --imagenet.")
@click.option("--weights", default="DEFAULT", show_default=True, help="With --imagenet.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here (default: print).")
@click.option("--format", "fmt", default="csv", type=click.Choice(["csv", "json"]), show_default=True)
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@_friendly
def predict(args, imagenet, backbone, weights, output, fmt, top_k, batch_size):
    """Classify images: HEAD IMAGES... (files, folders or globs), or --imagenet IMAGES...

    Unreadable images get a row with the reason; the others are still predicted.
    """
    from .files import require_folder, same_file
    from .predict import predict as run_predict
    from .predict import predict_imagenet, write_predictions

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
        rows = run_predict(args[0], args[1:], top_k=top_k, batch_size=batch_size)
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
  featurecache run pipelines/digits-demo.toml
  featurecache run pipelines/clipart10.toml --set data.root=../shared/data/clipart10
  featurecache run pipelines/reference.toml --dry-run""")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key, e.g. --set data.max_per_class=10 (repeatable).")
@click.option("--dry-run", is_flag=True, help="Validate, check the inputs, show the plan; run nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_friendly(style="pipeline")
def run(pipeline_file, overrides, dry_run, quiet):
    """Run a pipeline file: embed -> compare -> report, in one command.

    Writes OUTPUT/features.h5, OUTPUT/report/ and OUTPUT/run.json. A matching feature
    file from an earlier run is reused (or resumed), not recomputed. Relative paths in the
    file are relative to the file's folder; those given with --set, to the current folder.
    """
    from .pipeline import check_pipeline, load_pipeline, run_pipeline

    plan = load_pipeline(pipeline_file, overrides)
    click.echo(plan.describe())
    if dry_run:
        s = check_pipeline(plan)
        click.echo(f"inputs ok: {s['images']} images, {s['classes']} classes, splits "
                   f"{'/'.join(s['splits'])}; weights {s['weights']}; layer widths "
                   + ", ".join(f"{k}={v}" for k, v in s["layers"].items()))
        click.echo("dry run: nothing was run.")
        return
    record = run_pipeline(plan, progress=not quiet)
    click.echo(record["table"])
    click.echo(record["verdict"].replace("**", ""))
    click.echo(f"\nreport: {record['outputs']['report']}  run record: {plan.output / 'run.json'}")


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def main():
    import warnings

    from .errors import FeaturecacheWarning

    python_show = warnings.showwarning

    def show(message, category, *args, **kwargs):
        """The package's own warnings as one clean line; others as Python prints them."""
        if issubclass(category, FeaturecacheWarning):
            ctx = click.get_current_context(silent=True)
            style = ctx.meta.get("featurecache.style", "cli") if ctx is not None else "cli"
            text = message.message(style, _table_of) if isinstance(message, FeaturecacheWarning) \
                else str(message)
            click.echo(f"warning: {text}", err=True)
        else:
            python_show(message, category, *args, **kwargs)

    warnings.showwarning = show
    cli(prog_name="featurecache")


if __name__ == "__main__":
    sys.exit(main())
