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
import re
import tempfile
from pathlib import Path

__all__ = ["atomic_output", "fsync_dir", "same_file", "require_folder", "output_folder",
           "publish_folder", "published", "BOOKKEEPING"]

# A multi-file output (a fine-tune's folder, a report) is published as one unit: its files
# live in OUT/.versions/<run id>/, OUT/.current links to the published version, and each
# name the user sees (OUT/model.pt) links to .current/<name>. Switching .current is one
# rename, so a reader sees the old output or the new one, whole, after a kill at any call.
VERSIONS, CURRENT = ".versions", ".current"
_LEGACY_STAGING = (".finetune-", ".compare-")   # staging folders of releases before versions
BOOKKEEPING = (VERSIONS, CURRENT)


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
    if out.exists() and not overwrite:
        # what a killed run left (an unpublished version, an old release's staging folder)
        # is no output: it is removed when this run publishes
        entries = [p for p in out.iterdir() if not _bookkeeping(p)]
        if entries or published(out) != out:
            shown = ", ".join(sorted(p.name for p in entries)[:5]) or "a previous " + what
            raise FeaturecacheError(f"output folder {out} exists and is not empty ({shown}); "
                                    f"choose another or pass {option('overwrite')} (which "
                                    f"replaces only the files of a previous {what}).")
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give what open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (read by setting it, the only way, and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def same_file(a, b) -> bool:
    """Whether two paths name the same file (existing files compared by inode)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _bookkeeping(p: Path) -> bool:
    """Entries of an output folder that are featurecache's own state, not output: the
    versions folder, a .current link to nothing, a killed old release's staging folder."""
    if p.name == VERSIONS:
        return True
    if p.name == CURRENT:
        return not p.exists()
    if re.fullmatch(r"\..+\.(link|old)-\d+", p.name):
        return True  # a link or a swapped-out folder of a publication that was killed
    return p.name.startswith(_LEGACY_STAGING) and p.is_dir()


def published(folder) -> Path:
    """The folder holding the published files of a multi-file output: ``FOLDER/.current``
    resolved (read every file of one output through it), or ``folder`` itself for an output
    written before versions existed."""
    folder = Path(folder)
    current = folder / CURRENT
    if current.is_dir():
        return current.resolve()
    return folder


def _points_here(link: Path) -> bool:
    """Whether ``link`` is one of the names an output publishes (a link to .current/NAME)."""
    try:
        return os.readlink(link) == os.path.join(CURRENT, link.name)
    except OSError:
        return False


def _relink(target: str, name: Path) -> None:
    """Make ``name`` a symbolic link to ``target`` by one rename (atomic)."""
    tmp = name.with_name(f".{name.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names in one call (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


def _remove_stale(out: Path, keep: set) -> None:
    """Remove the versions no run holds (a killed run's, the replaced one) and the staging
    folders of older releases; a version being written keeps its lock and stays."""
    import shutil

    from filelock import FileLock, Timeout

    versions = out / VERSIONS
    for entry in sorted(versions.iterdir()) if versions.is_dir() else []:
        run = entry.name.removesuffix(".lock")
        if run in keep or entry.name.startswith("."):
            continue
        lock = FileLock(str(versions / f"{run}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a live run is writing it
        try:
            shutil.rmtree(versions / run, ignore_errors=True)
        finally:
            lock.release()
            (versions / f"{run}.lock").unlink(missing_ok=True)
    for entry in out.iterdir():
        if entry.name == CURRENT or not _bookkeeping(entry) or entry.name == VERSIONS:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _adopt_legacy(out: Path, legacy, run: str) -> None:
    """Turn an output written before versions existed (plain files in ``out``) into a
    published version without a moment where it is not whole: hard links of its files into
    .versions/legacy-RUN, .current pointed there, then each plain name replaced by its link."""
    import shutil

    legacy = sorted(r for r in legacy if (out / r).is_file() and not (out / r).is_symlink())
    if not legacy:
        return
    current = published(out)
    if current == out or not all((current / r).is_file() and os.path.samefile(current / r, out / r)
                                 for r in legacy):  # (else: an adoption a kill cut short)
        version = out / VERSIONS / f"legacy-{run}"
        for rel in legacy:
            (version / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(out / rel, version / rel)
            except OSError:
                shutil.copy2(out / rel, version / rel)
        _fsync_tree(version)
        _relink(os.path.join(VERSIONS, version.name), out / CURRENT)
        fsync_dir(out)
    for top in sorted({Path(r).parts[0] for r in legacy}):
        name = out / top
        if name.is_dir() and not name.is_symlink():  # heads/: swapped for its link in one call
            own = {str(Path(r).relative_to(top)) for r in legacy if Path(r).parts[0] == top}
            inside = {str(p.relative_to(name)) for p in name.rglob("*") if not p.is_dir()}
            if inside - own:
                continue  # it also holds files of the user's: left as it is
            tmp = name.with_name(f".{top}.link-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.join(CURRENT, top), tmp)
            if not _exchange(tmp, name):
                os.rename(name, name.with_name(f".{top}.old-{os.getpid()}"))
                os.replace(tmp, name)
                tmp = name.with_name(f".{top}.old-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _relink(os.path.join(CURRENT, top), name)
    fsync_dir(out)


def publish_folder(out, write, legacy=()) -> Path:
    """Write a multi-file output into ``out`` as one unit and return its version folder.

    ``write(folder)`` writes every file of the new output into a fresh, empty ``folder``
    (``out/.versions/<run id>``). Then each top-level name is linked into ``out``
    (``out/NAME -> .current/NAME``), ``out/.current`` is switched to the new version by one
    rename (the commit), the names only the old output had are unlinked, and the old version
    and what killed runs left are removed. Files of the user's in ``out`` are never touched;
    ``legacy`` names the files (relative paths) of an output written before versions existed,
    which is first adopted whole. A reader that resolves :func:`published` once reads one
    output, never a mix.
    """
    import shutil
    import uuid
    from datetime import datetime, timezone

    from filelock import FileLock

    out = Path(out)
    out.mkdir(exist_ok=True)
    versions = out / VERSIONS
    versions.mkdir(exist_ok=True)
    run = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    lock = FileLock(str(versions / f"{run}.lock"))  # taken before the folder exists
    lock.acquire()
    version = versions / run
    done = False
    try:
        version.mkdir()
        write(version)
        _fsync_tree(version)
        with FileLock(str(versions / ".publish.lock")):  # one publisher at a time
            _adopt_legacy(out, legacy, run)
            old_names = {p.name for p in out.iterdir() if _points_here(p)}
            new_names = {p.name for p in version.iterdir()}
            for name in sorted(new_names):
                if not _points_here(out / name):
                    if (out / name).is_dir() and not (out / name).is_symlink():
                        from .errors import FeaturecacheError

                        raise FeaturecacheError(f"{out / name} is a folder that holds files not "
                                                f"written by featurecache; move it away and "
                                                f"run again.")
                    _relink(os.path.join(CURRENT, name), out / name)
            _relink(os.path.join(VERSIONS, run), out / CURRENT)   # the commit
            fsync_dir(out)
            done = True
            for name in sorted(old_names - new_names):
                (out / name).unlink(missing_ok=True)
            _remove_stale(out, keep={run})
        fsync_dir(out)
    finally:
        if not done:
            shutil.rmtree(version, ignore_errors=True)
        lock.release()
        (versions / f"{run}.lock").unlink(missing_ok=True)
    return version
