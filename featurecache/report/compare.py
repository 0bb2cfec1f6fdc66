"""Layer-depth comparison: every backbone x layer x head, selected by CV, reported on test.

:func:`compare` searches every head kind on every stored layer (of one feature file, or of
several files of the same images made with different backbones), all on the same CV folds
of the train split, and picks the winner **by the cross-validated score** (``--select cv``),
or the narrowest / shallowest candidate within one standard error of the best
(``--select cv-1se``). The test split is read once, after the selection, to report: metrics
with bootstrap 95% intervals, and a paired bootstrap of the winner's lead over the runner-up
on the same test rows. With ``shots``, every row is also refit on k images per class (seeded
draws, repeated) to answer "how many labels do I need?".

It writes into one folder:

* ``results.csv`` / ``results.json``: one row per backbone x layer x head;
* ``report.md``: the table ordered by depth, the winner in bold, and the verdict;
* ``report.html``: the same as one self-contained page (sortable table, inline SVG plots);
* ``layer_depth.png``: test score vs depth, one line per backbone x head;
* ``few_shot.png`` (with ``shots``): test score vs labelled images per class;
* ``confusion.png``: the winner's confusion matrix on the test split;
* ``heads/*.joblib`` and ``best.joblib`` (the winning frozen head), ready for ``predict``.

With ``finetuned`` folders (``featurecache finetune``), each fine-tuned model is a row too
(``strategy`` column: ``frozen`` or ``fine-tune (cache|images)``), selected by its validation
score (a fold of the train split) beside the frozen heads' CV scores (one that kept epoch 0,
its own linear probe, is not a candidate); the verdict gives its
margin over the best frozen head (paired bootstrap on the same test rows) and the time each
took.

Example::

    >>> res = compare("feats.h5", "reports/run1", heads=["logreg", "knn"])   # doctest: +SKIP
    >>> print(res.verdict)                                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import FeaturecacheError, HeadError
from ..options import SELECT, validated
from ..options import class_weight as sklearn_class_weight
from ..search import HEAD_KINDS
from ..stats import SCORING_METRIC
from .fewshot import check_shots, feasible_shots, refit_few_shot
from .rows import FROZEN, FrozenHead, Row
from .select import select_winner
from .evaluate import score_on_test
from .verdict import build_verdict, format_minutes, strategy_verdict
from .writers import ReportData, markdown_table, own_files, write_report

__all__ = ["compare", "CompareResult", "SELECT", "select_winner"]


@dataclass
class CompareResult:
    """Rows (one per backbone x layer x head, in depth order), the winner, the verdict
    (markdown; ``verdict_data`` is the same as data)."""

    rows: list
    winner: Row
    verdict: str
    out_dir: Path
    verdict_data: object = None

    def table(self) -> str:
        return markdown_table(self.rows, self.winner)


def _open_all(features) -> list:
    """Open the feature files and check that they hold the same images, labels and splits."""
    from ..store import FeatureFile, open_features

    items = features if isinstance(features, (list, tuple)) else [features]
    if not items:
        raise FeaturecacheError("no feature file given.")
    files = [f if isinstance(f, FeatureFile) else open_features(f) for f in items]
    first = files[0]
    from .strategies import same_paths, split_settings_differ

    for ff in files[1:]:
        where = f"{ff.path} and {first.path} are not of the same images"
        differ = split_settings_differ(ff.provenance, first.provenance)
        fix = (f" They were embedded with {differ} for the second: embed both with the same "
               f"split settings." if differ else "")
        if ff.classes != first.classes:
            raise FeaturecacheError(f"{where}: classes {ff.classes} vs {first.classes}.")
        if ff.n_rows != first.n_rows:
            raise FeaturecacheError(f"{where}: {ff.n_rows} vs {first.n_rows} rows." +
                                    (fix or " Embed the same data with each backbone to "
                                     "compare them."))
        for name, a, b in (("path", ff.paths(), first.paths()), ("split", ff.splits(), first.splits()),
                           ("label", ff.y().tolist(), first.y().tolist())):
            bad = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
            if bad is not None and name == "path":  # the same images through a symlink?
                ra, rb = same_paths(a), same_paths(b)
                bad = next((i for i, (u, v) in enumerate(zip(ra, rb)) if u != v), None)
            if bad is not None:
                raise FeaturecacheError(f"{where}: row {bad} has {name} {a[bad]!r} in the first "
                                        f"and {b[bad]!r} in the second.{fix}")
    return files


def _labels(files) -> list:
    """A short name per file for the backbone column: the backbone, or the file name when two
    files share a backbone."""
    from ..files import same_file

    for i, a in enumerate(files):
        for b in files[:i]:
            if same_file(a.path, b.path):
                raise FeaturecacheError(f"{a.path} is given twice; give each feature file once.")
    names = [ff.provenance["backbone"] for ff in files]
    if len(set(names)) < len(names):
        names = [ff.path.name.removesuffix(".h5") for ff in files]
    if len(set(names)) < len(names):  # same backbone and file name, in different folders
        names = [str(ff.path.with_suffix("")) for ff in files]
    return names


@validated("compare")
def compare(features, out_dir, *, heads=("logreg", "svm", "knn"), layers=(), extra_layers=(),
            kernel: str = "linear", cv: int = 5, scoring: str = "balanced_accuracy",
            select: str = "cv", class_weight: str | None = "none", seed: int = 0, n_jobs=-1,
            n_boot: int = 1000, shots=(), repeats: int = 3, overwrite: bool = False,
            progress: bool = True, cluster: str | None = None,
            mlp_widths=(256, 1024), finetuned=(), max_head_minutes: float = 10.0) -> CompareResult:
    """Fit every head on every layer (of every file), pick a winner by CV, write the report.

    Args:
        features: a feature file path or :class:`~featurecache.store.FeatureFile`, or a list
            of them for several backbones over the same images.
        layers: stored layers to compare (default: all of each file's).
        heads: head kinds (``logreg``, ``svm``, ``knn``, ``mlp``); ``mlp_widths``: the
            hidden widths the ``mlp`` head searches.
        extra_layers: concatenations such as ``"blocks.5+avgpool"``, each its own row.
        scoring: the CV score (``balanced_accuracy``, ``accuracy``, ``f1_macro``).
        select: ``cv`` (best CV score) or ``cv-1se`` (simplest within one standard error).
        shots: few-shot sizes, e.g. ``(1, 5, 10, "all")``: refit each row on that many train
            images per class, ``repeats`` seeded draws each, and report the test score.
        overwrite: replace an existing ``out_dir``; otherwise an existing one is refused.
        cluster: run the CV fits and refits on this Dask cluster (see
            :mod:`featurecache.cluster`); the results equal a local run's.
        finetuned: fine-tune folders (``featurecache finetune``) of the same images: each
            is a row (strategy ``fine-tune (cache|images)``) selected by its validation score
            beside the frozen heads' CV scores, with its margin over the best frozen head.
        max_head_minutes: skip a head on a layer where its kind estimates its search above
            this many minutes on 2 cores (:meth:`~featurecache.kinds.base.HeadKind.search_minutes`:
            rbf svm, mlp and knn have cost models; the linear heads are never skipped), with a
            warning and a line in the report that say why; 0: never skip.

    Raises:
        FeaturecacheError: the folder exists, a layer or head is unknown, the files are not
            of the same images, or there is no test split.
        HeadError: every head asked is estimated above ``max_head_minutes`` on every layer.
    """
    from ..heads import Progress, cv_plan, fit_heads

    t0 = time.perf_counter()
    files = _open_all(features)
    out_dir = Path(out_dir)
    heads = list(heads)  # every option is checked already (options.validated)
    if not heads:
        raise HeadError(f"no head kind given; choose from {', '.join(HEAD_KINDS)}.")
    class_weight = sklearn_class_weight(class_weight)
    shots = check_shots(shots, repeats)
    names = _labels(files)
    jobs = {}
    for name, ff in zip(names, files):
        wanted = list(layers) if layers else list(ff.layers)
        for layer in wanted + [e for e in extra_layers if e not in wanted]:
            ff.check_layer(layer)
            jobs[(name, layer)] = (ff, layer)
    for ff in files:
        ff.check_complete()  # an unfinished embed is named as such, not as a missing split
    first = files[0]
    present = sorted(set(first.splits()))
    if "test" not in present:  # checked from the split names: no test label is read before the choice
        raise FeaturecacheError(f"{first.path} has no rows in split 'test'; splits present: "
                                f"{present}. compare reports on a held-out test split.")
    if len(np.unique(first.y("train"))) < 2:
        raise HeadError("the train split holds a single class; nothing to compare.")
    shots = feasible_shots(shots, first.y("train"))
    from .strategies import finetuned_rows, read_finetuned

    summaries = [read_finetuned(f, first) for f in finetuned]
    folders = [Path(s["_folder"]).resolve() for s in summaries]
    if len(set(folders)) < len(folders):
        raise FeaturecacheError(f"a fine-tune folder is given twice ({', '.join(map(str, finetuned))}"
                                f"); give each once.")
    groups, skipped = _within_budget(jobs, heads, kernel, max_head_minutes, cv_plan(
        first, cv=cv, seed=seed), several=len(files) > 1, mlp_widths=mlp_widths)
    from ..files import output_folder

    output_folder(out_dir, overwrite, "report")

    if cluster is not None:
        from ..distribute import connect
    t_fit = time.perf_counter()
    bar = Progress(progress, "compare (CV folds)")
    fitted = {}
    with connect(cluster) if cluster is not None else contextlib.nullcontext() as client:
        before, n_keys = 0, sum(map(len, groups.values()))
        for kinds, keys in groups.items():  # one group unless a head is skipped on some layers
            def step(done, total, before=before, n=len(keys)):  # tasks scale with the jobs
                bar.update(round((before * total / n) + done), round(n_keys * total / n))
            before += len(keys)
            fitted.update(fit_heads({key: jobs[key] for key in keys}, kinds, kernel=kernel,
                                    cv=cv, scoring=scoring, class_weight=class_weight,
                                    seed=seed, n_jobs=n_jobs, progress=step, client=client,
                                    mlp_widths=mlp_widths))
    bar.close()
    frozen_seconds = time.perf_counter() - t_fit
    rows = [_row(name, layer, kind, head, jobs) for ((name, layer), kind), head in fitted.items()]
    tuned = finetuned_rows(summaries, files, names)
    rows += [row for row, _ in tuned]
    tuned_pred = {row.origin.folder: pred for row, pred in tuned}  # on the test rows
    rows.sort(key=lambda r: (r.backbone, r.depth, "+" in r["layer"], r["layer"], r.head))
    if summaries:  # every candidate on the same rows: the fine-tunes' validation fold
        from .strategies import score_on_fold, validation_fold

        selections = score_on_fold(rows, jobs, validation_fold(summaries, first), first,
                                   scoring=scoring, kernel=kernel, class_weight=class_weight,
                                   seed=seed, n_jobs=n_jobs)
        rows = [replace(r, selection=sel) for r, sel in zip(rows, selections)]
    # a fine-tune that kept epoch 0 is its own linear probe (fitted on less data): no candidate
    candidates = [r for r in rows if not r.tuned or r.params["epoch"] > 0]
    winner = select_winner(candidates, select)  # selection ends; the test split is read below
    best_frozen = select_winner([r for r in rows if not r.tuned], select)
    others = [r for r in candidates if r is not winner] or [r for r in rows if r is not winner]
    runner = select_winner(others, "cv") if len(rows) > 1 else None

    y_test = first.y("test")
    unscored = sorted(set(first.y("train").tolist()) - set(y_test.tolist()))
    if unscored:
        import warnings

        from ..errors import DataWarning

        warnings.warn(DataWarning(
            f"classes {[first.classes[i] for i in unscored]} have no test images: the test "
            f"scores say nothing about them, and balanced accuracy averages over the others."))
    X_test = {key: ff.X(layer, "test") for key, (ff, layer) in jobs.items()}
    import sklearn

    with sklearn.config_context(working_memory=128):  # a k-NN head's distance blocks: 128 MB, not 1 GB
        preds = np.stack([tuned_pred[r.origin.folder] if r.tuned else
                          fitted[((r.backbone, r.layer), r.head)].predict(X_test[(r.backbone, r.layer)])
                          for r in rows])
    metric = SCORING_METRIC[scoring]
    picked = [rows.index(winner), rows.index(best_frozen),
              rows.index(runner) if runner is not None else None]
    rows = score_on_test(rows, preds, y_test, len(first.classes), metric=metric, n_boot=n_boot,
                         seed=seed, winner=picked[0], best_frozen=picked[1], runner=picked[2])
    if shots:
        frozen = [i for i, r in enumerate(rows) if not r.tuned]
        curves = refit_few_shot([rows[i] for i in frozen], jobs, y_test, X_test, shots,
                                repeats, kernel, class_weight, seed, metric, n_jobs)
        for i, curve in zip(frozen, curves):
            rows[i] = replace(rows[i], few_shot=curve, few_shot_metric=metric)
    several = len(files) > 1
    rows = [r if r.tuned else replace(r, origin=FrozenHead(_head_file(r, several)))
            for r in rows]
    winner, best_frozen = rows[picked[0]], rows[picked[1]]
    runner = rows[picked[2]] if picked[2] is not None else None
    verdict = build_verdict(rows, winner, runner, scoring, select, several) + \
        strategy_verdict(rows, best_frozen, metric, frozen_seconds)
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_test, preds[picked[0]], labels=range(len(first.classes)))
    settings = {"scoring": scoring, "select": select, "cv": fitted[next(iter(fitted))].meta["cv"],
                "heads": heads, "kernel": kernel, "class_weight": class_weight, "seed": seed,
                "n_boot": n_boot, "shots": [str(s) for s in shots], "repeats": repeats,
                "max_head_minutes": max_head_minutes, "skipped": skipped,
                "seconds": round(time.perf_counter() - t0, 1)}
    data = ReportData(files=files, names=names, rows=rows, winner=winner, verdict=verdict,
                      confusion=cm, settings=settings, y_test=y_test, preds=preds,
                      heads={r.origin.head_file: fitted[((r.backbone, r.layer), r.head)]
                             for r in rows if not r.tuned},
                      best_head=best_frozen.origin.head_file)
    from ..files import publish_folder

    def write(folder):  # every file of the report, then published as one unit
        write_report(folder, replace(data, settings={**settings, "run_id": folder.name}))

    publish_folder(out_dir, write, legacy=own_files(out_dir))
    return CompareResult(rows, winner, verdict.markdown(), out_dir, verdict)


def _within_budget(jobs, heads, kernel, max_minutes, plan, *, several, **grid_options):
    """The heads each job (backbone, layer) runs, grouped as ``{kinds: [job keys]}``, and the
    skipped ones: ``[{backbone, layer, head, estimated_minutes, train_rows, features, text}]``,
    each warned about. ``plan``: the jobs' ``(training rows, folds)`` (:func:`cv_plan`; every
    job holds the same rows). A kind is skipped on a layer where its estimate, scaled from 5
    folds to ``folds`` (the refit costing about a fold), exceeds ``max_minutes`` (0: none is).

    Raises:
        HeadError: every head is skipped on every layer.
    """
    import warnings

    from .. import kinds as _kinds
    from ..errors import DataWarning, option

    rows, folds = plan

    def never_skipped(kernel_):  # the kinds with no cost model under this kernel
        return [k for k in _kinds.names() if _kinds.get(k).search_minutes(1, 1, kernel_) is None]

    linear = never_skipped("linear")
    groups, skipped = {}, []
    for key, (ff, layer) in jobs.items():
        dim = sum(ff.layers[p].dim for p in layer.split("+"))
        kept = []
        for kind in heads:
            minutes = _kinds.get(kind).search_minutes(rows, dim, kernel, **grid_options)
            minutes = None if minutes is None else minutes * (folds + 1) / 6
            if not max_minutes or minutes is None or minutes <= max_minutes:
                kept.append(kind)
                continue
            # a kind costly only under this kernel is named with it
            name = f"{kind} ({kernel} kernel)" if kind in linear else kind
            where = f"{key[0]} {layer}" if several else layer
            skipped.append({"backbone": key[0], "layer": layer, "head": kind,
                            "estimated_minutes": minutes, "train_rows": rows,
                            "features": dim, "text": f"{name} on {where}"})
            warnings.warn(DataWarning(
                f"{name} on {where}: skipped, it is estimated at {format_minutes(minutes)} on "
                f"2 cores for {rows:,} training rows x {dim:,} features, above "
                f"{option('max_head_minutes', max_minutes)}. To run it anyway, raise "
                f"{option('max_head_minutes', _round_up(minutes))} (0: never skip)."),
                stacklevel=4)
        if kept:
            groups.setdefault(tuple(kept), []).append(key)
    if not groups:
        worst = max(skipped, key=lambda s: s["estimated_minutes"])
        raise HeadError(f"every head asked ({', '.join(heads)}) is estimated above "
                        f"{option('max_head_minutes', max_minutes)} on every layer (up to "
                        f"{format_minutes(worst['estimated_minutes'])} for {worst['text']}). "
                        f"Add a head that is never skipped "
                        f"({option('heads', never_skipped(kernel))}), or raise "
                        f"{option('max_head_minutes', _round_up(worst['estimated_minutes']))}.")
    return groups, skipped


def _round_up(minutes: float) -> int:
    """A budget above an estimate, in round minutes (1.5x, then 2 significant digits)."""
    import math

    m = 1.5 * minutes
    step = 10 ** max(int(math.log10(m)) - 1, 0)
    return int(math.ceil(m / step) * step)


def _head_file(r, several: bool) -> str:
    stem = "-".join(([r.backbone] if several else []) + [r.layer, r.head])
    return f"heads/{stem.replace('+', '_')}.joblib"


def _row(name, layer, kind, head, jobs) -> Row:
    ff = jobs[(name, layer)][0]
    parts = layer.split("+")
    depth = max(ff.layers[p].depth for p in parts) + (0.5 if len(parts) > 1 else 0)
    deepest = max(s.depth for s in ff.layers.values()) or 1
    table = head.cv_results_
    folds = head.meta["cv_fold_scores"]
    return Row(backbone=name, layer=layer, head=kind, strategy=FROZEN, depth=depth,
               rel_depth=round(min(depth / deepest, 1.0), 4),
               dim=sum(ff.layers[p].dim for p in parts), params=head.params_,
               cv_score=head.cv_score_, cv_std=head.meta["cv_std"],
               cv_sem=float(np.std(folds) / np.sqrt(max(len(folds) - 1, 1))),
               grid_evaluated=sum(r["status"] == "evaluated" for r in table),
               grid_points=len(table))
