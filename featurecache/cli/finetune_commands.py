"""The ``finetune`` command: LP-FT of the blocks above a stored map, or from images."""

from __future__ import annotations

import click

from .. import options
from .app import _friendly, cli


@cli.command(epilog="""\b
Examples:
  featurecache embed DATA -o feats.h5 --layer avgpool --keep-map stage4
  featurecache finetune feats.h5 --from stage4 -o ft/            # top blocks from the stored map
  featurecache finetune DATA --from stage4 -o ft-img/ --augment   # same blocks from images
  featurecache compare feats.h5 --heads logreg,mlp --finetuned ft/ -o report/
  featurecache predict ft/ photo.jpg""")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for model.pt, curve.png and summary.json.")
@options.click_options(options.SIGNATURES["finetune"].options)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@_friendly
def finetune(source, output, quiet, **kwargs):
    """Fine-tune the blocks above --from (LP-FT), from a feature file's stored map or images.

    SOURCE is a feature file that kept the map of --from (embed --keep-map), so the frozen
    bottom never runs again; or images (a folder, a CSV manifest, builtin:digits), decoded
    each epoch (--augment: random crops and flips). The classifier starts as the logistic
    head on the final pooled features (step 0 predicts what that probe predicts); AdamW with a
    cosine schedule trains it and, at a tenth of --lr, the blocks above --from, with
    BatchNorm frozen. The epoch with the best score on a validation fold of the train split
    is kept (epoch 0 is the probe itself); the test split is predicted once, at the end.
    """
    from ..finetune import finetune as run_finetune

    r = run_finetune(source, output, progress=not quiet, **kwargs)
    s, t = r.summary, r.test
    tested = (f"; test accuracy {t['accuracy']:.3f}, balanced accuracy "
              f"{t['balanced_accuracy']:.3f} ({t['n']} rows)") if t else ""
    click.echo(f"fine-tuned the blocks above {s['from_layer']} of {s['backbone']} from the "
               f"{r.source}: kept epoch {r.best_epoch} of {len(r.history) - 1} (validation "
               f"{s['settings']['scoring']} {r.val_score:.3f}; the linear probe had "
               f"{s['probe_val_score']:.3f}){tested}; {s['seconds_per_epoch']} s per epoch, "
               f"{s['seconds']:.0f} s in all")
    click.echo(f"wrote {r.out_dir}/model.pt, curve.png, summary.json")
