"""featurecache: embed images once with a frozen backbone, then compare layers with shallow heads.

Public surface::

    featurecache.embed(source, "feats.h5", layers=["blocks.5", "avgpool"])   # stage 1
    ff = featurecache.open_features("feats.h5")                              # the file
    ff.X("avgpool", "train"), ff.y("train"), ff.classes

Importing the package is cheap: torch, torchvision, h5py and scikit-learn are imported by the
modules that use them, when a name below is first used (so CLI start-up and the head search's
worker processes do not pay for torch).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featurecache")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> module that defines it (imported on first use, PEP 562)
_LAZY = {"embed": "cluster", "open_features": "store", "load_backbone": "backbones",
         "available_backbones": "backbones", "list_layers": "layers"}

__all__ = [*_LAZY, "__version__", "versions"]

_MODULES = {"torch": "torch", "torchvision": "torchvision", "scikit-learn": "sklearn"}


def versions(*libraries: str) -> dict:
    """``{name: version}`` of featurecache and ``libraries`` (``torch``, ``torchvision``,
    ``scikit-learn``, ``python``) as this process runs them: torch's includes its build
    (``2.14.1+cu130``), which the package metadata does not. For provenance records."""
    import importlib
    import platform

    out = {"featurecache": __version__}
    for name in libraries:
        out[name] = platform.python_version() if name == "python" else \
            str(importlib.import_module(_MODULES[name]).__version__)
    return out


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'featurecache' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
