"""Commands on backbones and feature files: ``backbones``, ``layers``, ``embed``, ``info``, ``join``."""

from __future__ import annotations

import json

import click

from .. import options
from .app import _friendly, cli


def _shard(value: str) -> tuple:
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not INDEX/COUNT, e.g. 0/4") from None
    return index, count

@cli.command(epilog="\b\nExample:\n  featurecache backbones | grep resnet")
def backbones():
    """List the backbone names that --backbone accepts."""
    from ..backbones import available_backbones

    for name in available_backbones():
        click.echo(name)


@cli.command(epilog="\b\nExamples:\n  featurecache layers efficientnet_lite0\n"
                    "  featurecache layers resnet50 --weights none --all")
@click.argument("backbone", default=options.SIGNATURES["layers"].option("backbone").default)
@options.click_options(options.SIGNATURES["layers"].options, skip=("backbone",))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly
def layers(backbone, as_json, **kwargs):
    """List the layers of BACKBONE that embed can store: name, kind, width, depth.

    Kinds: map (N,C,H,W), map-nhwc (N,H,W,C), tokens (N,L,D), vector (N,D). The width is
    the stored size after pooling. Aliases (avgpool, stageK) are shown beside their layer.
    """
    from ..layers import describe_layers

    d = describe_layers(backbone, **kwargs)
    rows = d["layers"]
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "method": d["method"], "layers": rows},
                              indent=1))
        return
    click.echo(f"{backbone}: {len(rows)} storable layers (extraction: {d['method']}"
               f"{'; ' + d['note'] if d['note'] else ''})")
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
  featurecache embed photos/ -o feats.h5 --layer avgpool --keep-map stage4   # for finetune
  featurecache embed photos/ -o feats.h5 --layer stage4,avgpool --cluster local:2 --shards 16
  featurecache embed photos/ -o feats.h5 --cluster tcp://scheduler:8786 --shards 512
  featurecache embed s3://bucket/photos/ -o feats.h5 --storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'
