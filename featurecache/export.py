"""Ship the winner: a saved head or fine-tune with its backbone, as one file that runs
without featurecache (``featurecache export MODEL -o model.onnx``).

The file holds one graph from images to class scores:

* **input** ``images``: RGB ``uint8``, shape ``(N, crop, crop, 3)`` (any ``N``), resized and
  center-cropped as the metadata's ``preprocess`` says (what torchvision's ``Resize`` /
  ``CenterCrop`` do to a PIL image); the ``/255`` and the mean/std normalisation are inside;
* the frozen backbone up to the head's layer(s), pooled as embed pools them and rounded to
  the stored dtype as in training (``a+b`` heads: both taps in the one graph), or the frozen
  bottom and the fine-tuned top of a fine-tune;
* the head as torch layers (:mod:`featurecache.torch_heads`): the scaler folded into the
  linear layer of a logistic regression or linear SVM, an MLP's layers, a k-NN's training
  rows; an rbf SVM is refused (its kind says why);
* **outputs** in the head's class order: ``logits`` then ``probabilities`` (logreg, MLP,
  fine-tune), ``probabilities`` (k-NN), ``scores`` (an SVM's decision values) and, when it
  was fitted with probabilities, ``probabilities``. The last output is the probabilities
  whenever the model has them.

Metadata (ONNX ``metadata_props``; a ``.pt2`` file's ``extra/featurecache.json``): ``classes``
(JSON list, in output order), ``preprocess`` (JSON: ``resize_size``, ``crop_size``,
``interpolation``, ``mean``, ``std``, ...), ``outputs`` and ``provenance`` (backbone, weights
and their sha256, layer, head, featurecache / torch versions, opset).

Two formats, by the output's suffix (:data:`FORMATS`): ``.onnx`` (torch's dynamo exporter;
run it with onnxruntime, no torch needed) and ``.pt2`` (``torch.export``, loaded with
``torch.export.load``: torch only). TorchScript (``.pt``) is not written: torch deprecates it
in favour of ``torch.export``.

Example::

    >>> info = export("reports/run1/best.joblib", "clip.onnx")       # doctest: +SKIP
    >>> info["outputs"], info["classes"][:2]                        # doctest: +SKIP
    (['logits', 'probabilities'], ['airplane', 'bird'])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError, option
from .files import atomic_output, require_folder, same_file
from .options import validated

__all__ = ["export", "Exportable", "HeadGraph", "FinetuneGraph", "ImageGraph", "FORMATS",
           "read_metadata"]

ONNX_LIMIT = 2_000_000_000  # bytes: one protobuf file (ONNX's limit without external data)
CHECK_IMAGES = 4            # random images the written file is checked on
CHECK_TOLERANCE = 1e-4      # the largest difference of the probabilities accepted


@dataclass
class Exportable:
    """What a saved model exports (:meth:`featurecache.saved.SavedModel.exportable`):
    ``module`` maps normalised images ``(N, 3, crop, crop)`` to the tuple of ``outputs``,
    whose columns are ``classes``; ``backbone`` gives the preprocessing; ``provenance`` what
    the metadata records of the model (layer, head, ...)."""

    module: nn.Module
    outputs: tuple
    classes: list
    backbone: object
    provenance: dict


class HeadGraph(nn.Module):
    """Images -> the stored layers (pooled, rounded to the stored ``dtype``, concatenated in
    the head's order) -> the head's torch module."""

    def __init__(self, extractor, dtype: str, head: nn.Module):
        super().__init__()
        self.extractor, self.head = extractor, head
        self.dtype = getattr(torch, dtype)

    def forward(self, images):
        out = self.extractor.outputs(images)
        x = torch.cat([out[s.name].to(self.dtype).float() for s in self.extractor.specs], 1)
        return self.head(x)


class FinetuneGraph(nn.Module):
    """Images -> the frozen bottom's map of ``node`` (as the cache stores it: NCHW, pooled to
    ``size``, rounded through ``dtype``) -> the fine-tuned top -> logits, probabilities."""

    def __init__(self, bottom, node: str, kind: str, size, dtype: str, top: nn.Module):
        super().__init__()
        self.bottom, self.top = bottom, top
        self.node, self.kind, self.size = node, kind, tuple(size)
        self.dtype = getattr(torch, dtype)

    def forward(self, images):
        from .extract import stored_map

        maps = stored_map(self.bottom(images)[self.node], self.kind, self.size)
        z = self.top(maps.to(self.dtype).float())
        return z, z.softmax(1)


class ImageGraph(nn.Module):
    """``uint8 (N, H, W, 3)`` RGB -> what ``ToTensor`` and ``Normalize`` make of it -> the
    model's outputs."""

    def __init__(self, inner: nn.Module, mean, std):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def normalise(self, images):
        """``uint8 (N, H, W, 3)`` -> the normalised ``(N, 3, H, W)`` float batch."""
        x = images.permute(0, 3, 1, 2).to(torch.float32).div(255)
        return (x - self.mean) / self.std

    def forward(self, images):
        return self.inner(self.normalise(images))


