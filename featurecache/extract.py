"""One forward pass -> pooled features of every requested layer.

:class:`FeatureExtractor` wraps a backbone so that one call returns ``{layer name: (N, dim)}``
for all requested layers at once. The graph is cut with torchvision's
``create_feature_extractor`` (which prunes everything past the deepest requested node);
where FX cannot trace a model, forward hooks on module names give the same contract.
Pooling happens here, on the device, so only small vectors leave it.

Example::

    >>> import torch
    >>> from featurecache.backbones import load_backbone
    >>> from featurecache.layers import resolve_layers
    >>> bb = load_backbone("efficientnet_lite0", weights="none")
    >>> specs = resolve_layers(bb, ["blocks.5", "avgpool"])
    >>> out = FeatureExtractor(bb.model, specs)(torch.zeros(2, 3, 224, 224))
    >>> {k: tuple(v.shape) for k, v in out.items()}
    {'blocks.5': (2, 80), 'avgpool': (2, 1280)}
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .errors import OptionError, UnknownLayerError
from .options import POOLS, TOKEN_POOLS

__all__ = ["FeatureExtractor", "raw_extractor", "pool_output", "default_device", "POOLS",
           "TOKEN_POOLS", "KINDS"]

KINDS = ("map", "map-nhwc", "tokens", "vector")


def default_device(device: str | None = None) -> torch.device:
    """``device`` if given, else cuda when present, else cpu.

    Raises:
        FeaturecacheError: an unknown device name, or a device this machine does not have.
    """
    from .errors import FeaturecacheError, option

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise FeaturecacheError(f"device {device!r} is not a device name; use cpu, cuda or "
                                f"cuda:N (or leave it out: cuda when present).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeaturecacheError(f"device {device!r} asked for, but torch sees no CUDA GPU on this "
                                f"machine; use {option('device', 'cpu')} (or leave it out).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FeaturecacheError(f"device {device!r}: this machine has "
                                f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    if dev.type not in ("cpu", "cuda"):
        raise FeaturecacheError(f"device {device!r} is not supported; use cpu or cuda.")
    return dev


# Forward passes run in channels_last (NHWC) memory layout by default, on CPU as on GPU:
# measured on this project's 2-core CPU it is 1.2-1.8x faster than NCHW for EfficientNet-Lite0,
# ResNet-18, DenseNet-121, RegNetY-400MF and MobileNetV3, and equal for ConvNeXt-T and
# ViT-B/16 (which is never slower); see BENCHMARKS.md ("channels_last on CPU"). A parameter of
# each call (``channels_last``), not a module-wide switch: give the same to the model's
# ``on_device`` and to its batches' ``to_layout``.


@contextlib.contextmanager
def on_device(model: nn.Module, dev: torch.device, channels_last: bool = True):
    """``model`` on ``dev`` (in channels_last memory format unless ``channels_last`` is off)
    for the block; afterwards it is moved back to where it was and to its memory format, so
    the caller's model is not changed."""
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.to(home)


