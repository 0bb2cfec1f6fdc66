"""LP-FT: fine-tune the blocks above a stored feature map, from the cache or from images.

``finetune(feats.h5, "ft/", from_layer="stage4")`` never runs the frozen bottom of the network
again: the blocks above ``stage4`` (cut out of the backbone, :mod:`featurecache.topblocks`)
train on the map the embed kept (``--keep-map stage4``), read from HDF5 one batch at a time.
``finetune(DATA, "ft/", from_layer="stage4", augment=True)`` trains the same blocks on maps
computed from (augmented) images by the frozen bottom: the baseline a hand-written script
would be.

The recipe (Kumar et al. 2022, "linear probe, then fine-tune"):

1. hold out a stratified validation fold of the train split (``val_fraction``; a ``val``
   split when the data have one); the test split is not read until the end;
2. fit the logistic-regression head (C chosen by CV, as ``fit-head``) on the final pooled
   features the top blocks compute from the training maps, and fold its scaler into one
   linear layer: the model at step 0 predicts exactly what that linear probe predicts;
3. train the top blocks and the classifier with AdamW (the blocks at a tenth of the
   classifier's learning rate), a cosine schedule over all steps, BatchNorm statistics and
   dropout frozen, seeded shuffles;
4. score the validation fold after every epoch (epoch 0 = the probe) and keep the best epoch
   (ties: the earlier), stopping after ``patience`` epochs without a better score;
5. predict the test split once with the kept model.

It writes ``model.pt`` (:mod:`featurecache.checkpoint`), ``curve.png`` (loss and validation
score per epoch) and ``summary.json`` (history, timings, test predictions for ``compare
--finetuned``).

Example::

    >>> r = finetune("feats.h5", "ft/", from_layer="stage4")          # doctest: +SKIP
    >>> r.best_epoch, round(r.val_score, 3)                          # doctest: +SKIP
    (3, 0.812)
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import FeaturecacheError
from .feeds import holdout, open_feed, warn_small_fold
from .options import DEFAULT_BACKBONE, FINETUNE, check

__all__ = ["finetune", "FinetuneResult"]

OUTPUT_FILES = ("model.pt", "curve.png", "summary.json")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: the history (epoch 0 = the linear probe), the kept epoch,
    its validation score, the test scores of the kept model, and the time taken."""

    out_dir: Path
    source: str                 # cache | images
    history: list
    best_epoch: int
    val_score: float
    test: dict
    seconds: float
    summary: dict