class Format:
    """One file format of an exported model: ``suffix``, ``write`` (the graph to ``path``
    with the metadata), ``run`` (the written file on a batch: its outputs, as numpy)."""

    suffix = ""
    needs = ()  # (module, pip package) pairs the writer imports

    def check_size(self, nbytes: int) -> None:
        pass

    def write(self, graph, example, path: Path, meta: dict, opset) -> dict:
        raise NotImplementedError

    def run(self, path: Path, images):
        raise NotImplementedError

    def require(self) -> None:
        import importlib

        for module, package in self.needs:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ExportError(f"writing {self.suffix} needs the {package} package: `pip "
                                  f"install featurecache[export]` (or `pip install "
                                  f"{package}`).") from None


def _batch_dim():
    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


class Onnx(Format):
    """ONNX from torch's dynamo exporter (``torch.onnx.export(dynamo=True)``), weights inside
    the one file; run with onnxruntime."""

    suffix = ".onnx"
    needs = (("onnx", "onnx"), ("onnxscript", "onnxscript"))

    def check_size(self, nbytes):
        if nbytes > ONNX_LIMIT:
            raise ExportError(f"the model holds {nbytes / 1e9:.1f} GB of weights, over ONNX's "
                              f"2 GB limit for one file; export to a .pt2 file instead "
                              f"(`-o model.pt2`: torch.export, no such limit).")

    def write(self, graph, example, path, meta, opset):
        import contextlib
        import io
        import warnings

        import onnx

        kw = {} if opset is None else {"opset_version": opset}
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(graph, (example,), dynamo=True,
                                            input_names=["images"],
                                            output_names=list(meta["outputs"]),
                                            dynamic_shapes=_batch_dim(), verbose=False,
                                            external_data=False, **kw)
        except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways
            raise ExportError(f"the ONNX exporter could not convert this model "
                              f"({_first_line(exc)}); export to a .pt2 file instead "
                              f"(`-o model.pt2`: torch.export, every torch operator).") from None
        proto = program.model_proto
        used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        meta = {**meta, "provenance": {**meta["provenance"], "onnx_opset": int(used)}}
        for key, value in _props(meta).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, str(path))
        return {"opset": int(used)}

    def run(self, path, images):
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images.numpy()})


class Pt2(Format):
    """A ``torch.export`` program (``torch.export.save``), the metadata in its extra files;
    loaded with ``torch.export.load(path).module()``."""

    suffix = ".pt2"

    def write(self, graph, example, path, meta, opset):
        try:
            program = torch.export.export(graph, (example,), dynamic_shapes=_batch_dim())
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"torch.export could not capture this model "
                              f"({_first_line(exc)}).") from None
        torch.export.save(program, str(path),
                          extra_files={"featurecache.json": json.dumps(_props(meta))})
        return {}

    def run(self, path, images):
        with torch.no_grad():
            out = torch.export.load(str(path)).module()(images)
        return [o.numpy() for o in out]


# the formats, by the output's suffix
FORMATS = {f.suffix: f for f in (Onnx(), Pt2())}


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _props(meta: dict) -> dict:
    """The metadata as string properties (JSON values)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_metadata(path) -> dict:
    """The metadata of an exported file (``.onnx`` or ``.pt2``), JSON values decoded."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    else:
        extra = {"featurecache.json": ""}
        torch.export.load(str(path), extra_files=extra)
        props = json.loads(extra["featurecache.json"])
    out = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def preprocess_meta(pre) -> dict:
    """What the graph's input must be, for the metadata: the short side resized to
    ``resize_size`` with ``interpolation`` (antialiased, as torchvision's ``Resize`` on a PIL
    image), a ``crop_size`` center crop (or, ``whole``, the whole image resized to
    ``crop_size`` square), 8-bit RGB in ``(N, H, W, 3)``; images longer than ``max_aspect``
    times their short side are first center-cropped to that ratio, as embed decodes them."""
    from .data.decode import MAX_ASPECT
    return {"resize_size": pre.crop if pre.whole else pre.resize, "crop_size": pre.crop,
            "interpolation": pre.interpolation, "antialias": True, "whole": pre.whole,
            "transparency": "flattened onto white", "max_aspect": MAX_ASPECT,
            "exif_orientation": pre.exif, "mean": list(pre.mean), "std": list(pre.std),
            "input": {"name": "images", "dtype": "uint8", "shape": ["N", pre.crop, pre.crop, 3],
                      "channels": "RGB", "normalised_inside": True}}


