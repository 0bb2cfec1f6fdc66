"""Outputs that appear whole or not at all: write to a temporary name, then rename into place.

Every file featurecache writes for the user (heads, reports, joined feature files,
predictions, ``run.json``) goes through :func:`atomic_output`: the content is written to a
hidden temporary file in the same folder, flushed to disk, and renamed over the final name
only when it is complete. A kill or an error at any point leaves the previous file (or no
file) under the final name, never a truncated one; the temporary file is removed on error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_output", "fsync_dir", "same_file", "require_folder", "output_folder"]


def require_folder(path) -> None:
    """Refuse an output whose folder does not exist, before any work is done.

    Raises:
        FeaturecacheError: naming the folder and the command that creates it.
    """
    import shlex

    from .errors import FeaturecacheError

    folder = Path(path).parent
    if not folder.is_dir():
        raise FeaturecacheError(f"output folder {folder} does not exist; create it first "
                                f"(mkdir -p {shlex.quote(str(folder))}).")


def output_folder(out, overwrite: bool, what: str) -> Path:
    """Refuse an output folder that is a file, holds files while ``overwrite`` is off, or
    whose parent does not exist (``what``: "report", "fine-tune", for the messages).

    Raises:
        FeaturecacheError: naming the folder and the way out.
    """
    from .errors import FeaturecacheError, option

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeaturecacheError(f"{out} is a file; give a folder for the {what}.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FeaturecacheError(f"output folder {out} exists and is not empty; choose another "
                                f"or pass {option('overwrite')} (which replaces only the files "
                                f"of a previous {what}).")
    if not out.parent.is_dir():
        raise FeaturecacheError(f"folder {out.parent} does not exist; create it first.")
    return out


def fsync_dir(folder) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary name keeps the final suffix (``.h5``, ``.png``, ``.joblib``) so libraries that
    look at it (matplotlib, h5py) behave as for the final file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def same_file(a, b) -> bool:
    """Whether two paths name the same file (existing files compared by inode)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
