"""Every torchvision family lists, pools and stores its layers (issue: conv maps, NHWC maps,
tokens, vectors), and models FX cannot trace fall back to forward hooks."""


import numpy as np
import pytest
import torch
from torch import nn

from featurecache import embed, open_features
from featurecache.backbones import Backbone, Preprocess, load_backbone
from featurecache.layers import list_layers, resolve_layers

# backbone -> (layers that must be listed, a middle layer to embed, expected kinds present)
FAMILIES = {
    "resnet50": (["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"], "layer2",
                 {"map", "vector"}),
    "inception_v3": (["Conv2d_1a_3x3", "Mixed_5b", "Mixed_6a", "Mixed_7c", "avgpool", "fc"], "Mixed_6a",
                     {"map", "vector"}),
    "vgg16": (["features.4", "features.9", "features.16", "features.23", "features.30", "avgpool"],
              "features.16", {"map", "vector"}),
    "vit_b_16": (["conv_proj", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_11",
                  "encoder", "heads"], "encoder.layers.encoder_layer_5", {"map", "tokens", "vector"}),
    "swin_t": (["features.0", "features.1", "features.3", "features.5", "features.7", "norm",
                "avgpool"], "features.3", {"map", "map-nhwc", "vector"}),
    "convnext_tiny": (["features.0", "features.1", "features.3", "features.5", "features.7",
                       "avgpool"], "features.3", {"map", "vector"}),
    "efficientnet_b0": (["features.0", "features.1", "features.4", "features.8", "avgpool"],
                        "features.4", {"map", "vector"}),
    "efficientnet_lite0": (["stem", "blocks.0", "blocks.5", "blocks.15", "head", "avgpool"],
                           "blocks.8", {"map", "vector"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_lists_and_embeds_its_layers(name, image_folder, tmp_path):
    must, middle, kinds = FAMILIES[name]
    bb = load_backbone(name, weights="none")
    listing = list_layers(bb)
    names = {l.name for l in listing.layers}
    assert set(must) <= names, sorted(set(must) - names)
    assert {l.kind for l in listing.layers} == kinds
    assert "avgpool" in names or listing.aliases["avgpool"] in names
    depths = [l.depth for l in listing.layers]
    assert depths == sorted(depths)
    for l in listing.layers:  # nothing without a batch axis (layer_scale params, ints) is listed
        assert len(l.shape) in (1, 2, 3)
    out = tmp_path / "f.h5"
    # float32: untrained efficientnet_b0 activations shrink to ~1e-14, below float16's range
    r = embed(image_folder, out, backbone=bb, layers=[middle, "avgpool"], num_workers=0,
              max_per_class=1, progress=False, batch_size=6, dtype="float32")
    ff = open_features(out)
    assert ff.n_rows == 6 and r.n_rows == 6
    for layer in (middle, "avgpool"):
        width = listing.get(layer).width()
        X = ff.X(layer).astype(np.float32)
        assert X.shape == (6, width), (layer, X.shape, width)
        assert np.isfinite(X).all() and X.std() > 0


def test_swin_features_are_nhwc_and_pooled_over_the_right_axes():
    bb = load_backbone("swin_t", weights="none")
    listing = list_layers(bb)
    f3 = listing.get("features.3")
    assert f3.kind == "map-nhwc" and f3.shape == (28, 28, 192) and f3.width("avgmax") == 384
    assert listing.get("permute").kind == "map" and listing.get("permute").shape == (768, 7, 7)
    from torchvision.models.feature_extraction import create_feature_extractor

    from featurecache.extract import FeatureExtractor

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    raw = create_feature_extractor(bb.model, ["features.3"])(x)["features.3"]  # (1, 28, 28, 192)
    spec, = resolve_layers(bb, ["features.3"], pool="max", listing=listing)
    got = FeatureExtractor(bb.model, [spec])(x)["features.3"]
    torch.testing.assert_close(got, raw.amax((1, 2)))


@pytest.mark.slow
def test_vit_tokens_cls_and_mean_differ_and_match_hand_computation():
    bb = load_backbone("vit_b_16", weights="none")
    cls_spec, = resolve_layers(bb, ["encoder.layers.encoder_layer_3"], token_pool="cls")
    mean_spec, = resolve_layers(bb, ["encoder.layers.encoder_layer_3"], token_pool="mean")
    assert (cls_spec.kind, cls_spec.pool, mean_spec.pool, cls_spec.dim) == ("tokens", "cls", "mean", 768)
    from torchvision.models.feature_extraction import create_feature_extractor

    from featurecache.extract import FeatureExtractor

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    raw = create_feature_extractor(bb.model, ["encoder.layers.encoder_layer_3"])(x)
    tokens = raw["encoder.layers.encoder_layer_3"]  # (2, 197, 768)
    got_cls = FeatureExtractor(bb.model, [cls_spec])(x)[cls_spec.name]
    got_mean = FeatureExtractor(bb.model, [mean_spec])(x)[mean_spec.name]
    torch.testing.assert_close(got_cls, tokens[:, 0])
    torch.testing.assert_close(got_mean, tokens[:, 1:].mean(1))
    assert not torch.allclose(got_cls, got_mean)
    listing = list_layers(bb)
    # avgpool is the encoder's output (encoder and encoder.ln end on the same node)
    assert listing.get("avgpool").node == listing.get("encoder").node
    assert listing.get("avgpool").kind == "tokens"


def test_convnext_layer_scale_parameters_are_not_listed():
    bb = load_backbone("convnext_tiny", weights="none")
    all_nodes = list_layers(bb, all_nodes=True)
    assert not any(l.name.endswith("layer_scale") for l in all_nodes.layers)
    assert len(all_nodes.layers) > len(list_layers(bb).layers)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # depends on the values
            x = x.relu()
        x = self.avgpool(self.block(x))
        return self.fc(torch.flatten(x, 1))


def test_untraceable_model_falls_back_to_hooks(image_folder, tmp_path):
    torch.manual_seed(0)
    bb = Backbone("toy", Untraceable().eval(), Preprocess(resize=32, crop=32), "none(seed=0)", None)
    listing = list_layers(bb)
    assert listing.method == "hooks" and "FX tracing failed" in listing.note
    # in forward order: a container after the modules inside it
    assert [l.name for l in listing.layers] == ["conv", "block.0", "block.1", "block", "avgpool", "fc"]
    assert listing.get("block").shape == (16, 8, 8) and listing.aliases["stage2"] == "block"
    r = embed(image_folder, tmp_path / "f.h5", backbone=bb, layers=["block", "avgpool"],
              num_workers=0, progress=False)
    ff = open_features(tmp_path / "f.h5")
    assert ff.provenance["extraction_method"] == "hooks" and r.n_rows == 18
    assert ff.X("block").shape == (18, 16)
    # hooks and a by-hand forward agree
    x = bb.preprocess.transform()(__import__("PIL.Image").Image.open(ff.paths()[0]).convert("RGB"))[None]
    with torch.no_grad():
        h = bb.model.block(bb.model.conv(x).relu() if bb.model.conv(x).sum() > 0 else bb.model.conv(x))
    np.testing.assert_allclose(ff.X("block")[0].astype(np.float32), h.mean((2, 3))[0].numpy(),
                               rtol=2e-3, atol=2e-3)


def test_layers_cli_says_when_hooks_are_used(monkeypatch):
    from click.testing import CliRunner

    from featurecache import backbones as bmod
    from featurecache.cli import cli

    toy = Backbone("toy", Untraceable().eval(), Preprocess(resize=32, crop=32), "none(seed=0)", None)
    monkeypatch.setattr(bmod, "load_backbone", lambda *a, **k: toy)
    r = CliRunner().invoke(cli, ["layers", "toy"])
    assert r.exit_code == 0, r.output
    assert "extraction: hooks; FX tracing failed" in r.output and "block.1" in r.output
