"""Head files: joblib (the default) or skops (safe to load from someone else).

A head file holds a plain dict: ``format``, ``format_version`` and the fields of
:class:`~featurecache.heads.Head` (the scikit-learn pipeline, layer, classes, provenance, CV
results). Two encodings, chosen by the file suffix:

* ``.joblib`` (or any other suffix): a pickle. Loading a pickle can run arbitrary code:
  **load only joblib heads you trust**.
* ``.skops``: `skops.io <https://skops.readthedocs.io>`_, which rebuilds objects without
  pickle and only from types it trusts. Loading refuses any type outside scikit-learn's,
  numpy's and the two featurecache estimators' (named in the error), so a ``.skops`` head
  from a colleague cannot run code on your machine.

Both are written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

from pathlib import Path

from .errors import HeadError
from .files import atomic_output

__all__ = ["dump_head", "load_head_dict", "SKOPS_TRUSTED", "FORMAT", "FORMAT_VERSION"]

FORMAT = "featurecache-head"
FORMAT_VERSION = 1
# featurecache's own types that a head may hold, beyond what skops trusts by default
SKOPS_TRUSTED = ("featurecache.estimators.GramLinearSVC",
                 "featurecache.estimators.temperature_weights")


def _is_skops(path: Path) -> bool:
    return path.suffix.lower() == ".skops"


def dump_head(data: dict, path) -> Path:
    """Write a head dict to ``path`` (skops for ``.skops``, joblib otherwise), atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise HeadError(f"folder {path.parent} does not exist; create it first.")
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data}
    with atomic_output(path) as tmp:
        if _is_skops(path):
            _skops().dump(data, tmp)
        else:
            import joblib

            joblib.dump(data, tmp)
    return path


def load_head_dict(path) -> dict:
    """Read a head dict; ``.skops`` files are checked against the allow-list first.

    Raises:
        HeadError: missing, unreadable, untrusted types (named), or not a featurecache head.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file {path} does not exist.")
    with open(path, "rb") as f:
        if f.read(8) == b"\x89HDF\r\n\x1a\n":
            raise HeadError(f"{path} is a feature file, not a head: the head comes first "
                            f"(`featurecache predict HEAD IMAGES`, `featurecache score HEAD "
                            f"FEATURES`).")
    try:
        if _is_skops(path):
            sio = _skops()
            untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in SKOPS_TRUSTED]
            if untrusted:
                raise HeadError(f"{path} holds types that a featurecache head never contains and "
                                f"that could run code when loaded: {', '.join(untrusted)}. "
                                f"Refusing to load it.")
            data = sio.load(path, trusted=list(SKOPS_TRUSTED))
        else:
            import joblib

            data = joblib.load(path)
    except HeadError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling / unzipping fails in many ways
        kind = "skops" if _is_skops(path) else "joblib"
        raise HeadError(f"cannot read {path} as a {kind} file ({type(exc).__name__}: {exc}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HeadError(f"{path} is not a featurecache head (make one with `featurecache fit-head`).")
    if data.get("format_version") != FORMAT_VERSION:
        raise HeadError(f"{path} is head format {data.get('format_version')}; this featurecache "
                        f"reads {FORMAT_VERSION}. Fit it again.")
    return data


def _skops():
    try:
        import skops.io as sio
    except ImportError:
        raise HeadError("the .skops format needs the skops package: `pip install skops`.") from None
    return sio
