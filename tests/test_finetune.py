"""LP-FT (featurecache finetune): the top blocks cut out of the backbone reproduce it, step 0
is the linear probe, training lowers the loss, the checkpoint reloads and predicts the same
from images as from the cache, and bad inputs are refused naming the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from featurecache import embed, open_features
from featurecache.errors import FeaturecacheError, HeadError, OptionError, UnknownLayerError

from .conftest import make_folder, shared_data


def cli(*args):
    return subprocess.run([sys.executable, "-m", "featurecache.cli", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_backbone):
    """clipart10 at 64 px (10 train + 10 test images per class), avgpool stored and the map
    of stage4 kept."""
    root = tmp_path_factory.mktemp("clip")
    out = root / "c.h5"
    embed(shared_data("clipart10"), out, backbone=tiny_backbone, layers=["stage4", "avgpool"],
          keep_map=["stage4"], max_per_class=10, num_workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def tuned(clip, tmp_path_factory):
    from featurecache.finetune import finetune

    out = tmp_path_factory.mktemp("ft") / "ft"
    r = finetune(clip, out, from_layer="stage4", epochs=4, patience=4, progress=False)
    return r


@pytest.mark.slow
def test_the_top_blocks_reproduce_the_stored_final_layer(clip):
    from featurecache.backbones import backbone_for
    from featurecache.topblocks import split_top

    ff = open_features(clip)
    bb = backbone_for(ff.provenance)
    top = split_top(bb.model, ff.maps["stage4"].node, "avgpool")
    maps = torch.from_numpy(ff.map_rows("stage4", np.arange(ff.n_rows))).float()
    with torch.inference_mode():
        pooled = top(maps).flatten(1).numpy()
    stored = ff.X("avgpool").astype(np.float32)
    assert pooled.shape == stored.shape == (ff.n_rows, 1280)
    # both come from one forward pass; the map was rounded to float16 on the way
    np.testing.assert_allclose(pooled, stored, rtol=2e-2, atol=2e-2)
    assert np.abs(pooled - stored).mean() < 2e-3
    # the backbone itself is untouched by the cut (the top is a copy)
    assert next(top.parameters()).data_ptr() != next(bb.model.blocks[11].parameters()).data_ptr()


def test_a_cut_across_a_skip_connection_is_refused():
    from featurecache.backbones import load_backbone
    from featurecache.topblocks import split_top

    bb = load_backbone("resnet18", weights="none")
    assert sum(p.numel() for p in split_top(bb.model, "layer3", "avgpool").parameters()) > 0
    with pytest.raises(OptionError, match="cannot be cut out.*layer3_0_downsample"):
        split_top(bb.model, "layer3.0.conv1", "avgpool")


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_folded_probe_predicts_what_the_logistic_head_predicts(n_classes):
    from featurecache.heads import refit
    from featurecache.topblocks import TopModel, fold_logistic

    rng = np.random.default_rng(n_classes)
    X = rng.normal(3, 2, (120, 16)) * rng.uniform(0.1, 10, 16)   # unscaled, off-centre
    y = rng.integers(0, n_classes, 120)
    X[np.arange(120), y] += 4
    pipe = refit(X, y, "logreg", {"C": 0.3})
    model = TopModel(torch.nn.Identity(), "vector", "none", 16, n_classes + 1)  # +1: unseen class
    w, b = fold_logistic(pipe, n_classes + 1)
    with torch.no_grad():
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(b)
        proba = model(torch.from_numpy(X).float()).softmax(1).numpy()
    np.testing.assert_array_equal(proba.argmax(1), pipe.predict(X.astype(np.float32)))
    np.testing.assert_allclose(proba[:, :n_classes], pipe.predict_proba(X.astype(np.float32)),
                               atol=1e-4)
    assert proba[:, n_classes].max() < 1e-6


@pytest.mark.slow
def test_step_zero_is_the_probe_and_training_lowers_the_loss(tuned, clip):
    h = tuned.history
    assert [e["epoch"] for e in h] == [0, 1, 2, 3, 4]
    # the probe's own training loss (epoch 0), then the mean loss of each epoch's steps
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"] and h[-1]["train_loss"] < h[1]["train_loss"], h
    s = tuned.summary
    assert s["n_train"] + s["n_val"] == 100 and s["n_val"] == 20
    # the kept epoch: see test_an_epoch_replaces_the_probe_only_beyond_the_fold_noise
    # the epoch-0 validation score is the probe's: refit the probe independently and score it
    from featurecache.feeds import holdout
    from featurecache.heads import search
    from featurecache.solvers import score_predictions

    ff = open_features(clip)
    train, val = holdout(ff.y(), ff.splits(), 0.2, 0)
    from featurecache.backbones import backbone_for
    from featurecache.topblocks import split_top

    top = split_top(backbone_for(ff.provenance).model, "blocks.10", "avgpool")  # untrained
    maps = lambda rows: torch.from_numpy(ff.map_rows("stage4", rows)).float()
    with torch.inference_mode():
        Xt, Xv = (top(maps(r)).flatten(1).numpy() for r in (train, val))
    pipe = search(Xt, ff.y()[train], "logreg", seed=0)[0]
    probe = score_predictions("balanced_accuracy", ff.y()[val], pipe.predict(Xv))
    assert h[0]["val_score"] == pytest.approx(probe)


def test_the_checkpoint_reloads_and_images_predict_as_the_cache(tuned, clip):
    from featurecache.checkpoint import load_finetuned
    from featurecache.predict import predict

    raw = torch.load(tuned.out_dir / "model.pt", weights_only=True)
    assert raw["provenance"]["from_node"] == "blocks.10" and raw["provenance"]["weights_sha256"]
    ft = load_finetuned(tuned.out_dir)
    ff = open_features(clip)
    rows, pred = ft.predict_file(ff, "test")
    assert [ft.classes[p] for p in pred] == tuned.summary["test"]["predicted"]
    assert ft.evaluate(ff)["accuracy"] == pytest.approx(tuned.test["accuracy"])
    paths = [ff.paths()[i] for i in rows[:24]]
    out = predict(tuned.out_dir, paths)
    assert [r["predicted"] for r in out] == [ft.classes[p] for p in pred[:24]]
    assert (tuned.out_dir / "curve.png").stat().st_size > 5000


@pytest.mark.slow
def test_compare_reports_the_strategies_side_by_side(tuned, clip, tmp_path):
    from featurecache.report import compare

    res = compare(clip, tmp_path / "r", heads=["logreg"], finetuned=[tuned.out_dir],
                  progress=False, n_boot=200)
    strategies = [r["strategy"] for r in res.rows]
    assert strategies.count("frozen") == 2 and strategies.count("fine-tune (cache)") == 1
    ft_row = next(r for r in res.rows if r["strategy"] != "frozen")
    assert ft_row["accuracy"] == pytest.approx(tuned.test["accuracy"])
    assert ft_row["cv_score"] == pytest.approx(tuned.val_score)
    m = ft_row["margin_over_frozen"]
    best = next(r for r in res.rows if r["strategy"] == "frozen" and
                f"{r['backbone']} {r['layer']} ({r['head']})" == m["best_frozen"])
    assert m["difference"] == pytest.approx(ft_row[m["metric"]] - best[m["metric"]])
    # the paired bootstrap's interval, against one drawn here (other resamples, scikit-learn's
    # metric, both models scored on each resample): equal up to the resampling noise
    from sklearn.metrics import balanced_accuracy_score

    from featurecache.checkpoint import load_finetuned
    from featurecache.heads import load_head

    assert m["metric"] == "balanced_accuracy"
    ff = open_features(clip)
    y_test = ff.y("test")
    rows, ft_pred = load_finetuned(tuned.out_dir).predict_file(ff, "test")
    assert list(rows) == np.flatnonzero(np.array(ff.splits()) == "test").tolist()
    frozen_pred = load_head(tmp_path / "r" / best["head_file"]).predict(ff.X(best["layer"], "test"))
    assert m["difference"] == pytest.approx(balanced_accuracy_score(y_test, ft_pred) -
                                            balanced_accuracy_score(y_test, frozen_pred))
    rng = np.random.default_rng(2024)
    diffs = []
    for _ in range(2000):
        i = rng.integers(0, len(y_test), len(y_test))
        diffs.append(balanced_accuracy_score(y_test[i], ft_pred[i]) -
                     balanced_accuracy_score(y_test[i], frozen_pred[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert m["lo"] == pytest.approx(lo, abs=0.03) and m["hi"] == pytest.approx(hi, abs=0.03), \
        (m, lo, hi)
    assert "Strategies:" in res.verdict and "fine-tune (cache)" in res.table()
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert any(r["strategy"] == "fine-tune (cache)" for r in saved["rows"])


def test_compare_refuses_a_finetune_of_other_images(tuned, tmp_path, tiny_backbone):
    from featurecache.report import compare

    other = tmp_path / "o.h5"
    embed(make_folder(tmp_path / "imgs", 6), other, backbone=tiny_backbone, num_workers=0,
          progress=False)
    with pytest.raises(FeaturecacheError, match="classes"):
        compare(other, tmp_path / "r", heads=["logreg"], finetuned=[tuned.out_dir],
                progress=False)


@pytest.mark.slow
def test_finetune_from_images_with_augmentation(tmp_path, tiny_backbone):
    from featurecache.finetune import finetune

    data = make_folder(tmp_path / "imgs", 8)
    r = finetune(data, tmp_path / "ft", backbone=tiny_backbone, augment=True, epochs=2,
                 patience=2, num_workers=0, progress=False, test_size=0.25)
    assert r.source == "images" and len(r.history) == 3
    assert r.summary["provenance"]["augment"] is True
    assert r.test["n"] == 6 and r.test["accuracy"] >= 0.5  # colour classes: easy


@pytest.mark.slow
def test_bad_inputs_are_refused_naming_the_fix(clip, tuned, tmp_path, tiny_backbone):
    from featurecache.finetune import finetune

    with pytest.raises(UnknownLayerError, match="stage3.*re-embed with"):
        finetune(clip, tmp_path / "a", from_layer="stage3", progress=False)
    with pytest.raises(OptionError, match="needs images"):
        finetune(clip, tmp_path / "a", augment=True, progress=False)
    data = make_folder(tmp_path / "imgs", 4)
    with pytest.raises(OptionError, match="not below the final pooled layer"):
        finetune(data, tmp_path / "a", from_layer="avgpool", backbone=tiny_backbone,
                 progress=False)
    embed(data, tmp_path / "top.h5", backbone=tiny_backbone, keep_map=["avgpool"],
          num_workers=0, progress=False)  # a map kept at the final layer itself
    with pytest.raises(OptionError, match="'avgpool' is not below the final pooled layer"):
        finetune(tmp_path / "top.h5", tmp_path / "a", from_layer="avgpool", progress=False)
    assert not (tmp_path / "a").exists()
    # the CLI: one line, the fix named, no traceback
    p = cli("finetune", clip, "--from", "stage3", "-o", tmp_path / "b")
    assert p.returncode == 1 and "--keep-map stage3" in p.stderr and "Traceback" not in p.stderr
    p = cli("finetune", clip, "-o", tuned.out_dir)
    assert p.returncode == 1 and "--overwrite" in p.stderr


@pytest.mark.slow
def test_a_checkpoint_is_refused_on_maps_made_otherwise(tuned, tmp_path, tiny_backbone):
    import dataclasses

    from featurecache.backbones import load_backbone
    from featurecache.checkpoint import load_finetuned

    data = make_folder(tmp_path / "imgs", 4)
    none = dataclasses.replace(load_backbone("efficientnet_lite0", weights="none"),
                               preprocess=tiny_backbone.preprocess)
    embed(data, tmp_path / "w.h5", backbone=none, keep_map=["stage4"], num_workers=0,
          dtype="float32", progress=False)
    ft = load_finetuned(tuned.out_dir)
    ft.classes = ["blue", "green", "red"]  # reach the provenance check
    with pytest.raises(HeadError, match="weights_sha256"):
        ft.evaluate(tmp_path / "w.h5")
    r18 = dataclasses.replace(load_backbone("resnet18", weights="none"),
                              preprocess=tiny_backbone.preprocess)
    embed(data, tmp_path / "r.h5", backbone=r18, layers=["layer3"], keep_map=["layer3"],
          num_workers=0, dtype="float32", progress=False)
    p = cli("score", tuned.out_dir, tmp_path / "r.h5")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "classes" in p.stderr  # other images: named before the maps
    with pytest.raises(HeadError, match="backbone = 'efficientnet_lite0'.*'resnet18'"):
        ft.evaluate(tmp_path / "r.h5")


@pytest.mark.slow
def test_a_pipeline_fine_tunes_from_the_cache_and_reports_it(tmp_path):
    from featurecache.errors import PipelineError
    from featurecache.pipeline import load_pipeline, run_pipeline

    text = f"""
