"""Commands of the dense probes: ``segment``, ``detect`` (``predict`` routes a dense head)."""

from __future__ import annotations

import click

from .. import options
from .app import _friendly, cli


def _echo(res, metric: str, label: str) -> None:
    click.echo(res.table())
    w = res.winner
    click.echo(f"\nchosen by CV (grouped by image): {w['layer']} with {w['head']} "
               f"(CV {w['cv_score']:.3f}); test {label} {w[metric]:.3f}")
    click.echo(f"report: {res.out_dir / 'report.md'}; head: {res.out_dir / 'best.joblib'}")


@cli.command(epilog="""\b
Examples:
  featurecache embed scenes/ -o s.h5 --keep-map stage2,stage3,stage4,stage5
  featurecache segment s.h5 -o reports/seg/
  featurecache segment s.h5 --layers stage3,stage4 --hypercolumn stage3+stage4 -o r/
  featurecache segment s.h5 --heads logreg --hypercolumn none -o r/
  featurecache predict reports/seg/best.joblib new_images/ -o masks/""")
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Report folder.")
@options.click_options(options.SIGNATURES["segment"].options)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def segment(features, output, quiet, **kwargs):
    """Which depth of the stored maps segments best? A per-cell probe per layer and
    hypercolumn.

    FEATURES is a feature file embedded from a dense folder (images + masks, classes.txt)
    with --keep-map. Each map cell is a sample (the majority class under it); the heads'
    parameters and the winner are chosen by CV grouped by image; test masks are predicted
    by upsampling the cell scores bilinearly. Writes results.json (rows: layer, head,
    cv_score, miou, pixel_accuracy, per_class_iou; winner), report.md, layer_depth.png,
    predictions.png, heads/ and best.joblib. A linear probe on frozen features, not the
    DINOv2 training protocol.
    """
    from ..dense.segment import segment as run

    _echo(run(features, output, progress=not quiet, **kwargs), "miou", "mIoU")


@cli.command(epilog="""\b
Examples:
  featurecache detect s.h5 -o reports/det/
  featurecache detect s.h5 --layers stage4,stage5 --hypercolumn none -o r/
  featurecache predict reports/det/best.joblib new_images/ -o boxes.json""")
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Report folder.")
@options.click_options(options.SIGNATURES["detect"].options)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def detect(features, output, quiet, **kwargs):
    """Which depth of the stored maps detects best? Centre-cell class + box regression per
    layer and hypercolumn, scored by COCO mAP@0.5.

    FEATURES is a feature file embedded from a dense folder with <split>/annotations.json
    (COCO boxes) and --keep-map. Writes results.json (rows: layer, head, cv_score, map50;
    winner), report.md, layer_depth.png, predictions.png, heads/ and best.joblib. The point
    is the depth comparison, not a state-of-the-art detector.
    """
    from ..dense.detect import detect as run

    _echo(run(features, output, progress=not quiet, **kwargs), "map50", "mAP@0.5")
