"""compare selects by CV only, reports few-shot curves and several backbones in one report."""

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest

from featurecache import embed, open_features
from featurecache.backbones import Preprocess, load_backbone
from featurecache.errors import FeaturecacheError
from featurecache.heads import load_head, refit
from featurecache.report import compare, select_winner
from featurecache.stats import few_shot_indices

from .conftest import make_image, png_spread


@pytest.mark.slow
def test_selection_never_reads_the_test_split(feats_path, tmp_path):
    """Scrambling every test label changes the test scores, never the choice."""
    bad = tmp_path / "scrambled.h5"
    shutil.copyfile(feats_path, bad)
    with h5py.File(bad, "r+") as f:
        test = np.array([s.decode() == "test" for s in f["splits"][()]])
        labels = f["labels"][()]
        labels[test] = (labels[test] + 1) % 3
        f["labels"][...] = labels
    kw = dict(heads=["logreg", "knn"], progress=False, n_boot=100, n_jobs=1)
    a = compare(feats_path, tmp_path / "a", **kw)
    b = compare(bad, tmp_path / "b", **kw)
    assert (a.winner["layer"], a.winner["head"]) == (b.winner["layer"], b.winner["head"])
    assert [r["cv_score"] for r in a.rows] == [r["cv_score"] for r in b.rows]
    assert [r["params"] for r in a.rows] == [r["params"] for r in b.rows]
    assert a.winner["balanced_accuracy"] > 0.8 > b.winner["balanced_accuracy"]


def test_one_standard_error_rule_prefers_the_narrow_shallow_candidate():
    def row(layer, head, cv, sem, dim, depth):
        return {"layer": layer, "head": head, "cv_score": cv, "cv_sem": sem, "dim": dim,
                "rel_depth": depth, "backbone": "b"}

    rows = [row("avgpool", "svm", 0.90, 0.02, 1280, 1.0), row("blocks.5", "logreg", 0.89, 0.03, 80, 0.4),
            row("stem", "knn", 0.80, 0.01, 32, 0.1), row("blocks.9", "logreg", 0.885, 0.02, 112, 0.6)]
    assert select_winner(rows, "cv")["layer"] == "avgpool"
    assert select_winner(rows, "cv-1se")["layer"] == "blocks.5"  # 0.89 >= 0.90 - 0.02
    rows[0]["cv_sem"] = 0.005
    assert select_winner(rows, "cv-1se")["layer"] == "avgpool"


def test_few_shot_rows_refit_on_seeded_draws(feats_path, tmp_path):
    res = compare(feats_path, tmp_path / "r", heads=["logreg"], layers=["avgpool"],
                  shots=["1", 2, "all"], repeats=2, progress=False, n_boot=50, n_jobs=1)
    (r,) = res.rows
    assert list(r["few_shot"]) == ["1", "2", "all"]
    assert r["few_shot"]["all"]["mean"] == r["balanced_accuracy"]
    ff = open_features(feats_path)
    X, y = ff.X("avgpool", "train"), ff.y("train")
    Xt, yt = ff.X("avgpool", "test"), ff.y("test")
    by_hand = []
    for rep in range(2):
        idx = few_shot_indices(y, 2, 0, rep)
        assert np.bincount(y[idx]).tolist() == [2, 2, 2]
        pred = refit(X[idx], y[idx], "logreg", r["params"]).predict(Xt)
        by_hand.append(np.mean([(pred[yt == c] == c).mean() for c in range(3)]))
    assert r["few_shot"]["2"]["mean"] == pytest.approx(np.mean(by_hand))
    assert r["few_shot"]["2"]["std"] == pytest.approx(np.std(by_hand))
    assert png_spread(tmp_path / "r" / "few_shot.png") > 10
    assert "2-shot" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(FeaturecacheError, match="shots must be positive"):
        compare(feats_path, tmp_path / "r2", shots=["0"], progress=False)


