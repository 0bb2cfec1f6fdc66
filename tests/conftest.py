"""Shared fixtures: tiny generated image folders and small, fast backbones."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image(path: Path, color, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, per_class: int) -> Path:
    """DATA/<class>/*.png: the 3 colour classes, ``per_class`` images each."""
    for ci, (name, color) in enumerate(COLORS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_image(root / name / f"{name}_{i}.png", color, seed=ci * 100 + i)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """DATA/<class>/*.png: 3 colour classes x 6 images."""
    return make_folder(tmp_path / "imgs", 6)


@pytest.fixture(scope="session")
def tiny_backbone():
    """EfficientNet-Lite0 with its real weights at 64x64 input: fast, and with activations of a
    realistic scale (untrained weights shrink them below float16's range)."""
    from featurecache.backbones import Preprocess, load_backbone

    bb = load_backbone("efficientnet_lite0")
    return dataclasses.replace(bb, preprocess=Preprocess(resize=64, crop=64))


@pytest.fixture
def feats_path(image_folder, tiny_backbone, tmp_path):
    """A feature file of the colour images: stem, blocks.5 and avgpool (test files may
    override it with other layers)."""
    from featurecache import embed

    out = tmp_path / "f.h5"
    embed(image_folder, out, backbone=tiny_backbone, layers=["stem", "blocks.5", "avgpool"],
          num_workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its real ImageNet weights."""
    from featurecache.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


def shared_data(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":  # CI has the data: a missing set is a failure
            pytest.fail(f"shared data set {path} is not present (CI=true)")
        pytest.skip(f"shared data set {path} is not present")
    return path


def png_spread(path) -> float:
    """Standard deviation of a PNG's grey values: 0 for a blank image."""
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    return float(img.std()) if min(img.shape) > 200 else 0.0


@contextlib.contextmanager
def forward_fails_at(n: int, message: str = "stop"):
    """Inside the block, the ``n``-th forward pass of any FeatureExtractor raises
    ``RuntimeError(message)``: a crash in the middle of an embed. The real forward is back
    after the block."""
    from featurecache.extract import FeatureExtractor

    forward, calls = FeatureExtractor.forward, {"n": 0}

    def failing(self, x):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return forward(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractor, "forward", failing)
        yield
