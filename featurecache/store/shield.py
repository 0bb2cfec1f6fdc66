"""HDF5 outputs that fail cleanly: HDF5 writes through a file object that never fails.

When a write fails (a full disk), HDF5 can report it only while closing objects, where h5py
ignores it, and the library can be left in a state that crashes the process later. So HDF5
never writes to disk itself here: it writes through :class:`Shield`, a file object whose
``write`` always reports success to HDF5 and remembers the first OS error instead. After the
file is closed, :func:`hdf5_output` raises that error (and the temporary file is removed) or
renames the complete file into place: the final name holds a whole file or nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

__all__ = ["Shield", "hdf5_output"]


class Shield(io.RawIOBase):
    """A read/write file object over one OS file; write errors are remembered, not raised."""

    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = self.size = 0
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = os.pread(self.fd, len(b), self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        if self.error is None:
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as exc:
                self.error = exc
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def truncate(self, size=None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        self.size = size
        return size

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        """fsync, remembering a failure like a failed write."""
        if self.error is None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


@contextlib.contextmanager
def hdf5_output(path):
    """Yield an ``h5py.File`` (mode ``w``) whose content appears under ``path`` only when it
    was written completely; otherwise the first OS error is raised and nothing is left."""
    import h5py

    from ..files import fsync_dir

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shield = Shield(tmp)
    try:
        with h5py.File(shield, "w") as f:
            yield f
        shield.sync()
        if shield.error is not None:
            raise shield.error
        shield.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shield.close()
        tmp.unlink(missing_ok=True)