@pytest.mark.slow
def test_several_backbones_in_one_report(feats_path, image_folder, tmp_path):
    bb = dataclasses.replace(load_backbone("mobilenet_v3_small", "none"),
                             preprocess=Preprocess(resize=64, crop=64))
    other = tmp_path / "mnv3.h5"
    embed(image_folder, other, backbone=bb, layers=["features.3", "avgpool"], dtype="float32",
          num_workers=0, progress=False)
    res = compare([feats_path, other], tmp_path / "r", heads=["logreg"], progress=False,
                  n_boot=50, n_jobs=2)
    assert [(r["backbone"], r["layer"]) for r in res.rows] == [
        ("efficientnet_lite0", "stem"), ("efficientnet_lite0", "blocks.5"),
        ("efficientnet_lite0", "avgpool"), ("mobilenet_v3_small", "features.3"),
        ("mobilenet_v3_small", "avgpool")]
    assert [r["rel_depth"] for r in res.rows][-1] == 1.0
    # chosen across the backbones: every CV score ties at 1 (the colours separate), so the
    # narrowest row of either file wins, mobilenet's features.3 (24 wide; lite0's stem is 32)
    assert [r["cv_score"] for r in res.rows] == [1.0] * 5
    assert [r["dim"] for r in res.rows] == [32, 80, 1280, 24, 576]
    assert (res.winner["backbone"], res.winner["layer"]) == ("mobilenet_v3_small", "features.3")
    assert res.winner["backbone"] in res.verdict and "Best of" in res.verdict
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [s["backbone"] for s in data["feature_files"]] == ["efficientnet_lite0", "mobilenet_v3_small"]
    head = load_head(tmp_path / "r" / "best.joblib")
    assert head.provenance["backbone"] == res.winner["backbone"]
    assert (tmp_path / "r" / "heads" / "mobilenet_v3_small-avgpool-logreg.joblib").is_file()


