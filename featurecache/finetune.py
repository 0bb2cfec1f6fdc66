"""LP-FT: fine-tune the blocks above a stored feature map, from the cache or from images.

``finetune(feats.h5, "ft/", from_layer="stage4")`` never runs the frozen bottom of the network
again: the blocks above ``stage4`` (cut out of the backbone, :mod:`featurecache.topblocks`)
train on the map the embed kept (``--keep-map stage4``), read from HDF5 one batch at a time.
``finetune(DATA, "ft/", from_layer="stage4", augment=True)`` trains the same blocks on maps
computed from (augmented) images by the frozen bottom: the baseline a hand-written script
would be.

The recipe (Kumar et al. 2022, "linear probe, then fine-tune"), built so that it never
does much worse than its own probe:

1. hold out a stratified validation fold of the train split (``val_fraction``; a ``val``
   split when the data have one); the test split is not read until the end;
2. fit the logistic-regression head (C chosen by CV, as ``fit-head``) on the final pooled
   features the top blocks compute from the training maps, and fold its scaler into one
   linear layer: the model at step 0 predicts exactly what that linear probe predicts;
3. train the top blocks and the classifier with Adam (the blocks at a tenth of the
   classifier's learning rate): a linear warm-up over the first epoch (the first steps of
   Adam are full-size whatever the gradient, and undid the probe), then a cosine decay over
   all epochs; weight decay pulls every weight towards its starting value (the pretrained
   blocks, the probe's classifier: L2-SP), not towards zero; BatchNorm statistics and
   dropout frozen, seeded shuffles;
4. score the validation fold after every epoch (epoch 0 = the probe) and keep the best
   epoch only if it beats the probe by more than the fold's noise (two standard errors of
   the paired difference, bootstrapped over the fold's rows); otherwise the probe is kept
   (epoch 0). Early stopping after ``patience`` epochs without a better score;
5. ``refit="all"`` (default): retrain from the start on every training row, the validation
   fold included: the probe refit on all of them, then the chosen number of epochs on the
   same schedule (none when epoch 0 was kept: the model is then the logistic head that
   ``fit-head`` would fit on those features);
6. predict the test split once with the final model.

It writes ``model.pt`` (:mod:`featurecache.checkpoint`), ``curve.png`` (loss and validation
score per epoch) and ``summary.json`` (history with the training and validation loss and
score per epoch, the kept epoch and its margin over the probe, the validation fold and the
kept model's predictions on it, timings, and test predictions for ``compare --finetuned``).

Example::

    >>> r = finetune("feats.h5", "ft/", from_layer="stage4")          # doctest: +SKIP
    >>> r.best_epoch, round(r.val_score, 3)                          # doctest: +SKIP
    (3, 0.812)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import FeaturecacheError
from .feeds import holdout, open_feed, warn_small_fold
from .options import DEFAULT_BACKBONE, validated

__all__ = ["finetune", "FinetuneResult", "MARGIN_SE"]

OUTPUT_FILES = ("model.pt", "curve.png", "summary.json")
MARGIN_SE = 2.0  # an epoch replaces the probe only when it beats it by this many standard errors


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: the history (epoch 0 = the linear probe), the kept epoch,
    its validation score, the test scores of the final model, and the time taken."""

    out_dir: Path
    source: str                 # cache | images
    history: list
    best_epoch: int
    val_score: float
    test: dict
    seconds: float
    summary: dict


@contextlib.contextmanager
def seeded_rng(seed: int, device=None):
    """torch's random state seeded with ``seed`` for the block and put back afterwards (also
    when it raises), as the backbones do with ``fork_rng``: a library caller's own draws are
    not moved by a fine-tune, and the fine-tune's are its seed's. The CPU generator, and the
    CUDA ones when ``device`` is (or defaults to) a GPU; a CPU run leaves CUDA alone."""
    try:
        cuda = torch.cuda.is_available() and (not device or torch.device(device).type == "cuda")
    except (RuntimeError, ValueError):
        cuda = False  # not a device name: the fine-tune itself says so
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield


