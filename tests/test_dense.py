"""Dense probes (issue 25): dense folders embedded whole with their masks and boxes, the
segmentation and detection probes against independent computations, grouped folds, saved
dense heads predicting new images, and one clear line for each bad dense input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache import embed, open_features
from featurecache.dense import cells
from featurecache.dense import heads as cell_heads

from .conftest import png_spread, shared_data


def _cli(args, cwd=None):
    return subprocess.run([sys.executable, "-m", "featurecache.cli", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True)


def _scene(root: Path, split: str, stem: str, size=(40, 30), seed=0, classes=3, mask=True):
    """A random image and a mask of blocks of class ids."""
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        root / split / "images" / f"{stem}.png")
    if mask:
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        m = np.zeros((size[1], size[0]), dtype=np.uint8)
        m[: size[1] // 2, : size[0] // 2] = 1 + seed % (classes - 1)
        m[-3:, -5:] = 255
        Image.fromarray(m).save(root / split / "masks" / f"{stem}.png")


def _scenes(root: Path, n=3, size=(40, 30), boxes=True) -> Path:
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("background\nsun\ntree\n")
    for split in ("train", "test"):
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "sun"},
                                                                 {"id": 2, "name": "tree"}]}
        for i in range(n):
            _scene(root, split, f"s{i}", size, seed=i + 10 * (split == "test"))
            coco["images"].append({"id": i + 1, "file_name": f"s{i}.png", "width": size[0],
                                   "height": size[1]})
            coco["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2,
                                        "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0})
        if boxes:
            (root / split / "annotations.json").write_text(json.dumps(coco))
    return root


# -- embed --------------------------------------------------------------------------------

def test_a_dense_folder_is_embedded_whole_with_its_masks_and_boxes(tmp_path, tiny_backbone):
    """Not cropped: the whole 40x30 image resized to 64x64, the mask resized with nearest
    neighbour (as PIL does it independently), the boxes scaled; the identity says so."""
    root = _scenes(tmp_path / "scenes")
    out = tmp_path / "s.h5"
    embed(root, out, backbone=tiny_backbone, layers=["avgpool"], keep_map=["stage4"],
          num_workers=0, progress=False)
    ff = open_features(out)
    assert ff.provenance["preprocess"]["whole"] is True
    assert ff.provenance["data_kind"] == "dense"
    assert ff.classes == ["background", "sun", "tree"]
    assert set(ff.targets) == {"mask", "boxes"} and "mask" not in ff.layers
    paths = ff.paths()
    masks = ff.target_rows("mask", range(len(paths)))
    boxes = ff.target_rows("boxes", range(len(paths)))
    for i, p in enumerate(paths):
        mpath = Path(p).parent.parent / "masks" / Path(p).name
        want = np.asarray(Image.open(mpath).resize((64, 64), Image.NEAREST))
        np.testing.assert_array_equal(masks[i], want)
        coco = json.loads((Path(p).parent.parent / "annotations.json").read_text())
        entry = next(e for e in coco["images"] if e["file_name"] == Path(p).name)
        (ann,) = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        x, y, w, h = ann["bbox"]
        assert boxes[i] == [[ann["category_id"], round(x * 64 / 40, 3), round(y * 64 / 30, 3),
                             round(w * 64 / 40, 3), round(h * 64 / 30, 3)]]
    # the backbone saw the whole image: the same map as a forward of the whole image resized
    import torch

    from featurecache.extract import FeatureExtractor

    bb = tiny_backbone
    whole = bb.preprocess.dense().transform()
    spec = ff.maps["stage4"]
    img = Image.open(paths[0]).convert("RGB")
    with torch.inference_mode():
        ref = FeatureExtractor(bb.model, [spec])(whole(img)[None])[spec.key][0].numpy()
    np.testing.assert_allclose(ff.map_rows("stage4", [0])[0].astype(np.float32), ref,
                               rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_targets_resume_and_join_to_what_one_run_stores(tmp_path, tiny_backbone):
    """A run killed in the middle resumes to the same masks and boxes; shards joined
    (virtual or copied) hold the same targets as one file."""
    from featurecache.store import join_shards

    from .conftest import forward_fails_at

    root = _scenes(tmp_path / "scenes", n=5)
    kw = {"backbone": tiny_backbone, "layers": ["avgpool"], "keep_map": ["stage4"],
          "num_workers": 0, "progress": False, "batch_size": 2, "commit_rows": 2}
    ref = open_features(embed(root, tmp_path / "ref.h5", **kw).path)
    n = ref.n_rows
    want_m, want_b = ref.target_rows("mask", range(n)), ref.target_rows("boxes", range(n))
    with forward_fails_at(3, "boom"):
        with pytest.raises(RuntimeError, match="boom"):
            embed(root, tmp_path / "cut.h5", **kw)
    r = embed(root, tmp_path / "cut.h5", **kw)
    assert r.resumed_from > 0
    cut = open_features(r.path)
    np.testing.assert_array_equal(cut.target_rows("mask", range(n)), want_m)
    assert cut.target_rows("boxes", range(n)) == want_b
    parts = [embed(root, tmp_path / f"p{i}.h5", shard=(i, 2), **kw).path for i in range(2)]
    for copy in (False, True):
        j = open_features(join_shards(parts, tmp_path / f"j{copy}.h5", copy=copy))
        assert set(j.targets) == {"mask", "boxes"}
        np.testing.assert_array_equal(j.target_rows("mask", range(n)), want_m)
        assert j.target_rows("boxes", range(n)) == want_b


@pytest.fixture(scope="module")
def scenes_h5(tmp_path_factory):
    """30 train + 30 test scenes of clipart_scenes embedded by the console script, as a user
    types it (real Lite0 weights; maps of stage3, stage4 and stage5)."""
    src = shared_data("clipart_scenes")
    out = tmp_path_factory.mktemp("dense") / "s.h5"
    res = _cli(["embed", src, "-o", out, "--keep-map", "stage3,stage4,stage5",
                "--max-per-class", "30", "-q"])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.slow
def test_the_shared_scenes_masks_are_stored_as_their_pngs(scenes_h5):
    ff = open_features(scenes_h5)
    classes = (shared_data("clipart_scenes") / "classes.txt").read_text().split()
    assert ff.classes == classes
    masks = ff.target_rows("mask", range(ff.n_rows))
    for i, p in enumerate(ff.paths()):
        png = Path(p).parent.parent / "masks" / (Path(p).stem + ".png")
        np.testing.assert_array_equal(masks[i], np.asarray(Image.open(png)))  # 224x224 already


# -- cells, folds, scores ----------------------------------------------------------------

def test_cell_labels_are_the_majority_under_each_cell_by_hand():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 4, (3, 12, 12)).astype(np.uint8)
    masks[0, :6, :6] = 255  # a cell of ignored pixels only
    got = cells.cell_labels(masks, 4, 4)
    for n in range(3):
        for i in range(4):
            for j in range(4):
                block = masks[n, 3 * i:3 * i + 3, 3 * j:3 * j + 3].ravel()
                block = block[block != 255]
                want = -1 if not len(block) else int(np.bincount(block, minlength=4).argmax())
                assert got[n, i, j] == want


def test_no_image_has_cells_on_both_sides_of_a_fold(monkeypatch):
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(17), rng.integers(5, 40, 17))
    X = rng.normal(size=(len(groups), 6)).astype(np.float32)
    y = rng.integers(0, 3, len(groups))
    seen = []
    real = cell_heads.grouped_folds

    def recording(g, folds):
        out = real(g, folds)
        seen.append(out)
        return out

    monkeypatch.setattr(cell_heads, "grouped_folds", recording)
    for name in cell_heads.names():
        cell_heads.get(name).search(X, y, groups, 3, folds=3, n_jobs=1)
    assert len(seen) == len(cell_heads.names())  # every head's search used the grouped folds
    for splits in seen:
        assert len(splits) == 3
        covered = np.zeros(len(groups), bool)
        for tr, te in splits:
            assert not set(groups[tr]) & set(groups[te])
            covered[te] = True
        assert covered.all()


def test_the_dense_head_names_are_the_declared_ones():
    from featurecache import options

    assert cell_heads.names() == options.DENSE_HEADS


def test_map50_of_known_detections():
    from featurecache.dense.detect import map50

    truth = [[[1, 10, 10, 20, 20]], [[2, 0, 0, 30, 30]]]
    perfect = [[[1, 10, 10, 20, 20, 0.9]], [[2, 0, 0, 30, 30, 0.8]]]
    assert map50(truth, perfect, 3, 64)[0] == pytest.approx(1.0)
    wrong_class = [[[2, 10, 10, 20, 20, 0.9]], [[1, 0, 0, 30, 30, 0.8]]]
    assert map50(truth, wrong_class, 3, 64)[0] == pytest.approx(0.0)
    half = [[[1, 10, 10, 20, 20, 0.9]], [[2, 40, 40, 10, 10, 0.8]]]  # class 2 missed
    m, per = map50(truth, half, 3, 64)
    assert per == {1: pytest.approx(1.0), 2: pytest.approx(0.0)} and m == pytest.approx(0.5)


# -- the probes on real scenes -------------------------------------------------------------

def _independent_probe(ff, layer, Cs, folds):
    """A plain scikit-learn probe: every labelled cell, GridSearchCV grouped by image on cell
    mIoU, test masks by bilinear upsampling of the decision values."""
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix, make_scorer
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    K = len(ff.classes)
    splits = np.array(ff.splits())
    train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    g = ff.maps[layer].shape[-1]

    def labels(mask):
        s = mask.shape[0] // g
        out = np.full((g, g), -1)
        for i in range(g):
            for j in range(g):
                b = mask[i * s:(i + 1) * s, j * s:(j + 1) * s].ravel()
                b = b[b != 255]
                if len(b):
                    out[i, j] = np.bincount(b, minlength=K).argmax()
        return out.ravel()

    X, y, groups = [], [], []
    maps = ff.map_rows(layer, train).astype(np.float32)
    masks = ff.target_rows("mask", train)
    for n, r in enumerate(train):
        lab = labels(masks[n])
        keep = lab >= 0
        X.append(maps[n].reshape(maps.shape[1], -1).T[keep])
        y.append(lab[keep])
        groups.append(np.full(keep.sum(), r))
    X, y, groups = np.concatenate(X), np.concatenate(y), np.concatenate(groups)

    def cell_miou(t, p):
        cm = confusion_matrix(t, p, labels=np.union1d(t, p))
        tp = np.diag(cm)
        return float(np.mean(tp / (cm.sum(0) + cm.sum(1) - tp)))

    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                          {"logisticregression__C": list(Cs),
                           "logisticregression__class_weight": [None, "balanced"]},
                          scoring=make_scorer(cell_miou), cv=GroupKFold(folds))
    search.fit(X, y, groups=groups)
    model = search.best_estimator_
    cm = np.zeros((K, K), np.int64)
    tmaps = ff.map_rows(layer, test).astype(np.float32)
    tmasks = ff.target_rows("mask", test)
    for n in range(len(test)):
        d = model.decision_function(tmaps[n].reshape(tmaps.shape[1], -1).T)
        full = np.full((g * g, K), -1e4, np.float32)
        full[:, model.classes_] = d
        up = F.interpolate(torch.from_numpy(full.T.reshape(1, K, g, g).copy()),
                           size=tmasks.shape[1:], mode="bilinear", align_corners=False)
        pred = up.argmax(1)[0].numpy()
        keep = tmasks[n] != 255
        cm += confusion_matrix(tmasks[n][keep], pred[keep], labels=np.arange(K))
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return search.best_params_, float(search.best_score_), float(np.nanmean(iou))


@pytest.mark.slow
def test_segment_agrees_with_a_plain_scikit_learn_probe(scenes_h5, tmp_path):
    from featurecache.dense.segment import segment

    ff = open_features(scenes_h5)
    res = segment(scenes_h5, tmp_path / "r", layers=["stage4"], hypercolumn=["none"],
                  heads=["logreg"], n_cells=30 * 196, n_jobs=1, n_boot=50, progress=False)
    (row,) = res.rows
    assert row["n_cells"] == int((cells.cell_labels(ff.target_rows("mask", range(30)), 14,
                                                    len(ff.classes)) >= 0).sum())
    params, cv, miou = _independent_probe(ff, "stage4", cell_heads.get("logreg").Cs, 3)
    assert (row["params"]["C"], row["params"]["class_weight"]) == (
        params["logisticregression__C"], params["logisticregression__class_weight"])
    assert row["cv_score"] == pytest.approx(cv, abs=0.01)
    assert row["miou"] == pytest.approx(miou, abs=0.01)
    assert row["miou_lo"] <= row["miou"] <= row["miou_hi"]


@pytest.mark.slow
def test_segment_and_detect_reports_and_their_heads_predict_new_images(scenes_h5, tmp_path):
    rep = tmp_path / "rep"
    res = _cli(["segment", scenes_h5, "-o", rep, "-q", "--layers", "stage4,stage5",
                "--hypercolumn", "stage4+stage5", "--n-cells", "3000", "--n-boot", "50"])
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((rep / "results.json").read_text())
    rows = data["rows"]
    assert [(r["layer"], r["head"]) for r in rows] == [
        (lay, h) for lay in ("stage4", "stage5", "stage4+stage5") for h in ("logreg", "knn")]
    assert data["winner"] == max(rows, key=lambda r: r["cv_score"])
    for r in rows:
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_accuracy"] <= 1
        assert set(r["per_class_iou"]) <= set(open_features(scenes_h5).classes)
    text = (rep / "report.md").read_text()
    assert "not the DINOv2" in text and "predictions.png" in text
    assert png_spread(rep / "predictions.png") > 5 and png_spread(rep / "layer_depth.png") > 5

    # the saved head on the test images' files: the masks it predicted from the stored maps
    from featurecache.dense.model import _segment_outputs
    from featurecache.saved import load_model

    ff = open_features(scenes_h5)
    test = [i for i, s in enumerate(ff.splits()) if s == "test"][:3]
    paths = [ff.paths()[i] for i in test]
    res = _cli(["predict", rep / "best.joblib", *paths, "-o", tmp_path / "masks"])
    assert res.returncode == 0, res.stderr[-2000:]
    res = _cli(["export", rep / "best.joblib", "-o", tmp_path / "seg.onnx"])  # refused, one line
    assert res.returncode == 1 and "dense heads are not exported" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "seg.onnx").exists()
    head = load_model(rep / "best.joblib")
    probe = cells.Probe(tuple(head.layers), head.grid, sum(ff.maps[n].shape[0] for n in
                                                           head.layers), 0)
    want = _segment_outputs(head, cells.grid_features(ff, probe, test), [(224, 224)] * 3)
    for p, w in zip(paths, want):
        got = np.asarray(Image.open(tmp_path / "masks" / (Path(p).stem + ".png")))
        assert got.shape == (224, 224)
        assert (got == w).mean() > 0.99  # the same maps, recomputed from the images

    det = tmp_path / "det"
    res = _cli(["detect", scenes_h5, "-o", det, "-q", "--layers", "stage4,stage5",
                "--hypercolumn", "none", "--n-cells", "3000"])
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((det / "results.json").read_text())
    assert [r["layer"] for r in data["rows"]] == ["stage4", "stage5"]
    assert all(0 <= r["map50"] <= 1 for r in data["rows"])
    assert data["winner"] == max(data["rows"], key=lambda r: r["cv_score"])
    res = _cli(["predict", det / "best.joblib", *paths, "-o", tmp_path / "boxes.json"])
    assert res.returncode == 0, res.stderr[-2000:]
    coco = json.loads((tmp_path / "boxes.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == paths
    assert {c["name"] for c in coco["categories"]} == set(ff.classes[1:])
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 224.01 and y + h <= 224.01 and 0 < a["score"] <= 1


# -- bad inputs -----------------------------------------------------------------------------

def _broken(root: Path, what: str) -> Path:
    _scenes(root)
    if what == "no mask":
        (root / "train" / "masks" / "s1.png").unlink()
    elif what == "no image":
        shutil.copyfile(root / "train" / "masks" / "s1.png", root / "train" / "masks" / "s9.png")
    elif what == "mask size":
        Image.new("L", (20, 20)).save(root / "test" / "masks" / "s0.png")
    elif what == "class id":
        m = np.asarray(Image.open(root / "train" / "masks" / "s2.png")).copy()
        m[0, 0] = 7
        Image.fromarray(m).save(root / "train" / "masks" / "s2.png")
    elif what == "coco image":
        coco = json.loads((root / "test" / "annotations.json").read_text())
        coco["images"].append({"id": 99, "file_name": "ghost.png", "width": 40, "height": 30})
        (root / "test" / "annotations.json").write_text(json.dumps(coco))
    elif what == "box outside":
        coco = json.loads((root / "train" / "annotations.json").read_text())
        coco["annotations"][0]["bbox"] = [30, 20, 25, 8]
        (root / "train" / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("what, fragment", [
    ("no mask", "have no mask in"),
    ("no image", "have no image in"),
    ("mask size", "the mask is 20x20, its image 40x30"),
    ("class id", "class id 7 not in classes.txt"),
    ("coco image", "names image 'ghost.png'"),
    ("box outside", "lies outside the image"),
])
def test_a_bad_dense_input_is_one_line(what, fragment, tmp_path):
    root = _broken(tmp_path / "scenes", what)
    out = tmp_path / "s.h5"
    res = _cli(["embed", root, "-o", out, "--weights", "none", "--keep-map", "stage4", "-q"])
    assert res.returncode == 1, res.stderr[-2000:]
    assert fragment in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr  # one line
    assert not out.exists()


@pytest.mark.slow
def test_a_probe_of_a_file_without_masks_or_maps_is_one_line(tmp_path, feats_path, tiny_backbone):
    root = _scenes(tmp_path / "scenes", boxes=False)
    nomaps = tmp_path / "nomaps.h5"
    embed(root, nomaps, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
          progress=False)
    for args, fragment in [
        (["segment", feats_path, "-o", tmp_path / "r1"], "holds no mask targets"),
        (["segment", nomaps, "-o", tmp_path / "r2"], "stores no feature maps"),
        (["detect", nomaps, "-o", tmp_path / "r3"], "holds no boxes targets"),
    ]:
        res = _cli(args)
        assert res.returncode == 1 and fragment in res.stderr, (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
        assert not Path(args[3]).exists()
