"""Layer listing, validation, pooling and the one-pass extractor."""

import pytest
import torch

from featurecache.errors import UnknownLayerError
from featurecache.extract import FeatureExtractor, pool_output
from featurecache.layers import list_layers, resolve_layers


def test_lite0_listing_has_stages_and_aliases(tiny_backbone):
    listing = list_layers(tiny_backbone)
    names = [l.name for l in listing.layers]
    assert {"stem", "blocks.0", "blocks.15", "head", "avgpool"} <= set(names)
    depths = [l.depth for l in listing.layers]
    assert depths == sorted(depths) and names.index("blocks.5") < names.index("avgpool")
    avg = listing.get("avgpool")
    assert (avg.kind, avg.width()) == ("map", 1280) and avg.width("avgmax") == 2560
    # at 64x64 input: 1/2 -> 32, 1/4 -> 16, 1/8 -> 8, 1/16 -> 4, 1/32 -> 2
    assert listing.aliases["stage2"] == "blocks.2" and listing.aliases["stage4"] == "blocks.10"
    assert listing.get("blocks.10").shape == (112, 4, 4)


def test_unknown_layer_is_rejected_with_close_matches(tiny_backbone):
    with pytest.raises(UnknownLayerError, match=r"'blocks\.99'.*blocks\.9.*featurecache layers"):
        resolve_layers(tiny_backbone, ["avgpool", "blocks.99"])


def test_graph_nodes_are_accepted_beyond_module_names(tiny_backbone):
    (spec,) = resolve_layers(tiny_backbone, ["blocks.3.depthwise.2"])
    assert (spec.kind, spec.dim) == ("map", 144)


@pytest.mark.slow
def test_multi_layer_pass_equals_single_layer_passes(tiny_backbone):
    specs = resolve_layers(tiny_backbone, ["stem", "blocks.5", "blocks.10", "avgpool"])
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    together = FeatureExtractor(tiny_backbone.model, specs)(x)
    for s in specs:
        alone = FeatureExtractor(tiny_backbone.model, [s])(x)[s.name]
        assert together[s.name].shape == (3, s.dim)
        torch.testing.assert_close(together[s.name], alone)


def test_hooks_fallback_gives_the_same_features(tiny_backbone):
    specs = resolve_layers(tiny_backbone, ["blocks.5", "avgpool"], pool="avgmax")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    fx = FeatureExtractor(tiny_backbone.model, specs, method="fx")
    hooks = FeatureExtractor(tiny_backbone.model, specs, method="hooks")
    assert (fx.method, hooks.method) == ("fx", "hooks")
    a, b = fx(x), hooks(x)
    for s in specs:
        torch.testing.assert_close(a[s.name], b[s.name])
    assert a["avgpool"].shape == (2, 2560)


def test_pooling_by_kind_matches_hand_computation():
    t = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool_output(t, "map", "avg"), t.mean((2, 3)))
    assert torch.equal(pool_output(t, "map", "max"), t[:, :, 1, 1])
    nhwc = t.permute(0, 2, 3, 1)
    assert torch.equal(pool_output(nhwc, "map-nhwc", "avgmax"),
                       torch.cat([t.mean((2, 3)), t[:, :, 1, 1]], 1))
    tokens = torch.tensor([[[10.0, 20.0], [1.0, 2.0], [3.0, 6.0]]])  # (1, L=3, D=2), token 0 = cls
    assert pool_output(tokens, "tokens", "cls").tolist() == [[10.0, 20.0]]
    assert pool_output(tokens, "tokens", "mean").tolist() == [[2.0, 4.0]]
    with pytest.raises(ValueError, match="pool 'median'"):
        pool_output(t, "map", "median")
