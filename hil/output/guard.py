"""Every `--out` checked before any work starts: one line, exit 2, instead of a replaced input.

An output must not be one of the command's inputs, nor a file of another kind that the tool
wrote (a capture store, a calibration, a checkpoint) unless `--force`; it must be a name the
file system takes (not empty, no component over NAME_MAX), not a special file, and in a folder
this process may write. Checked here once, rather than left to fail after the first epoch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from hil.errors import UserError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HDF5_KINDS = {"hil-capture-store": "capture store", "hil-calibration": "calibration"}


def file_kind(path: Path) -> str:
    """What an existing file holds, from its first bytes (and an HDF5 file's `format`)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        return "empty file"
    if head == HDF5_MAGIC:
        import h5py

        fmt = None
        for swmr in (False, True):  # SWMR: a store whose writer died (or still writes)
            try:
                with h5py.File(path, "r", libver="latest", swmr=swmr) as f:
                    fmt = f.attrs.get("format")
                break
            except OSError:
                continue
        return HDF5_KINDS.get(fmt.decode() if isinstance(fmt, bytes) else str(fmt), "HDF5 file")
    if head.startswith(ZIP_MAGIC):
        return "checkpoint"
    if head == PNG_MAGIC:
        return "image"
    return "file"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _writable_folder(path: Path) -> Path:
    """The nearest existing folder at or above `path` (where the output would be made)."""
    folder = path.absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def check_output(
    path: Path,
    kind: str,
    inputs: Mapping[str, Path | str | None] = {},  # noqa: B006  read only
    *,
    option: str = "--out",
    force: bool = False,
) -> Path:
    """`path` when a command may write its `kind` ("folder", "capture store", "calibration",
    "checkpoint", "image") there; else one `UserError` naming the option and the problem.
    `inputs`: the command's input files by option name."""
    text = str(path)
    if not text.strip() or (kind != "folder" and text in (".", "..")):
        raise UserError(f"{option}: an empty name; give a file name")
    long = [p for p in Path(text).parts if len(os.fsencode(p)) > 255]
    if long:
        raise UserError(
            f"{option} {text[:60]}...: a name of {len(long[0])} characters; at most 255"
        )
    for name, given in inputs.items():
        if given is not None and str(given) and _same(path, Path(given)):
            raise UserError(
                f"{option} {path} is also {name}: writing it would destroy that input; "
                "choose another name"
            )
    if path.exists():
        _check_existing(path, kind, option, force)
    folder = path if kind == "folder" and path.is_dir() else _writable_folder(path.parent)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: folder {folder} is not writable")
    if path.exists() and kind != "folder" and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: the file is read-only")
    return path


def _check_existing(path: Path, kind: str, option: str, force: bool) -> None:
    mode = os.stat(path).st_mode
    if kind == "folder":
        if not stat.S_ISDIR(mode):
            raise UserError(f"{option} {path}: exists and is not a folder")
        return
    if stat.S_ISDIR(mode):
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise UserError(f"{option} {path}: not a regular file (a device, pipe or socket)")
    found = file_kind(path)
    if found not in (kind, "empty file") and not force:
        raise UserError(
            f"{option} {path}: holds a {found}; refusing to replace it with a {kind} "
            "(choose another name, or pass --force)"
        )