output = "{tmp_path / 'run'}"
[data]
root = "builtin:digits"
max_per_class = 8
[embed]
layers = ["avgpool"]
[compare]
heads = ["logreg"]
cv = 3
[finetune]
sources = ["cache"]
epochs = 2
"""
    with pytest.raises(PipelineError, match=r'embed.keep_map = \["stage4"\]'):
        load_pipeline(text=text)
    plan = load_pipeline(text=text.replace('layers = ["avgpool"]',
                                           'layers = ["avgpool"]\nkeep_map = ["stage4"]'))
    assert "finetune the blocks above stage4 from the cache" in plan.describe()
    record = run_pipeline(plan, progress=False)
    assert record["finetune"]["cache"]["folder"].endswith("finetune-cache")
    assert "finetune_cache_s" in record["timings"]
    saved = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    assert [r["strategy"] for r in saved["rows"]] == ["frozen", "fine-tune (cache)"]


@pytest.mark.slow
def test_a_seeded_fine_tune_is_reproducible(clip, tmp_path):
    from featurecache.finetune import finetune

    runs = [finetune(clip, tmp_path / f"ft{i}", epochs=1, seed=3, progress=False) for i in (0, 1)]
    assert runs[0].history[1]["train_loss"] == runs[1].history[1]["train_loss"]
    a, b = (torch.load(r.out_dir / "model.pt", weights_only=True)["state_dict"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = finetune(clip, tmp_path / "ft2", epochs=1, seed=4, progress=False)
    assert other.summary["n_val"] == runs[0].summary["n_val"]
    assert other.history[1]["train_loss"] != runs[0].history[1]["train_loss"]


@pytest.mark.slow
def test_the_from_layer_is_checked_before_the_stored_maps(clip, tmp_path):
    from featurecache.finetune import finetune

    with pytest.raises(UnknownLayerError, match="'stage44' is not a storable layer.*stage4"):
        finetune(clip, tmp_path / "a", from_layer="stage44", progress=False)
    with pytest.raises(OptionError, match="'classifier' is a vector layer, not a feature map"):
        finetune(clip, tmp_path / "a", from_layer="classifier", progress=False)
    with pytest.raises(OptionError, match="not below the final pooled layer"):
        finetune(clip, tmp_path / "a", from_layer="avgpool", progress=False)
    with pytest.raises(OptionError, match="--backbone|backbone='resnet18'.*only for images"):
        finetune(clip, tmp_path / "a", backbone="resnet18", progress=False)
    for bad in ({"lr": float("nan")}, {"weight_decay": float("inf")},
                {"val_fraction": float("nan")}):
        with pytest.raises(OptionError, match="not a finite number"):
            finetune(clip, tmp_path / "a", progress=False, **bad)
    p = cli("finetune", clip, "--lr", "nan", "-o", tmp_path / "b")
    assert p.returncode == 1 and "not a finite number" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_tiny_training_sets_are_named(tmp_path, tiny_backbone):
    from featurecache.errors import DataWarning
    from featurecache.finetune import finetune

    data = make_folder(tmp_path / "imgs", 4)  # 3 train per class after the 0.25 test split
    with pytest.warns(DataWarning, match="validation fold holds 3 image"):
        finetune(data, tmp_path / "a", backbone=tiny_backbone, epochs=1, num_workers=0,
                 test_size=0.25, progress=False)
    (tmp_path / "imgs" / "red").rename(tmp_path / "red")
    (tmp_path / "imgs" / "red").mkdir()
    (tmp_path / "red" / "red_0.png").rename(tmp_path / "imgs" / "red" / "red_0.png")
    (tmp_path / "red" / "red_1.png").rename(tmp_path / "imgs" / "red" / "red_1.png")
    with pytest.raises(FeaturecacheError, match=r"classes \['red'\] have a single training"):
        finetune(data, tmp_path / "b", backbone=tiny_backbone, epochs=1, num_workers=0,
                 test_size=0.25, progress=False)


def test_compare_checks_the_finetune_folders(tuned, clip, tmp_path):
    import shutil

    from featurecache.report import compare
    from featurecache.report.verdict import verdict_text

    with pytest.raises(FeaturecacheError, match="given twice"):
        compare(clip, tmp_path / "r", heads=["logreg"], progress=False,
                finetuned=[tuned.out_dir, tuned.out_dir / "model.pt"])
    copy = tmp_path / "copy"
    shutil.copytree(tuned.out_dir, copy, symlinks=True)
    from featurecache.files import published

    (published(copy) / "model.pt").unlink()  # the published model itself is gone
    with pytest.raises(FeaturecacheError, match="no model.pt"):
        compare(clip, tmp_path / "r", heads=["logreg"], progress=False, finetuned=[copy])
    # a fine-tune of another backbone can win a file's compare: no frozen row of its own
    metrics = {m: 0.7 for m in ("accuracy", "balanced_accuracy", "macro_f1")}
    metrics.update({f"{m}_{e}": 0.7 for m in list(metrics) for e in ("lo", "hi")})
    frozen = {"backbone": "resnet18", "layer": "avgpool", "head": "logreg", "strategy": "frozen",
              "depth": 3, "rel_depth": 1.0, "dim": 512, "cv_score": 0.6, "cv_std": 0.1,
              **metrics}
    ft = {**frozen, "backbone": "efficientnet_lite0", "layer": "stage4..avgpool",
          "head": "lp-ft", "strategy": "fine-tune (cache)", "folder": "ft", "cv_score": 0.9,
          "n_val": 20}
    text = verdict_text([frozen, ft], ft, None, "balanced_accuracy", "cv", True)
    assert text.startswith("**fine-tune (cache) of the blocks above stage4**")


def test_pipeline_finetune_keys_are_checked_before_running(tmp_path):
    from featurecache.errors import PipelineError
    from featurecache.pipeline import check_pipeline, load_pipeline

    base = """
