"""Heads: the search, persistence and compatibility checks, on features with known structure."""

import numpy as np
import pytest

from featurecache import embed, open_features
from featurecache.errors import HeadError, UnknownLayerError
from featurecache.heads import coarse_grid, fit_head, load_head, search


@pytest.fixture
def feats(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    embed(image_folder, out, backbone=tiny_backbone, layers=["blocks.5", "avgpool"],
          num_workers=0, progress=False)
    return open_features(out)


def blobs(n, d, noise, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(0, 1, (n, d))
    X[:, 0] += np.where(y == 1, 1.0, -1.0) * (1 / noise)
    return X.astype(np.float16), y


def test_search_walks_the_wide_grid_then_refines():
    X, y = blobs(120, 10, 0.5, 0)
    _, params, score, table = search(X, y, "logreg", cv=3, early_stop=False)
    coarse = [r for r in table if r["stage"] == 1]
    fine = [r for r in table if r["stage"] == 2]
    assert [r["params"]["C"] for r in coarse] == [10.0 ** e for e in range(-6, 7)]
    assert len(fine) == 6 and all(len(r["folds"]) == 3 for r in table)
    best_coarse = max(coarse, key=lambda r: r["mean"])["params"]["C"]
    assert all(best_coarse / 10 < r["params"]["C"] < best_coarse * 10 for r in fine)
    # the best CV score of the grid, against a plain scikit-learn grid search over the same C
    # values on the same folds (a cold, converged fit per point, scaled inside each fold)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    plain = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=10000, tol=1e-6)),
        {"logisticregression__C": [r["params"]["C"] for r in table]}, scoring="balanced_accuracy",
        cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(X.astype(np.float64), y)
    assert score == pytest.approx(plain.best_score_) and score > 0.9
    assert np.allclose([r["mean"] for r in table], plain.cv_results_["mean_test_score"])
    assert len(coarse_grid("svm", "rbf", 100)) == 13 * 4
    # with early stopping the table still lists every grid point, saying which were skipped
    _, _, _, short = search(X, y, "logreg", cv=3)
    assert [r["params"] for r in short] [:13] == [r["params"] for r in coarse]
    assert {r["status"] for r in short} <= {"evaluated", "partial", "skipped"}
    assert all(r["mean"] is None for r in short if r["status"] != "evaluated")


def test_chosen_C_follows_the_data():
    """Many noisy features and few rows want strong regularisation; data whose classes only
    separate along a direction the class means do not show (x1 - x2) want little."""
    rng = np.random.default_rng(1)
    n, d = 40, 400
    y = np.repeat([0, 1], n // 2)
    X_noisy = rng.normal(0, 1, (n, d)) + np.outer(np.where(y == 1, 0.25, -0.25), np.ones(d))
    z = rng.normal(0, 5, n)  # shared nuisance, much larger than the signal
    X_clean = np.c_[z + np.where(y == 1, 1.0, -1.0), z]
    _, p_noisy, s_noisy, _ = search(X_noisy, y, "logreg", cv=4, n_jobs=1)
    _, p_clean, s_clean, _ = search(X_clean, y, "logreg", cv=4, n_jobs=1)
    assert p_noisy["C"] < p_clean["C"] / 100, (p_noisy, p_clean)
    assert s_noisy > 0.8 and s_clean > 0.95


@pytest.mark.parametrize("kind,kernel", [("logreg", "linear"), ("svm", "linear"), ("svm", "rbf"),
                                         ("knn", "linear")])
def test_heads_separate_colour_classes(feats, kind, kernel, tmp_path):
    head = fit_head(feats, "avgpool", kind, kernel=kernel)
    acc = (head.predict(feats.X("avgpool", "test")) == feats.y("test")).mean()
    assert acc >= 0.8, acc
    assert head.classes == ["blue", "green", "red"] and head.layer == "avgpool"
    assert ("gamma" in head.params_) == (kernel == "rbf") and ("k" in head.params_) == (kind == "knn")
    assert head.scoring == "balanced_accuracy" and len(head.meta["cv_fold_scores"]) == 4
    assert head.meta["cv"] == "stratified 4-fold"  # 4 train images per class
    path = head.save(tmp_path / "h.joblib")
    again = load_head(path)
    np.testing.assert_array_equal(again.predict(feats.X("avgpool")), head.predict(feats.X("avgpool")))
    assert again.provenance["specs"][0]["dim"] == 1280


def test_svm_probabilities_only_when_asked(feats):
    plain = fit_head(feats, "avgpool", "svm")
    assert plain.predict_proba(feats.X("avgpool")) is None
    assert plain.scores(feats.X("avgpool")).shape == (18, 3)
    prob = fit_head(feats, "avgpool", "svm", kernel="rbf", probability=True)
    p = prob.predict_proba(feats.X("avgpool"))
    # the columns are the head's classes in order: the likeliest class of every image is its
    # colour; and the numbers are a plain scikit-learn sigmoid calibration's (4 folds: 4
    # train images per class)
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    names = np.array(prob.classes)[p.argmax(1)]
    assert names.tolist() == [feats.classes[i] for i in feats.y()]
    plain = make_pipeline(StandardScaler(), CalibratedClassifierCV(
        SVC(kernel="rbf", C=prob.params_["C"], gamma=prob.params_["gamma"], random_state=0),
        ensemble=False, cv=4)).fit(feats.X("avgpool", "train"), feats.y("train"))
    np.testing.assert_allclose(p, plain.predict_proba(feats.X("avgpool")), atol=1e-6)


def test_concatenated_layers(feats):
    head = fit_head(feats, "blocks.5+avgpool", "logreg")
    assert head.pipeline_[0].n_features_in_ == 80 + 1280
    assert [s["name"] for s in head.provenance["specs"]] == ["blocks.5", "avgpool"]


def test_bad_inputs(feats, tmp_path):
    with pytest.raises(UnknownLayerError, match=r"'blocks\.7' is not stored.*blocks\.5, avgpool"):
        fit_head(feats, "blocks.7", "logreg")
    with pytest.raises(HeadError, match="head 'tree'"):
        fit_head(feats, "avgpool", "tree")
    X, _ = blobs(20, 3, 1, 0)
    with pytest.raises(HeadError, match="single class"):
        search(X, np.zeros(20, int))
    (tmp_path / "x.joblib").write_text("not a pickle")
    with pytest.raises(HeadError, match="cannot read .*x.joblib"):
        load_head(tmp_path / "x.joblib")
    import joblib

    joblib.dump({"some": "dict"}, tmp_path / "y.joblib")
    with pytest.raises(HeadError, match="is not a featurecache head"):
        load_head(tmp_path / "y.joblib")


def test_head_refuses_features_from_another_layer_setup(feats, image_folder, tiny_backbone, tmp_path):
    head = fit_head(feats, "avgpool", "logreg")
    head.check_compatible(feats.layer_provenance("avgpool"))  # same file: fine
    other = tmp_path / "max.h5"
    embed(image_folder, other, backbone=tiny_backbone, layers=["avgpool"], pool="max",
          num_workers=0, progress=False)
    with pytest.raises(HeadError, match=r"specs = .*'pool': 'avg'.*'pool': 'max'"):
        head.check_compatible(open_features(other).layer_provenance("avgpool"))


def test_mlp_head_searches_width_and_alpha_and_learns_a_nonlinear_rule(tmp_path):
    """XOR of two features: no linear head can beat chance, one hidden layer can."""
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (400, 6))
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)
    pipe, params, score, table = search(X[:300], y[:300], "mlp", cv=3, n_jobs=1,
                                        mlp_widths=(8, 64))
    assert sorted({(r["params"]["hidden"], r["params"]["alpha"]) for r in table}) == \
        sorted((h, a) for h in (8, 64) for a in (1.0, 1e-2, 1e-4))
    assert all(r["stage"] == 1 for r in table)  # no second sweep
    mlp_acc = (pipe.predict(X[300:]) == y[300:]).mean()
    linear, *_ = search(X[:300], y[:300], "logreg", cv=3, n_jobs=1)
    linear_acc = (linear.predict(X[300:]) == y[300:]).mean()
    assert mlp_acc >= 0.85 and linear_acc <= 0.7, (mlp_acc, linear_acc)
    assert type(pipe[-1]).__name__ == "MLPClassifier" and pipe[-1].early_stopping
    assert pipe[-1].hidden_layer_sizes == (params["hidden"],) and pipe[-1].alpha == params["alpha"]


@pytest.mark.slow
def test_mlp_head_is_saved_like_the_others(feats, tmp_path):
    head = fit_head(feats, "avgpool", "mlp", mlp_widths=[32], class_weight="balanced")
    assert (head.predict(feats.X("avgpool", "test")) == feats.y("test")).mean() >= 0.8
    assert {r["params"]["hidden"] for r in head.cv_results_} == {32}
    assert not head.pipeline_[-1].early_stopping  # 12 training rows: no stratified 10% left
    for name in ("h.joblib", "h.skops"):
        again = load_head(head.save(tmp_path / name))
        np.testing.assert_array_equal(again.scores(feats.X("avgpool")),
                                      head.scores(feats.X("avgpool")))
    from featurecache.errors import OptionError
    with pytest.raises(OptionError, match=r"mlp_widths: \[0\] below 1"):
        fit_head(feats, "avgpool", "mlp", mlp_widths=[0])
