"""Declarative runs: a TOML file -> the same embed and compare calls the CLI makes.

A pipeline file has three tables, each optional except ``data.root``; every key and its
default is in :data:`SCHEMA`, and ``pipelines/reference.toml`` shows all of them with comments::

    output = "runs/digits-demo"          # folder for features.h5, report/ and run.json
    seed = 0

    [data]
    root = "builtin:digits"              # image folder, CSV manifest or builtin:digits
    max_per_class = 60

    [embed]
    layers = ["stage2", "stage3", "stage4", "avgpool"]

    [compare]
    heads = ["logreg", "svm"]

The file is validated as a whole before anything runs: unknown keys, wrong types, bad
choices and out-of-range numbers are errors that name the key. Relative paths in the file
(``output``, ``data.root``, ``embed.weights_file``) are relative to the pipeline file's folder;
those given with ``--set`` are relative to the current folder.
An existing feature file with the same settings is reused (or resumed); one with other
settings is an error unless ``embed.overwrite = true``.

Example::

    >>> plan = load_pipeline("pipelines/digits-demo.toml", overrides=["data.max_per_class=5"])  # doctest: +SKIP
    >>> result = run_pipeline(plan)                                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionError, PipelineError, PipelineOptionError, close_matches
from .options import _UNSET, STAGES, class_weight

__all__ = ["SCHEMA", "Plan", "load_pipeline", "check_pipeline", "run_pipeline"]

# table -> key -> its Option (featurecache/options.py declares them all)
SCHEMA = {table: {o.toml_key: o for o in options} for table, options in STAGES.items()}
PATH_KEYS = (("", "output"), ("data", "root"), ("embed", "weights_file"))


@dataclass
class Plan:
    """A validated pipeline: ``config[table][key]`` with every default filled in."""

    config: dict
    source: Path | None = None

    @property
    def output(self) -> Path:
        return Path(self.config[""]["output"])

    def describe(self) -> str:
        c = self.config
        lines = [f"pipeline {c['']['name'] or self.source}: output {self.output}/"]
        d, e, k = c["data"], c["embed"], c["compare"]
        subset = f", at most {d['max_per_class']} per class and split" if d["max_per_class"] else ""
        lines.append(f"  1. embed   {d['root']}{subset} with {e['backbone']} "
                     f"({e['weights_file'] or e['weights']}), layers {', '.join(e['layers'])}, "
                     f"pool {e['pool']}, {e['dtype']} -> {self.output / 'features.h5'}")
        layers = k["layers"] or e["layers"]
        extra = f" + {', '.join(k['extra_layers'])}" if k["extra_layers"] else ""
        f = c["finetune"]
        step = 2
        for src in f["sources"]:
            aug = " with augmentation" if src == "images" and f["augment"] else ""
            lines.append(f"  {step}. finetune the blocks above {f['from']} from the {src}{aug} "
                         f"({f['epochs']} epochs at most) -> {self.output / ('finetune-' + src)}/")
            step += 1
        lines.append(f"  {step}. compare {', '.join(k['heads'])} heads on {', '.join(layers)}{extra} "
                     f"({k['cv']}-fold CV){' + the fine-tuned models' if f['sources'] else ''} "
                     f"-> {self.output / 'report'}/")
        lines.append(f"  {step + 1}. record  {self.output / 'run.json'}")
        return "\n".join(lines)


def _parse_override(item: str) -> tuple:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"--set {item!r} is not KEY=VALUE (e.g. data.root=../shared/data/digits).")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip(), value


def load_pipeline(path=None, overrides=(), text: str | None = None) -> Plan:
    """Read and validate a pipeline file (or ``text``), applying ``--set KEY=VALUE`` overrides.

    Raises:
        PipelineError: the file is missing or not TOML, or a key is unknown, mistyped or
            not allowed; the message names the key.
    """
    if text is None:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"pipeline file {path} does not exist.")
        text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: not valid TOML ({exc}).") from None
    overridden = set()
    for item in overrides:
        key, value = _parse_override(item)
        overridden.add(key)
        table, _, name = key.rpartition(".")
        target = raw.setdefault(table, {}) if table else raw
        if not isinstance(target, dict):
            raise PipelineError(f"--set {key}: {table} is not a table.")
        target[name] = value
    unknown = [t for t in raw if t not in SCHEMA and isinstance(raw[t], dict)]
    if unknown:
        raise PipelineError(f"unknown table [{unknown[0]}]; tables: "
                            f"{', '.join(t for t in SCHEMA if t)}.")
    config = {}
    for table, keys in SCHEMA.items():
        given = raw if table == "" else raw.get(table, {})
        if table and not isinstance(given, dict):
            raise PipelineError(f"[{table}] must be a table, got {given!r}.")
        config[table] = {}
        for name, value in given.items():
            if table == "" and name in SCHEMA:
                continue  # a sub-table
            if name not in keys:
                where = f"{table}.{name}" if table else name
                raise PipelineError(f"unknown key {where!r}; [{table or 'top level'}] takes: "
                                    f"{', '.join(keys)} (close: {close_matches(name, keys)}).")
        for name, opt in keys.items():
            where = f"{table}.{name}" if table else name
            if name not in given:
                if opt.default is _UNSET:
                    from .data import spec_help

                    raise PipelineError(f"missing key {where!r}: {spec_help()[0].lower()}{spec_help()[1:]}.")
                config[table][name] = opt.toml_default
                continue
            try:
                config[table][name] = opt.toml_default if opt.from_toml(given[name]) is None \
                    and opt.default is None else opt.check(given[name], where)
            except OptionError as exc:
                raise PipelineOptionError(str(exc)) from None
    _check_finetune(config)
    if not config["embed"]["layers"]:
        raise PipelineError("embed.layers must name at least one layer.")
    if not config[""]["output"].strip():
        raise PipelineError("output is empty; name the folder for features.h5, report/ and "
                            "run.json (relative paths are relative to the pipeline file).")
    if path is not None:  # the file's relative paths are relative to the file
        base = Path(path).resolve().parent
        from .data import resolve_spec

        for table, name in PATH_KEYS:
            value = config[table][name]
            given = (f"{table}.{name}" if table else name) in overridden
            if not value or given:
                continue
            if (table, name) == ("data", "root"):  # by its source's rule (a scheme stays as it is)
                config[table][name] = resolve_spec(value, base)
            elif not Path(value).expanduser().is_absolute():
                config[table][name] = os.path.normpath(base / Path(value).expanduser())
    return Plan(config, Path(path) if path else None)


def _check_finetune(config: dict) -> None:
    """Fine-tuning from the cache needs the embed to keep the map of ``finetune.from``."""
    f, e = config["finetune"], config["embed"]
    twice = sorted({x for x in f["sources"] if f["sources"].count(x) > 1})
    if twice:
        raise PipelineError(f"finetune.sources names {', '.join(map(json.dumps, twice))} twice; "
                            f"each source is fine-tuned once (into OUTPUT/finetune-SOURCE).")
    if "cache" in f["sources"] and f["from"] not in e["keep_map"]:
        raise PipelineError(f"finetune.sources includes \"cache\", which trains on the map of "
                            f"finetune.from = {f['from']!r}; keep it in the embed: embed.keep_map "
                            f"= [{', '.join(json.dumps(m) for m in e['keep_map'] + [f['from']])}].")
    if f["augment"] and "images" not in f["sources"]:
        raise PipelineError("finetune.augment = true needs \"images\" in finetune.sources (the "
                            "cached maps cannot be augmented).")


def _finetune_kwargs(c: dict, source: str) -> dict:
    """``[finetune]`` as finetune()'s keywords; from images, the embed's backbone and the
    data's split too (so the fine-tune sees the images the feature file holds)."""
    f, e = _kwargs("finetune", c), _kwargs("embed", c)
    f.pop("sources")
    if source == "cache":
        f.pop("augment")
    else:
        d = _kwargs("data", c)
        f.update(backbone=e["backbone"], weights=e["weights"], weights_file=e["weights_file"],
                 num_workers=e["num_workers"], test_size=d["test_size"],
                 max_per_class=d["max_per_class"])
    return {**f, "scoring": _kwargs("compare", c)["scoring"], "seed": c[""]["seed"],
            "device": e["device"]}