def to_layout(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """A batch in the layout the model runs in (as given to :func:`on_device`)."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@dataclasses.dataclass
class ImageScorer:
    """How a saved model scores images (:meth:`featurecache.saved.SavedModel.image_scorer`):
    ``score(images)`` takes a batch preprocessed as ``backbone.preprocess`` says, in the
    layout of :func:`to_layout`, and returns ``(scores (b, len(classes)), are_probabilities)``;
    ``classes`` name the columns; ``modules`` are what :meth:`on` moves to the device."""

    backbone: object
    score: object           # images -> (numpy scores, bool)
    classes: list
    modules: tuple = ()

    @contextlib.contextmanager
    def on(self, dev: torch.device, channels_last: bool = True):
        """The modules on ``dev`` for the block (see :func:`on_device`), then back."""
        with contextlib.ExitStack() as stack:
            for m in self.modules:
                stack.enter_context(on_device(m, dev, channels_last))
            yield self


def pool_output(t: torch.Tensor, kind: str, pool: str) -> torch.Tensor:
    """Reduce one node's output to ``(N, dim)`` according to its kind.

    ``map`` is ``(N, C, H, W)``, ``map-nhwc`` is ``(N, H, W, C)``: ``avg``, ``max`` or
    ``avgmax`` (both, concatenated) over the spatial axes. ``tokens`` is ``(N, L, D)``:
    ``cls`` takes token 0, ``mean`` averages the other tokens. ``vector`` is kept as it is.
    """
    if kind in ("map", "map-nhwc"):
        axes = (2, 3) if kind == "map" else (1, 2)
        if pool == "avg":
            return t.mean(axes)
        if pool == "max":
            return t.amax(axes)
        if pool == "avgmax":
            return torch.cat([t.mean(axes), t.amax(axes)], dim=1)
        raise OptionError(f"pool {pool!r} is not one of {', '.join(POOLS)}.")
    if kind == "tokens":
        if pool == "cls":
            return t[:, 0]
        if pool == "mean":
            return t[:, 1:].mean(1)
        raise OptionError(f"token pool {pool!r} is not one of {', '.join(TOKEN_POOLS)}.")
    if kind == "vector":
        return t.flatten(1)
    raise OptionError(f"kind {kind!r} is not one of {', '.join(KINDS)}.")


def stored_map(t: torch.Tensor, kind: str, size: tuple) -> torch.Tensor:
    """An unpooled map as stored: ``(N, C, H, W)``, average-pooled down to ``size``."""
    if kind == "map-nhwc":
        t = t.permute(0, 3, 1, 2)
    if tuple(t.shape[-2:]) != tuple(size):
        t = torch.nn.functional.adaptive_avg_pool2d(t, tuple(size))
    return t


class _HookExtractor(nn.Module):
    """Fallback for models FX cannot trace: forward hooks on module names."""

    def __init__(self, model: nn.Module, nodes: list[str]):
        super().__init__()
        self.model = model
        modules = dict(model.named_modules())
        missing = [n for n in nodes if n not in modules]
        if missing:
            raise UnknownLayerError(
                f"layers {missing} are not module names of this model, and FX tracing (which "
                f"knows finer nodes) is not available for it; use module names from "
                f"`featurecache layers`.")
        self._hooked = {n: modules[n] for n in nodes}

    def forward(self, x: torch.Tensor) -> dict:
        """Run the model with the hooks in place; they are removed again afterwards, so the
        caller's model is left as it was."""
        out: dict = {}

        def saver(name):
            def hook(_module, _inputs, output):
                out[name] = output
            return hook

        handles = [m.register_forward_hook(saver(n)) for n, m in self._hooked.items()]
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        return out


def raw_extractor(model: nn.Module, nodes: list[str], method: str = "auto"):
    """A module mapping images to ``{node: raw output}``, and the method used (fx|hooks)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    if method in ("auto", "fx"):
        try:
            return create_feature_extractor(model, return_nodes={n: n for n in nodes}), "fx"
        except Exception:  # noqa: BLE001 - tracing failures come in many types
            if method == "fx":
                raise
    return _HookExtractor(model, nodes), "hooks"


class FeatureExtractor(nn.Module):
    """``images -> {spec.name: (N, spec.dim) float32}`` for all specs in one forward pass.

    Args:
        model: the frozen backbone.
        specs: :class:`featurecache.layers.LayerSpec` records (node, kind, pool, dim).
        method: ``"auto"`` (FX, hooks when tracing fails), ``"fx"`` or ``"hooks"``.
    """

    def __init__(self, model: nn.Module, specs, method: str = "auto"):
        super().__init__()
        self.specs = [s for s in specs if not s.is_target]  # (a dense file's masks, boxes)
        nodes = list(dict.fromkeys(s.node for s in self.specs))
        self.body, self.method = raw_extractor(model, nodes, method)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict:
        return self.outputs(images)

    def compile(self, example: torch.Tensor, amp=None) -> float:
        """Replace the backbone's forward by ``torch.compile`` of it for batches shaped as
        ``example`` (a smaller batch is padded to it, so the last batch never recompiles);
        compile now, on ``example`` (under ``amp``, as the loop will run); the seconds it took.
        Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``, default under the temp folder) makes a
        second run, or another shard on the same machine, reuse the compiled code.

        Raises:
            OptionError: the model cannot be compiled (the compiler's first line).
        """
        import time
        from contextlib import nullcontext

        from .errors import OptionError

        t0 = time.perf_counter()
        body = torch.compile(self.body, dynamic=False)
        try:
            with torch.inference_mode(), amp or nullcontext():
                body(example)
        except Exception as exc:  # noqa: BLE001 - the compiler fails in many ways
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise OptionError(f"--compile: torch.compile cannot compile this model "
                              f"({type(exc).__name__}: {first}); run without --compile "
                              f"(the eager forward gives the same features).") from None
        self.body, self._batch = body, example.shape[0]
        return time.perf_counter() - t0

    def outputs(self, images: torch.Tensor) -> dict:
        """:meth:`forward` outside inference mode (what ``torch.export`` traces)."""
        n = images.shape[0]
        if getattr(self, "_batch", n) > n:  # compiled for full batches: pad with zeros
            pad = images.new_zeros((self._batch - n, *images.shape[1:]))
            fmt = torch.channels_last if images.dim() == 4 and images.is_contiguous(
                memory_format=torch.channels_last) else torch.contiguous_format
            images = torch.cat([images, pad]).contiguous(memory_format=fmt)
            return {k: v[:n] for k, v in self.outputs(images).items()}
        raw = self.body(images)
        return {s.key: (stored_map(raw[s.node], s.kind, s.shape[1:]) if s.is_map
                        else pool_output(raw[s.node], s.kind, s.pool)).float() for s in self.specs}
