"""The one atomic write every writer of the project uses: temp file, fsync, rename.

A reader (or a person opening a picture) never sees half a file, and a crash, Ctrl-C or a full disk
leaves the previous file (or none) and no temporary file behind. It lives here, the lowest layer
that writes files, because `calibration` may not import `hil`.

Writers whose libraries fail badly on a full disk (HDF5 loses the error in its caches and may
crash at exit; torch.save raises an internal assertion) build the file in memory and hand the
bytes to `atomic_write_bytes`, where a full disk is an ordinary `NoSpace`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class NoSpace(OSError):
    """The disk (or quota) filled while writing `filename`; nothing of it was left behind."""


def _file_mode(path: Path) -> int:
    """Keep the mode of the file being replaced, else what the umask allows (mkstemp's 0600
    would make a shared bench file unreadable to other users)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` (same suffix, so writers that choose the format
    by extension still do); when the block ends cleanly, fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _file_mode(path))
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(
                e.errno,
                f"disk full while writing it ({_free_mib(path.parent):.1f} MiB free); "
                "the previous file, if any, is unchanged: free some space and rerun",
                str(path),
            ) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible everywhere
        _fsync(path.parent, directory=True)


def _free_mib(folder: Path) -> float:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize / 2**20


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
