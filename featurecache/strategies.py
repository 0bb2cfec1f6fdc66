"""Fine-tuned models in the comparison report: ``compare --finetuned ft/``.

A fine-tune folder (written by :func:`featurecache.finetune.finetune`) holds the kept
model's validation score (its selection score, from the train split only) and its
predictions on the test split. :func:`finetuned_rows` turns each folder into one row of the
comparison, beside the frozen heads, after checking that it was tested on exactly the test
rows of the compared feature file; :func:`strategy_text` is the verdict's paragraph on
strategies: the margin of each fine-tuned model over the best frozen head, from a paired
bootstrap on the same test rows, and the time each took.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import FeaturecacheError

__all__ = ["read_finetuned", "finetuned_rows", "strategy_text", "FROZEN"]

FROZEN = "frozen"


def read_finetuned(folder, first) -> dict:
    """The summary of a fine-tune folder, checked against the compared file ``first``:
    same classes, and test predictions for exactly its test rows.

    Raises:
        FeaturecacheError: not a fine-tune folder, other classes, or other test images.
    """
    folder = Path(folder)
    if folder.suffix == ".pt" and folder.is_file():  # ft/model.pt: its folder
        folder = folder.parent
    path = folder / "summary.json" if folder.is_dir() else folder
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
    if s["classes"] != first.classes:
        raise FeaturecacheError(f"{folder} was fine-tuned on classes {s['classes']}, but "
                                f"{first.path} has {first.classes}.")
    test = s.get("test")
    if not test:
        raise FeaturecacheError(f"{folder} has no test predictions (its data had no test split).")
    mine = dict(zip(test["paths"], zip(test["labels"], test["predicted"])))
    theirs = first.paths("test")
    missing = [p for p in theirs if p not in mine]
    extra = len(set(mine) - set(theirs))
    if missing or extra:
        example = f" (e.g. {missing[0]} has no prediction)" if missing else ""
        raise FeaturecacheError(
            f"{folder} was tested on other images than the test split of {first.path}: "
            f"{len(missing)} of its {len(theirs)} test images missing, {extra} others"
            f"{example}. Fine-tune from the same data (or the same feature file), with the "
            f"split the embed used (its --seed and --test-size).")
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
    """One comparison row per fine-tune summary (the keys of a frozen head's row, plus the
    strategy, the folder and the time)."""
    rows = []
    for s in summaries:
        name = next((n for n, ff in zip(names, files) if ff.provenance["backbone"] == s["backbone"]),
                    s["backbone"])
        ff = next((ff for n, ff in zip(names, files) if n == name), files[0])
        final = ff.layers.get(s["final_layer"])
        deepest = max((l.depth for l in ff.layers.values()), default=1) or 1
        depth = final.depth if final is not None else deepest
        p, n_val = s["val_score"], max(s["n_val"], 1)
        history = s["history"]
        rows.append({
            "backbone": name, "layer": f"{s['from_layer']}..{s['final_layer']}",
            "head": "lp-ft", "strategy": s["strategy"], "depth": depth,
            "rel_depth": round(min(depth / deepest, 1.0), 4),
            "dim": int(s["provenance"]["final_dim"]),
            "params": {"epoch": s["best_epoch"], "lr": s["settings"]["lr"]},
            "cv_score": float(p), "cv_std": 0.0, "n_val": int(s["n_val"]),
            "cv_sem": math.sqrt(max(p * (1 - p), 0.0) / n_val),
            "grid_evaluated": len(history) - 1, "grid_points": s["settings"]["epochs"],
            "seconds": s["seconds"], "seconds_per_epoch": s["seconds_per_epoch"],
            "folder": s["_folder"], "_pred": s["_pred"]})
    return rows


def strategy_text(rows, best_frozen, metric: str, frozen_seconds: float) -> str:
    """The verdict's sentences on fine-tuning: each fine-tuned row against the best frozen
    head (difference and paired-bootstrap interval on the same test rows), and the times."""
    tuned = [r for r in rows if r["strategy"] != FROZEN]
    if not tuned:
        return ""
    text = (f" Strategies: the best frozen head ({best_frozen['layer']}, {best_frozen['head']}) "
            f"scores {metric} {best_frozen[metric]:.3f} on test; the frozen heads took "
            f"{frozen_seconds:.0f} s in all (every layer and head, CV included).")
    for r in tuned:
        m = r["margin_over_frozen"]
        clear = m["lo"] > 0 or m["hi"] < 0
        verdict = ("beats it" if m["lo"] > 0 else "is worse") if clear else \
            "cannot be told apart from it on this test set"
        text += (f" {r['strategy'].capitalize()} of the blocks above {r['layer'].split('..')[0]} "
                 f"(kept epoch {r['params']['epoch']} of {r['grid_evaluated']}, validation "
                 f"{r['cv_score']:.3f}) scores {r[metric]:.3f}: {m['difference']:+.3f} (95% CI "
                 f"{m['lo']:+.3f} to {m['hi']:+.3f}, paired bootstrap), so it {verdict}; it took "
                 f"{r['seconds']:.0f} s ({r['seconds_per_epoch']} s per epoch).")
        if r["params"]["epoch"] == 0:
            text += (" It kept epoch 0: no epoch of fine-tuning beat its own linear probe on the "
                     "validation fold, so it was not a candidate for the choice.")
    return text