def test_compare_refuses_files_of_different_images(feats_path, image_folder, tiny_backbone, tmp_path):
    smaller = tmp_path / "smaller"
    shutil.copytree(image_folder, smaller)
    (smaller / "red" / "red_0.png").unlink()
    fewer = tmp_path / "fewer.h5"
    embed(smaller, fewer, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
          progress=False)
    with pytest.raises(FeaturecacheError, match=r"not of the same images: 17 vs 18 rows"):
        compare([feats_path, fewer], tmp_path / "r", progress=False)
    # the console script: one line, exit 1, no traceback, no report folder
    out = subprocess.run([sys.executable, "-m", "featurecache.cli", "compare", str(feats_path),
                          str(fewer), "-o", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "not of the same images" in out.stderr and not (tmp_path / "r").exists()


def test_few_shot_when_the_test_split_lacks_a_class(tmp_path, tiny_backbone):
    """A head may predict a class the test split does not hold (regression: IndexError)."""
    root = tmp_path / "data"
    for split, classes in (("train", ["a", "b", "c"]), ("test", ["a", "b"])):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                make_image(root / split / c / f"{i}.png", (80 * ci, 90, 200 - 80 * ci), ci * 10 + i)
    with pytest.warns(Warning, match="not in test/"):
        embed(root, tmp_path / "f.h5", backbone=tiny_backbone, layers=["avgpool"],
              num_workers=0, progress=False)
    res = compare(tmp_path / "f.h5", tmp_path / "r", heads=["logreg"], shots=[1, "all"],
                  repeats=2, progress=False, n_boot=50, n_jobs=1)
    # the 1-shot point, refit by hand on the same seeded draws and scored by scikit-learn
    # (balanced accuracy over the two classes the test split holds)
    from sklearn.metrics import balanced_accuracy_score

    (r,) = res.rows
    ff = open_features(tmp_path / "f.h5")
    X, y, Xt, yt = ff.X("avgpool", "train"), ff.y("train"), ff.X("avgpool", "test"), ff.y("test")
    assert sorted(set(yt.tolist())) == [0, 1]
    by_hand = []
    for rep in range(2):
        idx = few_shot_indices(y, 1, 0, rep)
        assert np.bincount(y[idx]).tolist() == [1, 1, 1]
        pred = refit(X[idx], y[idx], "logreg", r["params"]).predict(Xt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # y_pred may hold the class y_true lacks
            by_hand.append(balanced_accuracy_score(yt, pred))
    assert r["few_shot"]["1"]["mean"] == pytest.approx(np.mean(by_hand))
    assert r["few_shot"]["1"]["std"] == pytest.approx(np.std(by_hand))


def test_the_same_file_twice_is_refused(feats_path, tmp_path):
    with pytest.raises(FeaturecacheError, match="given twice"):
        compare([feats_path, feats_path], tmp_path / "r", progress=False)


@pytest.mark.slow
def test_files_of_the_same_images_compare_by_resolved_path_and_name_the_seed(
        image_folder, tiny_backbone, tmp_path):
    """The same images through a symlinked folder are the same images; two files split with
    different seeds are refused naming --seed (issue 22, item 14)."""
    (tmp_path / "link").symlink_to(image_folder, target_is_directory=True)
    kw = dict(backbone=tiny_backbone, layers=["avgpool"], num_workers=0, progress=False)
    embed(image_folder, tmp_path / "a.h5", **kw)
    embed(tmp_path / "link", tmp_path / "b.h5", **kw)
    res = compare([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "r", heads=["logreg"],
                  progress=False, n_boot=50, n_jobs=1)
    assert len(res.rows) == 2
    embed(image_folder, tmp_path / "c.h5", seed=1, **kw)
    with pytest.raises(FeaturecacheError, match=r"not of the same images.*--seed 1 \(the other: 0\)"):
        compare([tmp_path / "a.h5", tmp_path / "c.h5"], tmp_path / "r2", progress=False)


@pytest.mark.slow
def test_a_head_estimated_above_the_budget_is_skipped_with_its_reason(feats_path, tmp_path):
    """knn's estimate on each layer (its own cost model, counted here from the file) against a
    budget between the layers' estimates: skipped where above, run where below, said in the
    warning, results.json and report.md; a budget every head exceeds is refused, by the
    console script too (one line, exit 1, no report folder)."""
    from featurecache import kinds

    ff = open_features(feats_path)
    rows = int(np.sum(np.asarray(ff.splits()) == "train"))
    folds = min(5, int(np.bincount(ff.y("train")).min()))  # make_folds' count
    est = {layer: kinds.get("knn").search_minutes(rows, ff.layers[layer].dim) * (folds + 1) / 6
           for layer in ("stem", "avgpool")}
    assert est["stem"] < est["avgpool"]  # knn's time grows with the features too
    budget = float(np.sqrt(est["stem"] * est["avgpool"]))
    with pytest.warns(UserWarning, match=r"knn on avgpool: skipped") as caught:
        res = compare(feats_path, tmp_path / "r", heads=["logreg", "knn"],
                      layers=["stem", "avgpool"], max_head_minutes=budget, progress=False,
                      n_boot=50, n_jobs=1)
    assert sorted((r["layer"], r["head"]) for r in res.rows) == \
        [("avgpool", "logreg"), ("stem", "knn"), ("stem", "logreg")]
    assert not [w for w in caught if "knn on stem" in str(w.message)]
    summary = json.loads((tmp_path / "r" / "results.json").read_text())
    (skip,) = summary["settings"]["skipped"]
    assert (skip["layer"], skip["head"], skip["train_rows"], skip["features"]) == \
        ("avgpool", "knn", rows, ff.layers["avgpool"].dim)
    assert skip["estimated_minutes"] == est["avgpool"]
    assert "Not run: knn on avgpool (" in (tmp_path / "r" / "report.md").read_text()
    # the same heads and layers with the default budget: every row (these are tiny)
    full = compare(feats_path, tmp_path / "full", heads=["logreg", "knn"],
                   layers=["stem", "avgpool"], progress=False, n_boot=50, n_jobs=1)
    assert len(full.rows) == 4
    same = {(r["layer"], r["head"]): r["cv_score"] for r in full.rows}
    assert all(same[(r["layer"], r["head"])] == r["cv_score"] for r in res.rows)

    with pytest.raises(FeaturecacheError, match="every head asked"):
        compare(feats_path, tmp_path / "none", heads=["knn"], max_head_minutes=1e-12,
                progress=False)
    assert not (tmp_path / "none").exists()
    r = subprocess.run([sys.executable, "-m", "featurecache.cli", "compare", str(feats_path),
                        "--heads", "knn", "--max-head-minutes", "1e-12", "-o",
                        str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "--max-head-minutes" in r.stderr
    assert not (tmp_path / "cli").exists()