def _kwargs(table: str, c: dict) -> dict:
    """A table of the plan as the stage function's keyword arguments (``auto`` -> None)."""
    return {o.name: o.from_toml(c[table][o.toml_key]) for o in STAGES[table]}


def _embed_kwargs(c: dict) -> dict:
    data = _kwargs("data", c)
    return {**_kwargs("embed", c), **_kwargs("cluster", c), "test_size": data["test_size"],
            "max_per_class": data["max_per_class"], "storage_options": data["storage_options"],
            "label_field": data["label_field"], "seed": c[""]["seed"]}


def _compare_kwargs(c: dict) -> dict:
    k = _kwargs("compare", c)
    return {**k, "layers": k["layers"] or None, "seed": c[""]["seed"],
            "class_weight": class_weight(k["class_weight"]),
            "cluster": _kwargs("cluster", c)["cluster"]}


def check_pipeline(plan: Plan) -> dict:
    """Check the inputs without running anything: data, backbone, weights, layers, heads.

    Returns a summary (images, classes, layer widths). Raises the package's errors.
    """
    from .backbones import load_backbone
    from .data import open_source
    from .layers import resolve_layers

    kw = _embed_kwargs(plan.config)
    src = open_source(plan.config["data"]["root"], test_size=kw["test_size"], seed=kw["seed"],
                      max_per_class=kw["max_per_class"], storage_options=kw["storage_options"],
                      label_field=kw["label_field"])
    bb = load_backbone(kw["backbone"], kw["weights"], kw["weights_file"])
    specs = resolve_layers(bb, kw["layers"], pool=kw["pool"], token_pool=kw["token_pool"])
    if plan.config["finetune"]["sources"]:
        from .feeds import check_from

        check_from(bb, plan.config["finetune"]["from"])
    k = plan.config["compare"]
    from .report.fewshot import check_shots

    check_shots(k["shots"], k["repeats"])
    stored = {s.name for s in specs}
    for layer in k["layers"] + [p for e in k["extra_layers"] for p in e.split("+")]:
        if layer not in stored:
            raise PipelineError(f"compare layer {layer!r} is not in embed.layers ({', '.join(stored)}).")
    _check_data(src, k["cv"])
    from .extract import default_device

    default_device(kw["device"])  # an unknown device, or cuda on a machine without one
    splits = sorted({r.split for r in src.records})
    return {"images": len(src.records), "classes": len(src.classes), "splits": splits,
            "layers": {s.name: s.dim for s in specs}, "weights": bb.weights}