@validated("export")
def export(model, output, *, opset: int | None = None, skip_check: bool = False) -> dict:
    """Export a saved head (``.joblib``/``.skops``) or a fine-tune (its folder or
    ``model.pt``) with its backbone to ``output`` (``.onnx`` or ``.pt2``), written
    atomically, then (unless ``skip_check``) run on random images against the model.

    Returns ``{output, format, bytes, outputs, classes, preprocess, provenance,
    max_difference}`` (``max_difference``: of the last output, file vs the torch model;
    None when not checked, e.g. onnxruntime not installed).

    Raises:
        ExportError: an unknown suffix, a model that cannot be exported (the reason), a
            missing exporter package, a model too large for the format.
        HeadError: the model file is missing, damaged or not a featurecache model.
    """
    from . import __version__
    from .saved import load_model

    path = Path(output)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        why = (" (TorchScript, which torch deprecates for torch.export)"
               if path.suffix.lower() in (".pt", ".pth", ".torchscript") else "")
        raise ExportError(f"-o {output}: the suffix says the format, and {path.suffix or 'none'}"
                          f"{why} is not one; use .onnx (ONNX, for onnxruntime) or .pt2 "
                          f"(torch.export).")
    require_folder(path)
    if isinstance(model, (str, Path)) and (same_file(path, model)
                                           or same_file(path, Path(model) / "model.pt")):
        raise ExportError(f"-o {output} is the model itself; give the export another name.")
    fmt.require()
    saved = load_model(model)
    ex = saved.exportable()  # ExportError: the reason this one cannot be exported
    pre = ex.backbone.preprocess
    graph = ImageGraph(ex.module, pre.mean, pre.std).eval()
    fmt.check_size(sum(t.numel() * t.element_size()
                       for t in [*graph.parameters(), *graph.buffers()]))
    import torchvision

    meta = {"classes": list(ex.classes), "preprocess": preprocess_meta(pre),
            "outputs": list(ex.outputs),
            "provenance": {**{k: v for k, v in ex.backbone.provenance().items()
                              if k != "preprocess"},
                           "model": saved.describe(), **ex.provenance,
                           "featurecache_version": __version__, "torch": torch.__version__,
                           "torchvision": torchvision.__version__}}
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, pre.crop, pre.crop, 3), dtype=torch.uint8, generator=gen)
    sample = torch.randint(0, 256, (CHECK_IMAGES, pre.crop, pre.crop, 3), dtype=torch.uint8,
                           generator=gen)
    with atomic_output(path) as tmp:
        with torch.no_grad():
            extra = fmt.write(graph, example, tmp, meta, opset)
            if opset is not None and extra.get("opset") not in (None, opset):
                raise ExportError(f"--opset {opset}: the exporter wrote opset {extra['opset']} "
                                  f"instead (it cannot convert at {opset}); give an opset "
                                  f"from 18 to {extra['opset']}, or leave it out.")
            difference = None
            if not skip_check:
                want = [o.numpy() for o in graph(sample)]  # the torch graph, run once
                difference = _check(fmt, tmp, want, sample)
                _check_reference(saved, graph, want[-1], sample)
        size = tmp.stat().st_size
    meta["provenance"].update({"onnx_opset": extra["opset"]} if "opset" in extra else {})
    return {"output": str(path), "format": fmt.suffix.lstrip("."), "bytes": size,
            "outputs": list(ex.outputs), "classes": list(ex.classes),
            "preprocess": meta["preprocess"], "provenance": meta["provenance"],
            "max_difference": difference}


REFERENCE_TOLERANCE = 1e-3  # torch graph vs the saved model's own scoring (float16 steps)


def _check_reference(saved, graph, got, images) -> None:
    """The torch graph against the saved model's own scoring (what ``predict`` runs: the
    scikit-learn pipeline, or the fine-tune's scorer) on ``images``: a conversion mistake
    (a class order, an estimator variant) is refused here, not shipped. The tolerance allows
    a stored feature rounded to the neighbouring float16 step in another memory layout.
    ``got``: the graph's last output on ``images``."""
    import numpy as np

    from .extract import to_layout

    scorer = saved.image_scorer()
    with scorer.on(torch.device("cpu")):
        want, _ = scorer.score(to_layout(graph.normalise(images)))
    want = np.asarray(want, dtype=np.float64)
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not diff <= REFERENCE_TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise ExportError(f"the exported graph differs from the saved model's own scores by "
                          f"{diff:.2g} on random images; not written. Please report this "
                          f"model (its kind and estimator).")


def _check(fmt, path, want, images) -> float | None:
    """The largest difference between the written file's last output and the torch model's
    (``want``: its outputs on ``images``, as numpy); raises when they disagree (nothing is
    left under the final name)."""
    import numpy as np

    try:
        got = fmt.run(path, images)
    except Exception as exc:  # noqa: BLE001 - the runtime refuses the file in many ways
        raise ExportError(f"the written {fmt.suffix} file does not run here "
                          f"({_first_line(exc)}); try a lower --opset, a newer onnxruntime, "
                          f"the other format, or --skip-check to keep it unchecked.") from None
    if got is None:
        return None
    if len(got) != len(want) or got[-1].shape != want[-1].shape:
        raise ExportError(f"the written {fmt.suffix} file returns {len(got)} outputs of shape "
                          f"{getattr(got[-1], 'shape', None)}, not the model's; please report "
                          f"this model.")
    diff = float(np.abs(np.asarray(got[-1], dtype=np.float64) - want[-1]).max())
    if not diff <= CHECK_TOLERANCE * max(1.0, float(np.abs(want[-1]).max())):
        raise ExportError(f"the written {fmt.suffix} file differs from the model by {diff:.2g} "
                          f"on random images (more than float32 rounding); not written. Try "
                          f"the other format, or {option('skip_check')} to keep it anyway.")
    return diff
