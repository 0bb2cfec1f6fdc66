"""Fine-tuned models in the comparison report: ``compare --finetuned ft/``.

A fine-tune folder (written by :func:`featurecache.finetune.finetune`) holds the kept
model's validation score (its selection score, from the train split only) and its
predictions on the test split. :func:`finetuned_rows` turns each folder into one row of the
comparison, beside the frozen heads, after checking that it was tested on exactly the test
rows of the compared feature file; the verdict's paragraph on strategies
(:func:`.verdict.strategy_verdict`): the margin of each fine-tuned model over the best frozen head, from a paired
bootstrap on the same test rows, and the time each took.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import FeaturecacheError, option
from .rows import FROZEN, FineTune, Row, Selection
from .select import LP_FT

__all__ = ["read_finetuned", "finetuned_rows", "same_paths", "split_settings_differ",
           "validation_fold", "score_on_fold", "FROZEN", "SPLIT_SETTINGS"]

# the settings that decide which images are in which split (the flag that sets each)
SPLIT_SETTINGS = {"seed": "--seed", "test_size": "--test-size", "max_per_class": "--max-per-class"}


def same_paths(paths) -> list:
    """The record ids in the form under which two ids name the same image (local paths
    resolved: the same images reached through a symlinked folder compare equal; ids with a
    scheme, such as a URL, as they are)."""
    from ..data import same_ids

    return same_ids(paths)


def split_settings_differ(a: dict, b: dict) -> str:
    """``"--seed 1 (the other: 0)"``: the split settings that differ between two provenances
    (only those both record; none when the split was given by the data), or ``""``."""
    if "given" in (a.get("split_origin"), b.get("split_origin")):
        keys = ["max_per_class"]  # the folders fix the split; only the cap can differ
    else:
        keys = list(SPLIT_SETTINGS)
    out = [f"{SPLIT_SETTINGS[k]} {_flag(a[k])} (the other: {_flag(b[k])})" for k in keys
           if k in a and k in b and a[k] != b[k]]
    return ", ".join(out)


def _flag(v):
    return "none" if v in (None, -1) else v


def read_finetuned(folder, first) -> dict:
    """The summary of a fine-tune folder, checked against the compared file ``first``:
    same classes, and test predictions for exactly its test rows.

    Raises:
        FeaturecacheError: not a fine-tune folder, other classes, or other test images.
    """
    folder = Path(folder)
    if folder.suffix == ".pt" and folder.is_file():  # ft/model.pt: its folder
        folder = folder.parent
    from ..files import published

    path = published(folder) / "summary.json" if folder.is_dir() else folder
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        raise FeaturecacheError(f"{folder} is not a fine-tune folder (no readable summary.json); "
                                f"make one with `featurecache finetune`.") from None
    if not isinstance(s, dict) or s.get("format") != "featurecache-finetune-summary":
        raise FeaturecacheError(f"{path} is not the summary of a `featurecache finetune` run.")
    if not (path.parent / "model.pt").is_file():
        raise FeaturecacheError(f"{path.parent} has a summary.json but no model.pt: the "
                                f"fine-tuned model is missing; run `featurecache finetune` again.")
    from ..checkpoint import run_id_of

    if s.get("run_id") != run_id_of(path.parent / "model.pt"):
        raise FeaturecacheError(f"{path.parent}: model.pt and summary.json come from two "
                                f"different fine-tune runs (one was interrupted while it "
                                f"replaced the other's files); run `featurecache finetune` "
                                f"again with {option('overwrite')}.")
    if s["classes"] != first.classes:
        raise FeaturecacheError(f"{folder} was fine-tuned on classes {s['classes']}, but "
                                f"{first.path} has {first.classes}.")
    test = s.get("test")
    if not test:
        raise FeaturecacheError(f"{folder} has no test predictions (its data had no test split).")
    mine = dict(zip(same_paths(test["paths"]), zip(test["labels"], test["predicted"])))
    theirs = same_paths(first.paths("test"))
    missing = [p for p in theirs if p not in mine]
    extra = len(set(mine) - set(theirs))
    if missing or extra:
        example = f" (e.g. {missing[0]} has no prediction)" if missing else ""
        differ = split_settings_differ(s.get("split", {}), first.provenance)
        why = (f"it was split with {differ}: fine-tune with the split the embed used "
               f"(or from the feature file itself)." if differ else
               "Fine-tune from the same data (or from the feature file itself).")
        raise FeaturecacheError(
            f"{folder} was tested on other images than the test split of {first.path}: "
            f"{len(missing)} of its {len(theirs)} test images missing, {extra} others"
            f"{example}; {why}")
    y = first.y("test")
    wrong = next((p for p, c in zip(theirs, y) if mine[p][0] != first.classes[c]), None)
    if wrong is not None:
        raise FeaturecacheError(f"{folder} labels {wrong} {mine[wrong][0]!r}, but {first.path} "
                                f"labels it {first.classes[y[theirs.index(wrong)]]!r}.")
    index = {c: i for i, c in enumerate(first.classes)}
    s["_pred"] = np.array([index[mine[p][1]] for p in theirs], dtype=np.int64)
    s["_folder"] = str(folder)
    return s


def finetuned_rows(summaries, files, names) -> list:
    """``[(row, test predictions)]``, one per fine-tune summary."""
    out = []
    for s in summaries:
        name = next((n for n, ff in zip(names, files) if ff.provenance["backbone"] == s["backbone"]),
                    s["backbone"])
        ff = next((ff for n, ff in zip(names, files) if n == name), files[0])
        final = ff.layers.get(s["final_layer"])
        deepest = max((l.depth for l in ff.layers.values()), default=1) or 1
        depth = final.depth if final is not None else deepest
        p, n_val = s["val_score"], max(s["n_val"], 1)
        origin = FineTune(folder=s["_folder"], from_layer=s["from_layer"],
                          final_layer=s["final_layer"], n_val=int(s["n_val"]),
                          seconds=s["seconds"], seconds_per_epoch=s["seconds_per_epoch"])
        row = Row(backbone=name, layer=s["final_layer"], head=LP_FT, strategy=s["strategy"],
                  depth=depth, rel_depth=round(min(depth / deepest, 1.0), 4),
                  dim=int(s["provenance"]["final_dim"]),
                  params={"epoch": s["best_epoch"], "lr": s["settings"]["lr"]},
                  cv_score=float(p), cv_std=0.0, cv_sem=math.sqrt(max(p * (1 - p), 0.0) / n_val),
                  grid_evaluated=len(s["history"]) - 1, grid_points=s["settings"]["epochs"],
                  origin=origin)
        out.append((row, s["_pred"]))
    return out


def validation_fold(summaries, first) -> tuple:
    """``(fit rows, validation rows)``, row numbers of the compared file ``first``: the
    validation fold the fine-tunes picked their epoch on (all must share it), and the other
    training rows. Every candidate of the comparison is scored on that fold.

    Raises:
        FeaturecacheError: a summary without its validation fold (an older fine-tune), two
            fine-tunes validated on different folds, or a fold row that is not a training row
            of ``first``.
    """
    folds = []
    for s in summaries:
        v = s.get("validation")
        if not v or not v.get("paths"):
            raise FeaturecacheError(
                f"{s['_folder']} does not record its validation fold (made by an older "
                f"featurecache), so it cannot be scored on the same rows as the frozen heads; "
                f"run `featurecache finetune` again.")
        folds.append(set(same_paths(v["paths"])))
    if any(f != folds[0] for f in folds[1:]):
        a, b = (s["_folder"] for s in summaries[:2])
        raise FeaturecacheError(
            f"{a} and {b} picked their epochs on different validation folds, so their scores "
            f"cannot be compared; fine-tune both with the same --seed and --val-fraction.")
    splits = np.array(first.splits(), dtype=object)
    train = np.flatnonzero(np.isin(splits, ["train", "val"]))
    where = dict(zip(same_paths(first.paths()), range(len(splits))))
    val = np.array(sorted(where.get(p, -1) for p in folds[0]), dtype=np.int64)
    if len(val) == 0 or val[0] < 0 or not np.isin(val, train).all():
        raise FeaturecacheError(
            f"{summaries[0]['_folder']} validated on images that are not training rows of "
            f"{first.path}; fine-tune from the same data (or from the feature file itself).")
    return np.setdiff1d(train, val), val


def score_on_fold(rows, jobs, fold, first, *, scoring, kernel, class_weight, seed,
                  n_jobs) -> list:
    """Each row's :class:`Selection` on the validation ``fold``: a frozen head is refit on
    the fold's other training rows with the parameters its CV chose and scored on the fold;
    a fine-tune brings its kept epoch's score on the same rows."""
    import joblib

    from ..heads import refit
    from ..scoring import score_predictions

    fit, val = fold
    y = first.y()
    frozen = [r for r in rows if r.strategy == FROZEN]
    arrays = {}
    for r in frozen:  # read once per layer, before the threads share them
        key = (r.backbone, r.layer)
        if key not in arrays:
            ff, layer = jobs[key]
            X = np.asarray(ff.X(layer), dtype=np.float32)
            arrays[key] = (X[fit], X[val])

    def one(r):
        Xf, Xv = arrays[(r.backbone, r.layer)]
        pipe = refit(Xf, y[fit], r.head, r.params, kernel=kernel,
                     class_weight=class_weight, seed=seed)
        return score_predictions(scoring, y[val], pipe.predict(Xv))

    scores = iter(joblib.Parallel(n_jobs=n_jobs, prefer="threads")(
        joblib.delayed(one)(r) for r in frozen))
    n = len(val)
    out = []
    for r in rows:  # a fine-tune: its kept epoch, on the same rows
        p = float(next(scores)) if r.strategy == FROZEN else float(r.cv_score)
        out.append(Selection(p, math.sqrt(max(p * (1 - p), 0.0) / n),
                             f"validation fold ({n} rows)"))
    return out
