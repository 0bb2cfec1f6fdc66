"""Stored feature maps (embed keep_map): the unpooled (N, C, S, S) input of the top blocks,
beside the pooled layers, in the same resumable write."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from featurecache import embed, open_features
from featurecache.errors import OptionError, UnknownLayerError
from featurecache.store import join_shards

from .conftest import forward_fails_at


def run(src, out, bb, **kw):
    kw = {"layers": ["stage4", "avgpool"], "keep_map": ["stage4"], "num_workers": 0,
          "batch_size": 4, "progress": False, **kw}
    return embed(src, out, backbone=bb, **kw)


def test_a_stored_map_is_the_layer_before_pooling(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    r = run(image_folder, out, tiny_backbone)
    ff = open_features(out)
    assert list(ff.layers) == ["stage4", "avgpool"] and list(ff.maps) == ["stage4"]
    assert [m.name for m in r.maps] == ["stage4"] and [s.name for s in r.layers] == ["stage4", "avgpool"]
    spec = ff.maps["stage4"]
    c = ff.layers["stage4"].dim
    assert spec.shape == (c, 4, 4) and spec.pool == "map"  # 64 px input, 1/16
    with h5py.File(out) as f:
        d = f["maps/stage4"]
        assert d.shape == (ff.n_rows, c, 4, 4) and d.chunks == (1, c, 4, 4) and d.dtype == np.float16
    maps = ff.map_rows("stage4", np.arange(ff.n_rows))
    # its spatial mean is the stored pooled layer (both float16 of the same float32 map)
    np.testing.assert_allclose(maps.astype(np.float32).mean((2, 3)),
                               ff.X("stage4").astype(np.float32), rtol=2e-2, atol=2e-2)
    # and it is the backbone's own output at that node, computed here independently
    from torchvision.models.feature_extraction import create_feature_extractor

    from featurecache.data import load_image

    node = spec.node
    model = create_feature_extractor(tiny_backbone.model.eval(), {node: "m"})
    x = tiny_backbone.preprocess.transform()(load_image(ff.paths()[3]))[None]
    with torch.inference_mode():
        ref = model(x)["m"][0].numpy()
    np.testing.assert_allclose(maps[3].astype(np.float32), ref, rtol=2e-2, atol=2e-2)
    rows = [5, 0, 9]
    np.testing.assert_array_equal(ff.map_rows("stage4", rows), maps[rows])
    info = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(out)],
                          capture_output=True, text=True)
    assert "map stage4" in info.stdout and "MiB on disk" in info.stdout


@pytest.mark.slow
def test_map_size_average_pools_the_stored_map(image_folder, tiny_backbone, tmp_path):
    full = open_features(run(image_folder, tmp_path / "a.h5", tiny_backbone).path)
    small = open_features(run(image_folder, tmp_path / "b.h5", tiny_backbone, map_size=2).path)
    a = full.map_rows("stage4", range(full.n_rows)).astype(np.float32)
    b = small.map_rows("stage4", range(small.n_rows)).astype(np.float32)
    assert b.shape[1:] == (a.shape[1], 2, 2)
    pooled = a.reshape(len(a), a.shape[1], 2, 2, 2, 2).mean((3, 5))
    np.testing.assert_allclose(b, pooled, rtol=2e-2, atol=2e-2)
    assert full.provenance["fingerprint"] != small.provenance["fingerprint"]


@pytest.mark.slow
def test_a_run_with_maps_resumes_to_the_same_bytes(image_folder, tiny_backbone, tmp_path,
                                                   monkeypatch):
    ref = tmp_path / "ref.h5"
    run(image_folder, ref, tiny_backbone, commit_rows=4)
    out = tmp_path / "cut.h5"
    with forward_fails_at(3, "boom"):
        with pytest.raises(RuntimeError, match="boom"):
            run(image_folder, out, tiny_backbone, commit_rows=4)
    r = run(image_folder, out, tiny_backbone, commit_rows=4)
    assert r.resumed_from > 0
    a, b = open_features(ref), open_features(out)
    np.testing.assert_array_equal(a.map_rows("stage4", range(a.n_rows)),
                                  b.map_rows("stage4", range(b.n_rows)))
    np.testing.assert_array_equal(a.X("avgpool"), b.X("avgpool"))


@pytest.mark.slow
def test_maps_survive_a_join(image_folder, tiny_backbone, tmp_path):
    ref = open_features(run(image_folder, tmp_path / "all.h5", tiny_backbone).path)
    parts = [run(image_folder, tmp_path / f"s{i}.h5", tiny_backbone, shard=(i, 2)).path
             for i in range(2)]
    for copy in (False, True):
        joined = open_features(join_shards(parts, tmp_path / f"j{copy}.h5", copy=copy))
        assert joined.maps == ref.maps and joined.provenance["joined_as"] == \
            ("copy" if copy else "virtual")
        # other batches, other float rounding: equal to float16 precision
        np.testing.assert_allclose(joined.map_rows("stage4", range(joined.n_rows)).astype(float),
                                   ref.map_rows("stage4", range(ref.n_rows)).astype(float),
                                   rtol=1e-2, atol=1e-2)
        shard = open_features(parts[1])
        np.testing.assert_array_equal(joined.map_rows("stage4", [ref.n_rows - 1]),
                                      shard.map_rows("stage4", [shard.n_rows - 1]))


@pytest.mark.slow
def test_bad_map_requests_are_named(image_folder, tiny_backbone, tmp_path):
    with pytest.raises(OptionError, match="'classifier' is a vector layer, not a feature map"):
        run(image_folder, tmp_path / "x.h5", tiny_backbone, keep_map=["classifier"])
    with pytest.raises(OptionError, match=r"map_size = 5 is larger than the 4x4 map"):
        run(image_folder, tmp_path / "x.h5", tiny_backbone, map_size=5)
    with pytest.raises(UnknownLayerError, match="close matches"):
        run(image_folder, tmp_path / "x.h5", tiny_backbone, keep_map=["stage44"])
    assert not list(tmp_path.glob("x.h5*"))
    ff = open_features(run(image_folder, tmp_path / "plain.h5", tiny_backbone, keep_map=[]).path)
    with pytest.raises(UnknownLayerError, match=r"re-embed with keep_map=\['stage4'\]"):
        ff.map_rows("stage4", [0])


@pytest.mark.slow
def test_adding_a_map_to_an_existing_file_names_the_maps(image_folder, tiny_backbone, tmp_path):
    """Issue 22, item 13: the message listed no setting ("made with different settings ()")."""
    from featurecache.errors import StoreMismatchError

    out = tmp_path / "f.h5"
    kw = dict(backbone=tiny_backbone, layers=["avgpool"], num_workers=0, progress=False)
    embed(image_folder, out, **kw)
    with pytest.raises(StoreMismatchError, match=r"\(maps: file has None, this run has \['stage4'\]\)"):
        embed(image_folder, out, keep_map=["stage4"], **kw)