output = "out"
[data]
root = "builtin:digits"
[embed]
keep_map = ["stage4", "avgpool"]
[finetune]
"""
    with pytest.raises(PipelineError, match='names "cache" twice'):
        load_pipeline(text=base + 'sources = ["cache", "cache"]\n')
    with pytest.raises(OptionError, match="not a finite number"):
        load_pipeline(text=base + 'sources = ["cache"]\nlr = nan\n')
    plan = load_pipeline(text=base + 'sources = ["cache"]\nfrom = "avgpool"\n')
    with pytest.raises(OptionError, match="not below the final pooled layer"):
        check_pipeline(plan)  # the dry run refuses what the run would


@pytest.mark.slow
def test_a_finetune_that_kept_its_probe_is_no_candidate(tuned, clip, tmp_path):
    import shutil

    from featurecache.report import compare

    for epoch in (0, 2):
        folder = tmp_path / f"e{epoch}"
        shutil.copytree(tuned.out_dir, folder)
        for f in folder.rglob("summary.json"):  # the published copy, whatever the layout
            s = json.loads(f.read_text())
            s.update(best_epoch=epoch, val_score=1.0)  # the best selection score of all rows
            f.unlink()
            f.write_text(json.dumps(s))
        res = compare(clip, tmp_path / f"r{epoch}", heads=["logreg"], finetuned=[folder],
                      progress=False, n_boot=100)
        assert (res.winner["strategy"] == "frozen") == (epoch == 0)
        assert ("It kept epoch 0" in res.verdict) == (epoch == 0)


def test_the_top_blocks_learn_and_the_backbone_and_batchnorm_stay_frozen(clip):
    from featurecache.backbones import backbone_for
    from featurecache.feeds import CachedMaps, holdout
    from featurecache.finetune import _train
    from featurecache.topblocks import TopModel, split_top

    ff = open_features(clip)
    bb = backbone_for(ff.provenance)
    model = TopModel(split_top(bb.model, "blocks.10", "avgpool"), "map", "avg", 1280, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    train, val = holdout(ff.y(), ff.splits(), 0.2, 0)
    _train(model, CachedMaps(ff, ff.maps["stage4"]), train, val, epochs=1, lr=1e-3,
           weight_decay=0.0, batch_size=16, patience=1, scoring="accuracy", seed=0,
           dev=torch.device("cpu"), probe=(0.0, 0.0), say=lambda m: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "fc.weight" in changed
    assert any(k.startswith("top.blocks") and k.endswith("weight") for k in changed), changed
    assert not any("running_" in k for k in changed)  # BatchNorm statistics frozen
    assert not any(p.requires_grad for p in bb.model.parameters())  # the backbone untouched
    # the backbone's weights and buffers, blocks 11+ included, are those saved before training
    backbone_after = bb.model.state_dict()
    assert backbone_after.keys() == backbone_before.keys()
    assert all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before), \
        [k for k in backbone_before if not torch.equal(backbone_before[k], backbone_after[k])]


@pytest.mark.slow
def test_a_pooled_map_is_refused_for_fine_tuning(tmp_path, tiny_backbone):
    from featurecache.finetune import finetune

    data = make_folder(tmp_path / "imgs", 4)
    embed(data, tmp_path / "p.h5", backbone=tiny_backbone, keep_map=["stage4"], map_size=2,
          num_workers=0, progress=False)
    with pytest.raises(OptionError, match="stored at 2x2.*full 4x4"):
        finetune(tmp_path / "p.h5", tmp_path / "a", progress=False)


@pytest.mark.slow
def test_a_class_without_training_rows_is_refused(tmp_path, tiny_backbone):
    """As fit-head and compare: a class that only occurs in the test split cannot be learned
    (issue 22, item 12); the console script says so in one line, writes nothing."""
    from .conftest import make_image

    root = tmp_path / "data"
    for split, classes in (("train", ["a", "b"]), ("test", ["a", "b", "c"])):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                make_image(root / split / c / f"{i}.png", (80 * ci, 90, 200 - 80 * ci), ci * 10 + i)
    with pytest.warns(Warning):
        embed(root, tmp_path / "f.h5", backbone=tiny_backbone, layers=["avgpool"],
              keep_map=["stage4"], num_workers=0, progress=False)
    p = cli("finetune", tmp_path / "f.h5", "--from", "stage4", "-o", tmp_path / "ft",
            "--epochs", "1", "-q")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "classes ['c']" in p.stderr and "no training rows" in p.stderr
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_a_probe_no_epoch_beats_is_refit_on_all_training_rows(clip, tmp_path):
    """Epochs that do not beat the probe beyond the validation fold's noise leave the probe
    (issue 22, item 10), and the final model is refit on every training row: its test
    predictions are those of the logistic head fitted, independently here, on the final
    pooled features of all 100 training rows (not the 80 left after the fold)."""
    from featurecache.backbones import backbone_for
    from featurecache.finetune import finetune
    from featurecache.heads import search
    from featurecache.topblocks import split_top

    r = finetune(clip, tmp_path / "ft", epochs=1, patience=1, lr=1e-12, progress=False)
    assert r.best_epoch == 0 and r.summary["final_fit"]["rows"] == "all"
    assert r.summary["final_fit"]["n"] == 100 and r.summary["final_fit"]["epochs"] == 0
    ff = open_features(clip)
    top = split_top(backbone_for(ff.provenance).model, "blocks.10", "avgpool")
    train, test = (np.flatnonzero(np.array(ff.splits()) == s) for s in ("train", "test"))
    with torch.inference_mode():
        Xt, Xs = (top(torch.from_numpy(ff.map_rows("stage4", rows)).float()).flatten(1).numpy()
                  for rows in (train, test))
    pipe = search(Xt, ff.y()[train], "logreg", seed=0)[0]
    expected = [ff.classes[i] for i in pipe.predict(Xs)]
    assert r.summary["test"]["predicted"] == expected


def test_an_epoch_replaces_the_probe_only_beyond_the_fold_noise(tuned):
    """The kept epoch is the best validation score only when it beats the probe by more than
    two standard errors of the paired difference; the recorded margin is the difference of
    the recorded scores, and the kept model's validation predictions give its score."""
    from featurecache.solvers import score_predictions

    h = tuned.history
    top = max(range(len(h)), key=lambda e: (h[e]["val_score"], -e))
    for e in h[1:]:
        assert e["margin"] == pytest.approx(e["val_score"] - h[0]["val_score"])
        assert e["margin_se"] >= 0 and 0 <= e["train_score"] <= 1 and e["val_loss"] > 0
    clears = top > 0 and h[top]["margin"] > 2 * h[top]["margin_se"]
    assert tuned.best_epoch == (top if clears else 0)
    v = tuned.summary["validation"]
    assert len(v["paths"]) == tuned.summary["n_val"] == 20
    classes = tuned.summary["classes"]
    score = score_predictions("balanced_accuracy", [classes.index(c) for c in v["labels"]],
                              [classes.index(c) for c in v["predicted"]])
    assert score == pytest.approx(tuned.val_score)