Run the same command again after an interruption: it resumes after the committed rows.""")
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="HDF5 file to write (its folder must exist).")
@options.click_options(options.EMBED)  # --layer first: repeat it, or comma-separate
@options.click_options(options.DATA, skip=("root",))
@options.click_options(options.SIGNATURES["embed"].only("seed"))
@click.option("--shard", default="0/1", show_default=True,
              help="INDEX/COUNT: embed only this part of the data into a self-contained file.")
@options.click_options(options.CLUSTER)
@click.option("-q", "--quiet", is_flag=True, help="No phases, no progress bar.")
@_friendly
def embed(data, output, shard, quiet, **kwargs):
    """Embed the images in DATA and store pooled features of several layers in one file.

    DATA is an image folder (DATA/<class>/*.jpg, or DATA/train/<class>/..., DATA/test/...),
    a CSV manifest with columns path,label[,split], or builtin:digits; a folder or a
    manifest may be a URL (s3://bucket/photos/, with --storage-options for the endpoint;
    credentials from the environment). All layers come from one forward pass per batch.
    """
    from ..cluster import embed as run_embed  # in this process, or sharded with --cluster

    r = run_embed(data, output, shard=_shard(shard), progress=not quiet, **kwargs)
    if r.update is not None:
        from ..update import summary

        if r.already_complete:
            click.echo(f"{r.path} is up to date: {summary(r.update)}; nothing to do.")
        else:
            resumed = f", resumed after {r.resumed_from} rows" if r.resumed_from else ""
            click.echo(f"updated {r.path}: {summary(r.update)}; embedded {r.update['embedded']} "
                       f"images, copied {r.update['copied']} rows; {r.n_rows} rows x "
                       f"{len(r.layers)} layers, {r.n_skipped} skipped{resumed}, "
                       f"{r.seconds:.1f}s")
    elif r.already_complete:
        click.echo(f"{r.path} is already complete ({r.n_rows} rows); nothing to do.")
    else:
        resumed = f", resumed after {r.resumed_from} inputs" if r.resumed_from else ""
        see = " (see `featurecache info --skipped`)" if r.n_skipped else ""
        ignored = sum(r.ignored.values())
        ignored = f", {ignored} ignored (hidden, system or non-image files)" if ignored else ""
        retried = getattr(r, "retries", 0)
        retried = f", {retried} transient store error{'s' * (retried != 1)} retried" \
            if retried else ""
        click.echo(f"wrote {r.path}: {r.n_rows} rows x {len(r.layers)} layers "
                   f"({', '.join(f'{s.name}[{s.dim}]' for s in r.layers)}), {r.n_skipped} "
                   f"skipped{see}{ignored}{resumed}{retried}, {r.seconds:.1f}s"
                   + "".join(f"; map {m.name} {list(m.shape)}" for m in r.maps))


@cli.command(epilog="\b\nExample:\n  featurecache info feats.h5 --skipped")
@click.argument("path", type=click.Path())  # NAME.partial (a folder) too
@click.option("--skipped", "show_skipped", is_flag=True, help="List the skipped inputs and why.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly
def info(path, show_skipped, as_json):
    """Show what a feature file holds: layers, rows, splits, provenance."""
    from ..store import open_features

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
    click.echo("preprocess: "
               + (f"whole image resized to {pre['crop']}x{pre['crop']} (dense data), " if pre.get(
                   "whole") else f"resize {pre['resize']}, crop {pre['crop']}, ")
               + f"{pre['interpolation']}, "
               f"mean {pre['mean']}, std {pre['std']}, EXIF orientation "
               f"{'applied' if pre.get('exif') else 'not applied'}")
    click.echo("layers:")
    for s in d["layers"].values():
        click.echo(f"  {s['name']:<20} node={s['node']:<24} kind={s['kind']:<8} "
                   f"pool={s['pool']:<6} dim={s['dim']:<6} depth={s['depth']}")
    for name, m in d["maps"].items():
        size = f"{m['bytes'] / 2**20:.1f} MiB on disk" if m["bytes"] is not None else "unfinished"
        click.echo(f"  map {name:<16} node={m['node']:<24} shape={m['shape']} ({size})")
    for name, t in d.get("targets", {}).items():
        shape = "x".join(map(str, t["shape"])) + " uint8 class ids" if t["shape"] else \
            "[[class, x, y, w, h], ...] per image, input pixels"
        click.echo(f"  target {name:<13} {shape}"
                   + (f" ({p['dense']['ignore_index']} = ignore)" if t["shape"] else ""))
    if p.get("update"):
        from ..update import summary

        u = p["update"]
        click.echo(f"updated: from the file made {p.get('update_of_created') or '?'}: "
                   f"{summary(u)}; {u.get('copied', 0)} rows copied as they were, "
                   f"{u.get('embedded', 0)} embedded; a row's split never moves on update "
                   f"(new images: the split the data give, else a seeded hash of the id)")
    click.echo(f"data: {p['data_root']} ({p['data_kind']}, split {p['split_origin']}), "
               + (f"joined from {p['joined_from']} shards ({p.get('joined_as', 'virtual')})"
                  if p.get("joined_from") else f"shard {p['shard_index']}/{p['shard_count']}"))
    if p.get("joined_from"):
        click.echo("joined: the same rows, order, paths, labels and splits as one process would "
                   "write; values equal to a one-process embed's within float16 rounding (each "
                   "shard's sums follow its worker's thread count)")
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
@options.click_options(options.SIGNATURES["join"].options)
@_friendly
def join(output, shards, copy, overwrite):
    """Join the shard files of one embed run into OUTPUT.

    By default OUTPUT's layers are HDF5 virtual datasets that point into the shard files (no
    copy): keep the shards beside it. With --copy, OUTPUT holds everything itself.
    """
    from ..store import join_shards, open_features

    path = join_shards(shards, output, overwrite=overwrite, copy=copy)
    how = "copied into one file" if copy else "virtual layers pointing into them"
    click.echo(f"wrote {path}: {open_features(path).n_rows} rows from {len(shards)} shards ({how})")

