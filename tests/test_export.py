"""featurecache export (issue 26): one model file from uint8 images to the head's classes and
probabilities, equal to `featurecache predict` on the shared data, run by onnxruntime and
by plain torch in processes that cannot import featurecache."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurecache import embed
from featurecache.errors import ExportError
from featurecache.heads import fit_head
from featurecache.predict import expand_images, predict

from .conftest import shared_data

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
SLOW = pytest.mark.slow  # real weights on the shared data sets

README = Path(__file__).resolve().parents[1] / "README.md"
# featurecache (and, for onnxruntime, torch) made unimportable in the child: the guard
GUARD = ("import sys\nfor m in {mods}: sys.modules[m] = None\n"
         "try:\n    import featurecache\nexcept ImportError:\n    pass\n"
         "else:\n    raise SystemExit('the guard let featurecache in')\n")


def _cli(*args, cwd=None):
    out = subprocess.run([sys.executable, "-m", "featurecache.cli", *map(str, args)],
                         capture_output=True, text=True, cwd=cwd)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _guarded(code: str, mods, cwd) -> str:
    """Run ``code`` in a fresh interpreter where ``mods`` cannot be imported; its stdout."""
    out = subprocess.run([sys.executable, "-c", GUARD.format(mods=list(mods)) + code],
                         capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _uint8(paths, pre) -> np.ndarray:
    """The graph's input by torchvision's own Resize + CenterCrop on the decoded PIL image
    (independent of the README script and of featurecache's tensor transform)."""
    from torchvision import transforms as T

    from featurecache.data.decode import read_file

    mode = T.InterpolationMode(pre["interpolation"])
    tf = T.Compose([T.Resize(pre["resize_size"], interpolation=mode),
                    T.CenterCrop(pre["crop_size"])])
    return np.stack([np.asarray(tf(read_file(p))) for p in paths])


def _predicted(model, paths):
    """`featurecache predict`'s rows as (classes, full score matrix, are they probabilities)."""
    rows = predict(model, paths, top_k=1000)
    first = rows[0]["top_k"]
    order = sorted(c for c, _ in first)
    names = [r["predicted"] for r in rows]
    scores = np.array([[dict(r["top_k"])[c] for c in order] for r in rows])
    return names, order, scores, rows[0]["probability"] is not None


def _meta(path):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    return sess, meta


@pytest.mark.slow
def test_a_head_on_the_small_fixture_exports_as_predict_predicts(feats_path, image_folder,
                                                                   tmp_path):
    """The fast part of the suite's export check (64 px, synthetic colours, an a+b head)."""
    from featurecache.export import export

    head = fit_head(feats_path, "blocks.5+avgpool", "logreg", n_jobs=1)
    info = export(head.save(tmp_path / "h.joblib"), tmp_path / "m.onnx")
    assert info["preprocess"]["crop_size"] == 64 and info["max_difference"] < 1e-5
    sess, meta = _meta(tmp_path / "m.onnx")
    paths = expand_images([image_folder])
    names, classes, want, _ = _predicted(head, paths)
    got = sess.run(None, {"images": _uint8(paths, meta["preprocess"])})[-1]
    assert [classes[i] for i in got.argmax(1)] == names and len(names) == 18
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """clipart10 (real Lite0 weights, the default 256/224 preprocessing), 6 images a class
    and split: two pooled layers and the map of stage4 for a fine-tune."""
    out = tmp_path_factory.mktemp("export") / "clip.h5"
    embed(shared_data("clipart10"), out, layers=["stage3", "avgpool"], keep_map=["stage4"],
          max_per_class=6, num_workers=0, progress=False)
    return out


def _test_images(data, n_per_class=2):
    paths = expand_images([shared_data(data) / "test"])
    by_class = {}
    for p in paths:
        by_class.setdefault(Path(p).parent.name, []).append(p)
    return [p for ps in by_class.values() for p in ps[:n_per_class]]


@SLOW
def test_the_readme_script_classifies_photos_as_predict_does(clip, tmp_path):
    """The issue's scenario: a head from the console script, `featurecache export`, then the
    README's onnxruntime script (featurecache and torch unimportable) on a photos/ folder."""
    head = tmp_path / "best.joblib"
    assert _cli("fit-head", "logreg", clip, "--layer", "avgpool", "-o", head, "-q").returncode == 0
    res = _cli("export", head, "-o", tmp_path / "clip.onnx", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "uint8 RGB (N, 224, 224, 3)" in res.stdout and "probabilities" in res.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in _test_images("clipart10"):
        (photos / f"{Path(p).parent.name}-{Path(p).name}").write_bytes(Path(p).read_bytes())
    script = re.search(r"```python\n(import json, numpy as np, onnxruntime.*?)```",
                       README.read_text(), re.S).group(1)
    out = _guarded(script, ["featurecache", "torch"], cwd=tmp_path)
    got = {Path(line.split(",")[0]).name: line.split(",")[1:] for line in out.splitlines()}
    rows = predict(head, [photos])
    assert len(got) == len(rows) == 20
    for r in rows:
        cls, prob = got[Path(r["path"]).name]
        assert cls == r["predicted"]
        assert abs(float(prob) - r["probability"]) <= 1e-4 + 5e-7  # printed to 6 decimals

    sess, meta = _meta(tmp_path / "clip.onnx")
    from featurecache.heads import load_head

    h = load_head(head)
    assert meta["classes"] == list(h.column_classes) == sorted(meta["classes"])
    assert {"resize_size": 256, "crop_size": 224, "interpolation": "bilinear"}.items() \
        <= meta["preprocess"].items()
    prov = meta["provenance"]
    assert prov["layer"] == "avgpool" and prov["head"] == "logreg"
    assert re.fullmatch(r"[0-9a-f]{64}", prov["weights_sha256"]) and prov["onnx_opset"] >= 18
    assert prov["featurecache_version"] and prov["backbone"] == "efficientnet_lite0"
    assert [o.name for o in sess.get_inputs()] == ["images"]
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities"]


# (kind, layer, fit options, data): every exportable kind, a concatenated head, binary heads
CASES = {
    "logreg-concat": ("logreg", "stage3+avgpool", {}, "clipart10"),
    "svm-probability": ("svm", "avgpool", {"probability": True}, "clipart10"),
    "svm-scores": ("svm", "avgpool", {}, "clipart10"),
    "knn": ("knn", "avgpool", {}, "clipart10"),
    "mlp": ("mlp", "avgpool", {"mlp_widths": (64,)}, "clipart10"),
    "binary-svm": ("svm", "avgpool", {}, "lfw_faces"),
    "binary-logreg": ("logreg", "stage3", {}, "lfw_faces"),
    "binary-mlp": ("mlp", "avgpool", {"mlp_widths": (64,)}, "lfw_faces"),
}
# The graph rounds the features to the stored float16 as predict does; where onnxruntime's
# convolutions put a feature on the other side of a float16 rounding boundary than torch's,
# that feature moves by one float16 step, which an MLP amplifies (measured up to 3e-4 on
# clipart10's float16 features; the float32-stored faces hold 1e-4 for every head).
TOLERANCE = {"mlp": 1e-3}


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """lfw_faces (two classes, 25x25 grayscale: converted and upscaled like any input),
    stored as float32."""
    out = tmp_path_factory.mktemp("export") / "faces.h5"
    embed(shared_data("lfw_faces"), out, layers=["stage3", "avgpool"], max_per_class=15,
          dtype="float32", num_workers=0, progress=False)
    return out


@SLOW
@pytest.mark.parametrize("case", list(CASES))
def test_each_exported_head_equals_predict_under_onnxruntime(case, clip, faces, tmp_path):
    from featurecache.export import export

    kind, layer, opts, data = CASES[case]
    head = fit_head(clip if data == "clipart10" else faces, layer, kind, n_jobs=1, **opts)
    path = head.save(tmp_path / "h.skops")
    info = export(path, tmp_path / "m.onnx")
    sess, meta = _meta(tmp_path / "m.onnx")
    paths = _test_images(data, 3)
    images = _uint8(paths, meta["preprocess"])
    names, classes, want, are_proba = _predicted(head, paths)
    assert meta["classes"] == classes == info["classes"]
    all_at_once = sess.run(None, {"images": images})
    one_by_one = [sess.run(None, {"images": images[i:i + 1]}) for i in range(len(paths))]
    last = all_at_once[-1]
    assert last.shape == (len(paths), len(classes))
    np.testing.assert_allclose(np.concatenate([o[-1] for o in one_by_one]), last, atol=1e-5)
    assert [classes[i] for i in last.argmax(1)] == names
    scores = last if are_proba else all_at_once[0]  # predict's score: probability or decision
    assert meta["outputs"][-1] == ("probabilities" if are_proba else "scores")
    tol = TOLERANCE.get(case, 1e-4)
    np.testing.assert_allclose(scores, want, atol=tol * max(1.0, np.abs(want).max()))
    if are_proba:
        np.testing.assert_allclose(last.sum(1), 1, atol=1e-5)


@SLOW
def test_a_finetune_exports_and_runs_under_onnxruntime_and_plain_torch(clip, tmp_path):
    """A fine-tune (frozen bottom + tuned top) as .onnx and .pt2; the .pt2 loaded by torch in a
    process where featurecache cannot be imported."""
    from featurecache.finetune import finetune

    finetune(clip, tmp_path / "ft", from_layer="stage4", epochs=2, patience=2, seed=1,
             progress=False)
    for suffix in (".onnx", ".pt2"):
        res = _cli("export", tmp_path / "ft", "-o", tmp_path / f"ft{suffix}")
        assert res.returncode == 0, res.stderr
    paths = _test_images("clipart10", 2)
    names, classes, want, _ = _predicted(tmp_path / "ft", paths)
    sess, meta = _meta(tmp_path / "ft.onnx")
    images = _uint8(paths, meta["preprocess"])
    assert meta["provenance"]["from_layer"] == "stage4" and meta["classes"] == classes
    got = sess.run(None, {"images": images})[-1]
    assert [classes[i] for i in got.argmax(1)] == names
    np.testing.assert_allclose(got, want, atol=1e-4)

    np.save(tmp_path / "images.npy", images)
    code = ("import json, numpy as np, torch\n"
            "extra = {'featurecache.json': ''}\n"
            "m = torch.export.load('ft.pt2', extra_files=extra).module()\n"
            "x = torch.from_numpy(np.load('images.npy'))\n"
            "p = m(x)[-1].detach().numpy(); q = m(x[:1])[-1].detach().numpy()\n"
            "np.save('pt2.npy', p); assert np.allclose(q, p[:1], atol=1e-5)\n"
            "print(json.loads(json.loads(extra['featurecache.json'])['classes']) == "
            f"{classes!r})\n")
    assert _guarded(code, ["featurecache"], cwd=tmp_path).strip() == "True"
    np.testing.assert_allclose(np.load(tmp_path / "pt2.npy"), want, atol=1e-4)


@pytest.mark.slow
def test_what_cannot_be_exported_is_one_line_and_leaves_no_file(feats_path, tmp_path):
    clip = feats_path
    rbf = fit_head(clip, "avgpool", "svm", kernel="rbf", n_jobs=1).save(tmp_path / "rbf.joblib")
    lr = tmp_path / "lr.joblib"
    assert _cli("fit-head", "logreg", clip, "--layer", "avgpool", "-o", lr, "-q").returncode == 0
    cases = [
        ([rbf, "-o", tmp_path / "a.onnx"], "--kernel linear"),
        ([lr, "-o", tmp_path / "a.pt"], ".pt2"),
        ([tmp_path / "missing.joblib", "-o", tmp_path / "a.onnx"], "missing.joblib"),
        ([lr, "-o", tmp_path / "nowhere" / "a.onnx"], "nowhere"),
    ]
    for args, fragment in cases:
        res = _cli("export", *args)
        assert res.returncode != 0, args
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error") and fragment in lines[0], lines
    res = _cli("export", lr, "-o", tmp_path / "a.onnx", "--opset", "7")  # click's usage error
    assert res.returncode == 2 and "'--opset': 7 is not in the range x>=18" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "imgs", "lr.joblib", "rbf.joblib"]


@pytest.mark.slow
def test_a_file_that_disagrees_with_the_model_is_not_kept(feats_path, tmp_path, monkeypatch):
    """The check after writing: a file whose outputs drift is refused, nothing left behind."""
    from featurecache import export as ex

    head = fit_head(feats_path, "avgpool", "logreg", n_jobs=1).save(tmp_path / "h.joblib")
    real = ex.Onnx.run
    monkeypatch.setattr(ex.Onnx, "run", lambda self, p, x: [o + 1e-3 for o in real(self, p, x)])
    with pytest.raises(ExportError, match="differs from the model"):
        ex.export(head, tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["f.h5", "h.joblib", "imgs"]


def test_torch_heads_equal_the_pipelines_on_features_with_large_means(tmp_path):
    """Every exportable estimator the kinds make, as torch layers, against scikit-learn's own
    predict_proba / decision_function (float64) on features whose means dwarf their spread
    (the scaler's mean folded into the bias lost 6.8e-4 of a logit in float32 there); the
    primal LinearSVC branch (narrow layers), binary and multi-class, calibrated or not."""
    import torch
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from featurecache import kinds
    from featurecache.estimators import GramLinearSVC

    rng = np.random.default_rng(0)
    for n_classes in (2, 4):
        y = np.repeat(np.arange(n_classes), 40)
        X = 10 + rng.normal(0, 3e-3, (len(y), 24)) + 3e-3 * np.eye(n_classes)[y] @ \
            rng.normal(0, 1, (n_classes, 24))
        X = X.astype(np.float32)
        cases = [("logreg", LogisticRegression(C=100, max_iter=5000)),
                 ("svm", LinearSVC(C=1, max_iter=20000)),
                 ("svm", GramLinearSVC(C=1)),
                 ("svm", CalibratedClassifierCV(LinearSVC(C=1, max_iter=20000), cv=3)),
                 ("mlp", MLPClassifier((16,), max_iter=2000, random_state=0))]
        for kind, est in cases:
            pipe = Pipeline([("scale", StandardScaler()), ("clf", est)]).fit(X, y)
            head = kinds.get(kind).torch_head(pipe).eval()
            with torch.no_grad():
                got = head(torch.from_numpy(X))[-1].numpy()
            X64 = X.astype(np.float64)
            if hasattr(pipe, "predict_proba") and head.outputs[-1] == "probabilities":
                want = pipe.predict_proba(X64)
            else:
                d = pipe.decision_function(X64)
                want = np.stack([-d, d], 1) if d.ndim == 1 else d
            err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
            assert err < 5e-5, (n_classes, type(est).__name__, err)  # old fold: 7.9e-5


@pytest.mark.slow
def test_export_refuses_to_write_over_its_model_and_a_file_it_cannot_run(feats_path, tmp_path,
                                                                         monkeypatch):
    from featurecache import export as ex

    head = fit_head(feats_path, "avgpool", "logreg", n_jobs=1).save(tmp_path / "h.onnx")
    with pytest.raises(ExportError, match="is the model itself"):
        ex.export(head, head)  # a joblib head under any name: never replaced by its export

    def broken(self, path, images):
        raise RuntimeError("ONNX Runtime: opset 28 is not supported\nmore")

    monkeypatch.setattr(ex.Onnx, "run", broken)
    with pytest.raises(ExportError, match="does not run here .*opset 28.*--skip-check"):
        ex.export(head, tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["f.h5", "h.onnx", "imgs"]