def finetune(source, output, *, from_layer: str = "stage4", augment: bool = False,
             epochs: int = 5, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 32,
             val_fraction: float = 0.2, patience: int = 2, scoring: str = "balanced_accuracy",
             seed: int = 0, device: str | None = None, num_workers: int | None = None,
             backbone=DEFAULT_BACKBONE, weights: str = "DEFAULT", weights_file=None,
             test_size: float = 0.3, max_per_class: int | None = None,
             overwrite: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune the blocks above ``from_layer`` with a linear-probe start; write ``output/``.

    Args:
        source: a feature file that kept the map of ``from_layer`` (``embed --keep-map``), or
            images (a folder, a CSV manifest, ``builtin:digits``; then ``backbone`` (a
            name or a loaded :class:`~featurecache.backbones.Backbone`),
            ``weights``, ``weights_file``, ``test_size``, ``max_per_class`` as for embed).
        output: the folder for model.pt, curve.png and summary.json.
        from_layer: the layer whose map feeds the unfrozen blocks above it.
        augment: from images only: random resized crops and horizontal flips.
        epochs, lr, weight_decay, batch_size: AdamW on the classifier at ``lr`` and on the
            blocks at ``lr / 10``, cosine schedule over ``epochs``.
        val_fraction, patience, scoring: the validation fold, early stopping, and the score
            that picks the epoch.
        overwrite: replace the files of an earlier fine-tune in ``output``.

    Raises:
        FeaturecacheError: bad options, a map that was not kept, a layer at or above the
            final pooled layer, a layer the network cannot be cut at; nothing is written.
    """
    from .search import check_options

    t0 = time.perf_counter()
    check(FINETUNE, {"from_layer": from_layer, "augment": augment, "epochs": epochs, "lr": lr,
                     "weight_decay": weight_decay, "batch_size": batch_size,
                     "val_fraction": val_fraction, "patience": patience})
    check_options(scoring=scoring)
    from .files import output_folder

    out = output_folder(output, overwrite, "fine-tune")
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    torch.manual_seed(seed)
    from .extract import default_device, on_device

    dev = default_device(device)
    feed, bb, prov = open_feed(source, from_layer, augment, dev, backbone=backbone,
                           weights=weights, weights_file=weights_file, test_size=test_size,
                           seed=seed, max_per_class=max_per_class, num_workers=num_workers)
    train, val = holdout(feed.labels, feed.splits, val_fraction, seed)
    warn_small_fold(feed, train, val)
    test = np.flatnonzero(feed.splits == "test")
    classes = prov.pop("classes")
    from .topblocks import TopModel, split_top

    model = TopModel(split_top(bb.model, prov["from_node"], prov["final_node"]),
                     prov["final_kind"], prov["final_pool"], prov["final_dim"], len(classes))
    say(f"fine-tuning the blocks of {bb.name} above {from_layer} ({prov['from_node']}) from "
        f"the {feed.source}: {len(train)} training rows, {len(val)} validation rows")
    with on_device(bb.model, dev), on_device(model, dev):
        probe_loss, probe_s = _linear_probe(model, feed, train, batch_size, scoring, seed, say)
        history, best = _train(model, feed, train, val, epochs=epochs, lr=lr,
                               weight_decay=weight_decay, batch_size=batch_size,
                               patience=patience, scoring=scoring, seed=seed, dev=dev,
                               probe=(probe_loss, probe_s), say=say)
        model.load_state_dict(best["state"])
        test_rows = _test_rows(model, feed, test, batch_size, classes) if len(test) else None
    seconds = time.perf_counter() - t0
    if getattr(feed, "failed", None):
        say(f"{len(feed.failed)} image(s) could not be read and were left out (listed in "
            f"summary.json under \"unreadable\")")
    settings = {"epochs": epochs, "lr": lr, "body_lr": lr / 10, "weight_decay": weight_decay,
                "batch_size": batch_size, "val_fraction": val_fraction, "patience": patience,
                "scoring": scoring, "seed": seed, "augment": augment, "device": str(dev)}
    summary = _summary(feed, prov, classes, settings, history, best, train, val, test_rows,
                       seconds)
    _write(out, model, classes, prov, history, settings, summary, best["epoch"], scoring)
    return FinetuneResult(out, feed.source, history, best["epoch"], best["score"],
                          summary["test"], seconds, summary)


def _run_eval(model, feed, rows, batch_size, dev):
    """``(positions, features, logits)`` of ``rows`` with the model as it is (no grad)."""
    from .extract import to_layout

    model.eval()
    pos, feats, logits = [], [], []
    with torch.inference_mode():
        for p, maps in feed.batches(rows, batch_size):
            f = model.features(to_layout(maps.to(dev)))
            pos.append(p)
            feats.append(f.float().cpu())
            logits.append(model.fc(f).float().cpu())
    if not pos:
        raise FeaturecacheError("no image of this part of the data could be read.")
    return np.concatenate(pos), torch.cat(feats), torch.cat(logits)


def _linear_probe(model, feed, train, batch_size, scoring, seed, say) -> tuple:
    """Fit the logistic head on the final pooled features of the training rows, fold it into
    ``model.fc``; returns its training loss and the seconds taken."""
    from .heads import search
    from .search import make_folds
    from .topblocks import fold_logistic

    t = time.perf_counter()
    dev = model.fc.weight.device
    pos, X, _ = _run_eval(model, feed, train, batch_size, dev)
    y = feed.labels[train[pos]]
    counts = np.bincount(y, minlength=len(feed.classes))
    few = [feed.classes[c] for c in np.flatnonzero((counts > 0) & (counts < 2))]
    if few:
        raise FeaturecacheError(
            f"classes {few} have a single training image once the validation fold is held "
            f"out; the linear probe needs at least 2 per class (3 to hold one out). Add images "
            f"of them, or leave them out of the data.")
    folds = make_folds(y, min(5, int(counts[counts > 0].min())), seed)  # as fit-head, 5-fold
    pipe, params, cv, _ = search(X.numpy(), y, "logreg", scoring=scoring, seed=seed,
                                 folds=folds)
    w, b = fold_logistic(pipe, model.fc.out_features)
    with torch.no_grad():
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(b)
        loss = torch.nn.functional.cross_entropy(model.fc(X.to(dev)), torch.from_numpy(y).to(dev))
    say(f"linear probe: C={params['C']:.3g}, CV {scoring} {cv:.3f}")
    return float(loss), time.perf_counter() - t


def _validate(model, feed, val, batch_size, scoring, dev) -> tuple:
    from .solvers import score_predictions

    pos, _, logits = _run_eval(model, feed, val, batch_size, dev)
    y = torch.from_numpy(feed.labels[val[pos]])
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return score_predictions(scoring, y.numpy(), logits.argmax(1).numpy()), loss


def _train(model, feed, train, val, *, epochs, lr, weight_decay, batch_size, patience, scoring,
           seed, dev, probe, say) -> tuple:
    """The epochs; returns the history and the best epoch (its state, score and number)."""
    from .extract import to_layout

    t = time.perf_counter()
    score, val_loss = _validate(model, feed, val, batch_size, scoring, dev)
    history = [{"epoch": 0, "train_loss": probe[0], "val_loss": val_loss, "val_score": score,
                "train_seconds": round(probe[1], 3),
                "val_seconds": round(time.perf_counter() - t, 3)}]
    say(f"epoch 0 (linear probe): validation {scoring} {score:.3f}")
    best = {"epoch": 0, "score": score, "state": copy.deepcopy(model.state_dict())}
    opt = torch.optim.AdamW([{"params": model.body_parameters(), "lr": lr / 10},
                             {"params": list(model.fc.parameters()), "lr": lr}],
                            weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    rng = np.random.default_rng([seed, 11])
    stale = 0
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        model.train()
        order = train[rng.permutation(len(train))]
        total, n = 0.0, 0
        for pos, maps in feed.batches(order, batch_size, train=True):
            y = torch.from_numpy(feed.labels[order[pos]]).to(dev)
            loss = torch.nn.functional.cross_entropy(model(to_layout(maps.to(dev))), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(pos), n + len(pos)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        score, val_loss = _validate(model, feed, val, batch_size, scoring, dev)
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
                        "val_score": score, "train_seconds": round(train_s, 3),
                        "val_seconds": round(time.perf_counter() - t, 3)})
        better = score > best["score"]
        say(f"epoch {epoch}: training loss {total / max(n, 1):.4f}, validation {scoring} "
            f"{score:.3f}{' (best so far)' if better else ''}, {train_s:.1f} s")
        if better:
            best, stale = {"epoch": epoch, "score": score,
                           "state": copy.deepcopy(model.state_dict())}, 0
        else:
            stale += 1
            if stale >= patience:
                if epoch < epochs:
                    say(f"stopping: {patience} epoch(s) without a better validation score")
                break
    return history, best


def _test_rows(model, feed, test, batch_size, classes) -> dict:
    """Predictions of the kept model on the test rows (read here, once)."""
    from .stats import point_metrics

    dev = model.fc.weight.device
    pos, _, logits = _run_eval(model, feed, test, batch_size, dev)
    rows = test[pos]
    y, pred = feed.labels[rows], logits.argmax(1).numpy()
    return {"n": int(len(y)), **point_metrics(y, pred, len(classes)),
            "paths": [feed.paths[i] for i in rows], "labels": [classes[i] for i in y],
            "predicted": [classes[i] for i in pred]}


def _summary(feed, prov, classes, settings, history, best, train, val, test, seconds) -> dict:
    epochs = [h["train_seconds"] for h in history[1:]]
    return {"format": "featurecache-finetune-summary", "strategy": f"fine-tune ({feed.source})",
            "source": feed.source, "from_layer": prov["from_layer"],
            "final_layer": prov["final_layer"], "backbone": prov["backbone"],
            "classes": list(classes), "provenance": prov, "settings": settings,
            "n_train": int(len(train)), "n_val": int(len(val)), "history": history,
            "best_epoch": best["epoch"], "val_score": best["score"],
            "probe_val_score": history[0]["val_score"],
            "seconds": round(seconds, 2),
            "seconds_per_epoch": round(float(np.mean(epochs)), 3) if epochs else None,
            "unreadable": [{"path": feed.paths[i], "reason": why}
                           for i, why in sorted(getattr(feed, "failed", {}).items())],
            "test": test}


def _write(out, model, classes, prov, history, settings, summary, best_epoch, scoring) -> None:
    """Write model.pt, curve.png and summary.json through a staging folder inside ``out``:
    a kill leaves the previous fine-tune's files whole."""
    from .checkpoint import save_finetuned
    from .files import fsync_dir
    from .plots import plot_curve

    out.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".finetune-", dir=out))
    try:
        save_finetuned(staging / "model.pt", model, classes, prov, history, settings)
        plot_curve(staging / "curve.png", history, best_epoch, scoring)
        (staging / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        for name in OUTPUT_FILES:  # summary.json, the index, last
            (staging / name).replace(out / name)
        fsync_dir(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