@pytest.mark.slow
def test_compare_scores_every_candidate_on_the_same_rows(tuned, clip, tmp_path):
    """compare --finetuned chooses on the fine-tune's validation fold for every candidate
    (issue 22, item 11): each frozen head refit on the other training rows with its CV
    parameters and scored on those rows; the report says which rows the choice used."""
    from featurecache.heads import refit
    from featurecache.report import compare
    from featurecache.solvers import score_predictions

    res = compare(clip, tmp_path / "r", heads=["logreg", "knn"], finetuned=[tuned.out_dir],
                  progress=False, n_boot=100)
    ff = open_features(clip)
    paths = ff.paths()
    val = np.array(sorted(paths.index(p) for p in tuned.summary["validation"]["paths"]))
    fit = np.setdiff1d(np.flatnonzero(np.array(ff.splits()) == "train"), val)
    y = ff.y()
    for r in res.rows:
        assert r["selected_on"] == "validation fold (20 rows)"
        if r["strategy"] == "frozen":
            X = ff.X(r["layer"]).astype(np.float32)
            pipe = refit(X[fit], y[fit], r["head"], r["params"])
            assert r["select_score"] == pytest.approx(
                score_predictions("balanced_accuracy", y[val], pipe.predict(X[val])))
        else:
            assert r["select_score"] == pytest.approx(tuned.val_score)
    candidates = [r for r in res.rows if r["strategy"] == "frozen" or r["params"]["epoch"] > 0]
    assert res.winner["select_score"] == max(r["select_score"] for r in candidates)
    assert "validation fold (20 rows)" in res.verdict
    assert "selection score" in res.table()