def _own_rng(fn):
    """Run ``fn`` inside :func:`seeded_rng` of its ``seed`` and ``device`` arguments."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with seeded_rng(bound.arguments["seed"], bound.arguments["device"]):
            return fn(*args, **kwargs)
    return call


@validated("finetune")
@_own_rng  # seeded, and torch's global random state as it was once the call returns
def finetune(source, output, *, from_layer: str = "stage4", augment: bool = False,
             epochs: int = 5, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 32,
             val_fraction: float = 0.2, patience: int = 2, refit: str = "all",
             scoring: str = "balanced_accuracy",
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
        epochs, lr, weight_decay, batch_size: Adam on the classifier at ``lr`` and on the
            blocks at ``lr / 10``, warm-up over the first epoch then cosine over ``epochs``;
            decoupled weight decay towards the starting weights.
        val_fraction, patience, scoring: the validation fold, early stopping, and the score
            that picks the epoch.
        refit: ``all``: retrain on every training row (validation fold included) for the
            chosen number of epochs; ``none``: keep the chosen epoch's model as trained.
        overwrite: replace the files of an earlier fine-tune in ``output``.

    Raises:
        FeaturecacheError: bad options, a map that was not kept, a layer at or above the
            final pooled layer, a layer the network cannot be cut at, a class with no
            training rows; nothing is written.
    """
    t0 = time.perf_counter()  # every option is checked already (options.validated)
    from .files import output_folder

    out = output_folder(output, overwrite, "fine-tune")
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    from .extract import default_device, on_device  # (torch's RNG is seeded: _own_rng)

    dev = default_device(device)
    feed, bb, prov = open_feed(source, from_layer, augment, dev, backbone=backbone,
                           weights=weights, weights_file=weights_file, test_size=test_size,
                           seed=seed, max_per_class=max_per_class, num_workers=num_workers)
    _check_trained_classes(feed, source)
    train, val = holdout(feed.labels, feed.splits, val_fraction, seed)
    warn_small_fold(feed, train, val)
    test = np.flatnonzero(feed.splits == "test")
    classes = prov.pop("classes")
    from .topblocks import TopModel, split_top

    model = TopModel(split_top(bb.model, prov["from_node"], prov["final_node"]),
                     prov["final_kind"], prov["final_pool"], prov["final_dim"], len(classes))
    pretrained = copy.deepcopy(model.state_dict())
    say(f"fine-tuning the blocks of {bb.name} above {from_layer} ({prov['from_node']}) from "
        f"the {feed.source}: {len(train)} training rows, {len(val)} validation rows")
    kw = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
              seed=seed, dev=dev)
    with on_device(bb.model, dev), on_device(model, dev):
        probe_loss, probe_s = _linear_probe(model, feed, train, batch_size, scoring, seed, say)
        history, best = _train(model, feed, train, val, patience=patience, scoring=scoring,
                               probe=(probe_loss, probe_s), say=say, **kw)
        validation = {"paths": [feed.paths[i] for i in val[best["pos"]]],
                      "labels": [classes[i] for i in feed.labels[val[best["pos"]]]],
                      "predicted": [classes[i] for i in best["pred"]]}
        final = {"rows": "train"}
        if refit == "all":
            every = np.sort(np.concatenate([train, val]))
            t = time.perf_counter()
            say(f"refit on all {len(every)} training rows: the probe, then {best['epoch']} "
                f"epoch(s)")
            model.load_state_dict(pretrained)
            loss, _ = _linear_probe(model, feed, every, batch_size, scoring, seed, say)
            losses = _fit_epochs(model, feed, every, stop_after=best["epoch"], **kw) \
                if best["epoch"] else []
            final = {"rows": "all", "n": int(len(every)), "epochs": best["epoch"],
                     "train_loss": [loss, *losses], "seconds": round(time.perf_counter() - t, 2)}
        else:
            model.load_state_dict(best["state"])
        test_rows = _test_rows(model, feed, test, batch_size, classes) if len(test) else None
    seconds = time.perf_counter() - t0
    if getattr(feed, "failed", None):
        say(f"{len(feed.failed)} image(s) could not be read and were left out (listed in "
            f"summary.json under \"unreadable\")")
    settings = {"epochs": epochs, "lr": lr, "body_lr": lr / 10, "weight_decay": weight_decay,
                "weight_decay_to": "start (L2-SP)", "warmup_epochs": 1, "optimizer": "adam",
                "batch_size": batch_size, "val_fraction": val_fraction, "patience": patience,
                "refit": refit, "margin_se": MARGIN_SE,
                "scoring": scoring, "seed": seed, "augment": augment, "device": str(dev)}
    summary = _summary(feed, prov, classes, settings, history, best, train, val, test_rows,
                       seconds)
    summary.update(validation=validation, final_fit=final)
    _write(out, model, classes, prov, history, settings, summary, best["epoch"], scoring)
    return FinetuneResult(out, feed.source, history, best["epoch"], best["score"],
                          summary["test"], seconds, summary)