def _check_data(src, cv: int) -> None:
    """Refuse, before any image is decoded, data that compare cannot use: no test rows, or a
    class with fewer training images than CV folds asked."""
    from collections import Counter

    splits = Counter(r.split for r in src.records)
    if not splits["test"]:
        raise PipelineError(f"{src.root} has no test images (splits: {dict(splits)}); compare "
                            f"reports on a held-out test split. Add a test split, or leave "
                            f"the split out and set data.test_size.")
    if splits["val"]:
        return  # the val split is the one fold
    train = Counter(r.label for r in src.records if r.split == "train")
    few = sorted((train[i], c) for i, c in enumerate(src.classes) if train[i] < cv)
    if few:
        shown = ", ".join(f"{c!r} has {n}" for n, c in few[:5])
        raise PipelineError(f"compare.cv = {cv} needs at least {cv} training images per class, "
                            f"but {shown}. Lower compare.cv (at least 2) or add images.")


def run_pipeline(plan: Plan, progress: bool = True) -> dict:
    """Run embed -> compare and write ``run.json``; returns its content."""
    from . import versions
    from .data import open_source
    from .cluster import embed  # in this process, or sharded with [cluster] address
    from .report import compare

    kw = _embed_kwargs(plan.config)
    src = open_source(plan.config["data"]["root"], test_size=kw["test_size"], seed=kw["seed"],
                      max_per_class=kw["max_per_class"], storage_options=kw["storage_options"],
                      label_field=kw["label_field"])
    _check_data(src, plan.config["compare"]["cv"])
    out = plan.output
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    r = embed(src, out / "features.h5", progress=progress, **kw)
    timings["embed_s"] = round(time.perf_counter() - t, 2)
    tuned = {}
    for source in plan.config["finetune"]["sources"]:
        from .finetune import finetune

        t = time.perf_counter()
        given = out / "features.h5" if source == "cache" else plan.config["data"]["root"]
        r_ft = finetune(given, out / f"finetune-{source}", overwrite=True, progress=progress,
                        **_finetune_kwargs(plan.config, source))
        timings[f"finetune_{source}_s"] = round(time.perf_counter() - t, 2)
        tuned[source] = {"folder": str(r_ft.out_dir), "best_epoch": r_ft.best_epoch,
                         "val_score": r_ft.val_score}
    t = time.perf_counter()
    res = compare(out / "features.h5", out / "report", overwrite=True, progress=progress,
                  finetuned=[v["folder"] for v in tuned.values()],
                  **_compare_kwargs(plan.config))
    timings["compare_s"] = round(time.perf_counter() - t, 2)

    record = {
        "pipeline": str(plan.source) if plan.source else None, "config": plan.config,
        "versions": versions("torch", "torchvision", "scikit-learn", "python"),
        "timings": timings,
        "embed": {"rows": r.n_rows, "skipped": r.n_skipped, "reused": r.already_complete,
                  "resumed_from": r.resumed_from},
        "outputs": {"features": str(out / "features.h5"), "report": str(out / "report" / "report.md"),
                    "results": str(out / "report" / "results.json"),
                    "plot": str(out / "report" / "layer_depth.png"),
                    "best_head": str(out / "report" / "best.joblib")},
        "finetune": tuned,
        "winner": {k: res.winner[k] for k in ("layer", "head", "strategy", "balanced_accuracy",
                                               "accuracy")},
        "verdict": res.verdict,
    }
    config = dict(record["config"])
    if config["data"].get("storage_options"):  # may hold keys: only the public ones recorded
        from .data.remote import public_options

        config["data"] = {**config["data"],
                          "storage_options": public_options(config["data"]["storage_options"])}
    record["config"] = {"top": config.pop(""), **config}
    from .files import atomic_output

    with atomic_output(out / "run.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str))
    record["table"] = res.table()
    return record