@pytest.mark.slow
def test_the_same_images_through_a_symlinked_folder_are_the_same(tmp_path, tiny_backbone):
    """compare --finetuned matches a fine-tune's test images by resolved path, and names the
    setting that differs when they are not the same (issue 22, item 14)."""
    from featurecache.finetune import finetune
    from featurecache.report import compare

    data = make_folder(tmp_path / "imgs", 8)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    embed(data, tmp_path / "f.h5", backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
          progress=False)
    kw = dict(backbone=tiny_backbone, epochs=1, patience=1, num_workers=0, progress=False)
    finetune(tmp_path / "link", tmp_path / "ft", **kw)
    res = compare(tmp_path / "f.h5", tmp_path / "r", heads=["logreg"], n_boot=50,
                  finetuned=[tmp_path / "ft"], progress=False)
    assert any(r["strategy"] == "fine-tune (images)" for r in res.rows)
    finetune(tmp_path / "link", tmp_path / "ft1", seed=1, **kw)
    with pytest.raises(FeaturecacheError, match=r"--seed 1 \(the other: 0\)"):
        compare(tmp_path / "f.h5", tmp_path / "r1", heads=["logreg"],
                finetuned=[tmp_path / "ft1"], progress=False)


@pytest.mark.slow
def test_a_library_fine_tune_leaves_torchs_global_random_state_as_it_was(clip, tmp_path):
    """finetune draws from its own seed (torch.random.fork_rng), so a library caller's torch
    random state is neither reseeded nor advanced, also by a call that fails; and the caller's
    state does not change the fine-tune."""
    from featurecache.finetune import finetune

    torch.manual_seed(1234)
    torch.rand(3)
    before = torch.get_rng_state()
    a = finetune(clip, tmp_path / "a", epochs=1, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(FeaturecacheError):
        finetune(clip, tmp_path / "bad", from_layer="stage3", epochs=1, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)  # another caller state: the same fine-tune
    b = finetune(clip, tmp_path / "b", epochs=1, seed=3, progress=False)
    assert a.history[1]["train_loss"] == b.history[1]["train_loss"]
    sa, sb = (torch.load(r.out_dir / "model.pt", weights_only=True)["state_dict"] for r in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_a_head_and_a_finetune_are_one_kind_of_saved_model(tuned, clip, tmp_path):
    """persist.Head and checkpoint.Finetuned answer the same protocol (saved.SavedModel):
    load_model opens either file, each names the differing field, evaluates a feature file
    and scores images the same way, whether given loaded or by its path."""
    from featurecache.checkpoint import Finetuned
    from featurecache.heads import Head, fit_head
    from featurecache.predict import predict, score
    from featurecache.saved import SavedModel, load_model

    head_path = fit_head(clip, "avgpool", cv=3, n_jobs=1).save(tmp_path / "h.joblib")
    head, ft = load_model(head_path), load_model(tuned.out_dir)
    assert isinstance(head, Head) and isinstance(ft, Finetuned)
    assert load_model(tuned.out_dir / "model.pt").classes == ft.classes
    ff = open_features(clip)
    paths = ff.paths("test")[:3]
    for model, path in ((head, head_path), (ft, tuned.out_dir)):
        assert isinstance(model, SavedModel) and load_model(model) is model
        assert model.MATCH_KEYS[0] == "backbone"
        with pytest.raises(HeadError, match=r"backbone = 'efficientnet_lite0'.*backbone = "
                                            r"'resnet18'"):
            model.check_compatible({**model.provenance, "backbone": "resnet18"})
        model.check_compatible(model.provenance)
        assert score(path, clip) == (model.describe(), model.evaluate(clip))
        assert predict(model, paths) == predict(path, paths)
    assert head.describe() == "logreg head on avgpool"
    assert ft.describe() == "fine-tuned top of efficientnet_lite0 above stage4"