def _check_trained_classes(feed, source) -> None:
    """Refuse a class with no training rows, as fit-head and compare do: a fine-tune cannot
    learn it (and would score it as if it had)."""
    trained = set(feed.labels[feed.splits == "train"].tolist())
    absent = [c for i, c in enumerate(feed.classes) if i not in trained]
    if absent:
        raise FeaturecacheError(
            f"classes {absent} of {source} have no training rows (they occur only in other "
            f"splits); a fine-tune cannot learn them. Add training images of them, or leave "
            f"them out of the data.")


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
    say(f"linear probe on {len(y)} rows: C={params['C']:.3g}, CV {scoring} {cv:.3f}")
    return float(loss), time.perf_counter() - t


def _validate(model, feed, val, batch_size, scoring, dev) -> tuple:
    """``(score, loss, positions, predictions)`` of the model on the validation rows."""
    from .scoring import score_predictions

    pos, _, logits = _run_eval(model, feed, val, batch_size, dev)
    y = torch.from_numpy(feed.labels[val[pos]])
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    pred = logits.argmax(1).numpy()
    return score_predictions(scoring, y.numpy(), pred), loss, pos, pred


def margin_over_probe(y, probe_pred, pred, n_classes, scoring, seed) -> tuple:
    """``(difference, standard error)`` of the score of ``pred`` minus that of ``probe_pred``
    on the same rows: the point difference and the standard deviation of the paired
    bootstrap (1000 resamples of the rows, seeded)."""
    from .stats import SCORING_METRIC, bootstrap, point_metrics

    metric = SCORING_METRIC[scoring]
    a, b = point_metrics(y, pred, n_classes)[metric], point_metrics(y, probe_pred, n_classes)[metric]
    samples = bootstrap(y, np.stack([pred, probe_pred]), n_classes, 1000, seed)[metric]
    return float(a - b), float(np.nanstd(samples[:, 0] - samples[:, 1]))


def _optimizer(model, *, lr, weight_decay, steps, warmup):
    """Adam (no decay of its own), warm-up then cosine; and the L2-SP step: after each
    optimizer step every weight moves ``lr * weight_decay`` of the way back to where it
    started (the pretrained blocks, the probe's classifier)."""
    groups = [{"params": model.body_parameters(), "lr": lr / 10},
              {"params": list(model.fc.parameters()), "lr": lr}]
    opt = torch.optim.Adam(groups)
    anchors = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def pull_back():
        if weight_decay:
            with torch.no_grad():
                for g, start in zip(opt.param_groups, anchors):
                    for p, p0 in zip(g["params"], start):
                        p.sub_(p - p0, alpha=g["lr"] * weight_decay)
    return opt, sched, pull_back


def _epochs(model, feed, rows, *, epochs, lr, weight_decay, batch_size, seed, dev):
    """The training epochs over ``rows``, one at a time: yields ``(epoch, mean loss, share
    of the epoch's rows predicted right while training, seconds)``. The schedule is always
    that of ``epochs`` epochs of ``rows``: stopping after k of them gives the model a run of
    k epochs in a longer one would have."""
    from .extract import to_layout

    per_epoch = math.ceil(len(rows) / batch_size)
    opt, sched, pull_back = _optimizer(model, lr=lr, weight_decay=weight_decay,
                                       steps=epochs * per_epoch, warmup=per_epoch)
    rng = np.random.default_rng([seed, 11])
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        model.train()
        order = rows[rng.permutation(len(rows))]
        total, right, n = 0.0, 0, 0
        for pos, maps in feed.batches(order, batch_size, train=True):
            y = torch.from_numpy(feed.labels[order[pos]]).to(dev)
            logits = model(to_layout(maps.to(dev)))
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pull_back()
            sched.step()
            total, n = total + loss.item() * len(pos), n + len(pos)
            right += int((logits.detach().argmax(1) == y).sum())
        yield epoch, total / max(n, 1), right / max(n, 1), time.perf_counter() - t


def _fit_epochs(model, feed, rows, *, stop_after, epochs, lr, weight_decay, batch_size, seed,
                dev) -> list:
    """Train ``stop_after`` epochs of the ``epochs``-epoch schedule on ``rows``; the losses."""
    losses = []
    for epoch, loss, _, _ in _epochs(model, feed, rows, epochs=epochs, lr=lr,
                                     weight_decay=weight_decay, batch_size=batch_size,
                                     seed=seed, dev=dev):
        losses.append(loss)
        if epoch >= stop_after:
            break
    return losses


def _train(model, feed, train, val, *, epochs, lr, weight_decay, batch_size, patience, scoring,
           seed, dev, probe, say) -> tuple:
    """The epochs, scored on the validation fold; returns the history and the kept epoch (its
    state, score, number, validation predictions): the best epoch if it beats the probe by
    more than :data:`MARGIN_SE` standard errors of the paired difference, else the probe."""
    t = time.perf_counter()
    score, val_loss, pos, probe_pred = _validate(model, feed, val, batch_size, scoring, dev)
    y_val = feed.labels[val[pos]]
    history = [{"epoch": 0, "train_loss": probe[0], "train_score": None, "val_loss": val_loss,
                "val_score": score, "margin": 0.0, "margin_se": 0.0,
                "train_seconds": round(probe[1], 3),
                "val_seconds": round(time.perf_counter() - t, 3)}]
    say(f"epoch 0 (linear probe): validation {scoring} {score:.3f} ({len(y_val)} rows)")
    probe_state, history_pos = copy.deepcopy(model.state_dict()), pos
    top = {"epoch": 0, "score": score, "state": probe_state, "pos": pos, "pred": probe_pred}
    stale = 0
    for epoch, loss, right, train_s in _epochs(model, feed, train, epochs=epochs, lr=lr,
                                               weight_decay=weight_decay,
                                               batch_size=batch_size, seed=seed, dev=dev):
        t = time.perf_counter()
        score, val_loss, pos, pred = _validate(model, feed, val, batch_size, scoring, dev)
        diff, se = margin_over_probe(y_val, probe_pred, pred, len(feed.classes), scoring,
                                     seed)
        history.append({"epoch": epoch, "train_loss": loss, "train_score": right,
                        "val_loss": val_loss, "val_score": score, "margin": diff,
                        "margin_se": se, "train_seconds": round(train_s, 3),
                        "val_seconds": round(time.perf_counter() - t, 3)})
        better = score > top["score"]
        say(f"epoch {epoch}: training loss {loss:.4f}, validation loss {val_loss:.3f}, "
            f"{scoring} {score:.3f} ({diff:+.3f} ± {se:.3f} over the probe)"
            f"{' (best so far)' if better else ''}, {train_s:.1f} s")
        if better:
            top, stale = {"epoch": epoch, "score": score, "pos": pos, "pred": pred,
                          "state": copy.deepcopy(model.state_dict())}, 0
        else:
            stale += 1
            if stale >= patience:
                if epoch < epochs:
                    say(f"stopping: {patience} epoch(s) without a better validation score")
                break
    h = history[top["epoch"]]
    if top["epoch"] and not h["margin"] > MARGIN_SE * h["margin_se"]:
        say(f"keeping the probe: epoch {top['epoch']} beats it by {h['margin']:+.3f}, within "
            f"{MARGIN_SE:g} standard errors ({h['margin_se']:.3f}) on {len(y_val)} rows")
        top = {"epoch": 0, "score": history[0]["val_score"], "state": probe_state,
               "pos": history_pos, "pred": probe_pred}
    return history, top


def _test_rows(model, feed, test, batch_size, classes) -> dict:
    """Predictions of the final model on the test rows (read here, once)."""
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
            "split": prov.get("split", {}),
            "n_train": int(len(train)), "n_val": int(len(val)), "history": history,
            "best_epoch": best["epoch"], "val_score": best["score"],
            "probe_val_score": history[0]["val_score"],
            "seconds": round(seconds, 2),
            "seconds_per_epoch": round(float(np.mean(epochs)), 3) if epochs else None,
            "unreadable": [{"path": feed.paths[i], "reason": why}
                           for i, why in sorted(getattr(feed, "failed", {}).items())],
            "test": test}


def _write(out, model, classes, prov, history, settings, summary, best_epoch, scoring) -> None:
    """Write model.pt, curve.png and summary.json as one unit (:func:`files.publish_folder`):
    a kill at any call leaves the previous fine-tune whole, or the new one. Both model.pt and
    summary.json carry the run id, so a reader can refuse files of two runs."""
    from .checkpoint import save_finetuned
    from .files import publish_folder
    from .plots import plot_curve

    def write(folder):
        run = folder.name
        save_finetuned(folder / "model.pt", model, classes, prov, history, settings, run_id=run)
        plot_curve(folder / "curve.png", history, best_epoch, scoring)
        (folder / "summary.json").write_text(json.dumps({**summary, "run_id": run}, indent=1,
                                                        default=str))

    publish_folder(out, write, legacy=OUTPUT_FILES)
