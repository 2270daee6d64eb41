"""The capture store: feature maps captured on the bench, appended as they come, resumable.

One HDF5 file per capture, written in SWMR mode, which only lets a writer extend and overwrite
datasets (attributes are fixed once it starts). Rows are buffered and committed in batches: their
data is written and flushed, and only then the `committed` row count is, so a run killed at any
moment leaves a file whose committed rows are complete; a rerun continues after them. A writer
that dies leaves HDF5's "open for writing" flags set, so the rerun first rewrites the store with
exactly its committed rows. A lock file beside the store keeps a second writer away.

A new store is built under a temporary name and renamed once its schema is written, so a kill at
any moment leaves no store or a resumable one. Every row carries a checksum of its feature maps,
label and dataset index, verified when the store is read and before a rerun appends. HDF5 does
not report a write that fails for lack of space (the error is lost while its caches flush, and
the count would be committed over zeros), so each commit first checks the free space.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hil.acquire.identity import StoreIdentity
from hil.errors import UserError
from hil.interrupts import uninterrupted

log = logging.getLogger(__name__)

# 2: the committed count is a dataset (SWMR writers may not touch attributes)
# 3: a typed, versioned identity (hil.acquire.identity.StoreIdentity)
# 4: the row checksum covers the label and the dataset index too
SCHEMA_VERSION = 4
FORMAT = "hil-capture-store"
ROW_FIELDS = {  # per-row datasets besides features, labels and frames
    "index": "i8",
    "timestamp_s": "f8",
    "exposure_s": "f8",
    "saturated_fraction": "f4",
    "simulated": "?",
    "pattern_hash": "S40",
    "checksum": "S32",
}


SPACE_MARGIN_BYTES = 1 << 20  # room kept free for HDF5's metadata and the file's close


def digest(features: np.ndarray, label, index: int) -> bytes:
    """First 128 bits of SHA-256 of a row's feature maps, label and dataset index, as hex."""
    h = hashlib.sha256(np.ascontiguousarray(features, np.float32).tobytes())
    h.update(np.ascontiguousarray(label, np.int64).tobytes())
    h.update(np.int64(index).tobytes())
    return h.hexdigest()[:32].encode()


class StoreFull(UserError):
    """Too little disk space for the next rows; the committed rows are intact."""


def _row_checksums(data: dict[str, np.ndarray]) -> np.ndarray:
    """Whether each row's stored checksum matches its features, label and index."""
    return np.array(
        [
            digest(f, lab, int(i)) == bytes(c)
            for f, lab, i, c in zip(
                data["features"], data["labels"], data["index"], data["checksum"], strict=True
            )
        ],
        dtype=bool,
    )


@dataclass(frozen=True)
class Row:
    index: int
    features: np.ndarray  # (m, H, W) float32
    label: np.ndarray | int
    timestamp_s: float
    exposure_s: float
    saturated_fraction: float
    pattern_hash: str
    simulated: bool
    frame: np.ndarray | None = None


class _WriterLock:
    """An exclusive flock on `<store>.lock`; the kernel drops it when its holder dies."""

    def __init__(self, store: Path) -> None:
        self.path = store.with_name(store.name + ".lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(
                    f"{store}: another process (pid {holder}) is writing this capture store"
                ) from None
            try:  # the holder before us may have removed the file after we opened it
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


class CaptureStore:
    """Append-only store; `open_for_capture` creates or resumes, `read` loads and verifies.

    `append` buffers a row, `commit` makes the buffered rows durable; `close` commits the rest.
    """

    def __init__(self, path: Path, file: h5py.File, lock: _WriterLock) -> None:
        self.path, self.file, self._lock = Path(path), file, lock
        self._count = int(file["committed"][0])
        self._pending: list[Row] = []
        # each commit writes every row dataset: their handles and dtypes looked up once (a
        # lookup per dataset and commit was a fifth of a commit's time)
        names = ["features", "labels", *ROW_FIELDS, *(["frames"] if "frames" in file else [])]
        self._datasets = {name: (file[name], file[name].dtype) for name in names}
        self._lengths = {name: file[name].shape[0] for name in names}
        self._committed = file["committed"]

    @classmethod
    def open_for_capture(
        cls,
        path: Path | str,
        *,
        plan: np.ndarray,
        feature_shape: tuple[int, ...],
        label_shape: tuple[int, ...],
        identity: StoreIdentity,
        keep_frames: tuple[int, int] | None = None,
    ) -> CaptureStore:
        """Create a store for `plan` (dataset indices, in capture order) or resume one whose
        identity (dataset, split, calibration, ...), plan and shapes match."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(path)
        try:
            _creating(path).unlink(missing_ok=True)  # a creation killed before its rename
            if not path.exists():
                _create(path, plan, feature_shape, label_shape, identity, keep_frames)
            f = _open_to_resume(path)
            try:
                _check_resumable(f, path, plan, feature_shape, label_shape, identity)
                _drop_damaged_rows(f, path)
            except BaseException:
                f.close()
                raise
            f.swmr_mode = True
        except BaseException:
            lock.release()
            raise
        return cls(path, f, lock)

    @property
    def count(self) -> int:
        """Committed rows."""
        return self._count

    @property
    def pending(self) -> int:
        """Rows appended but not yet committed."""
        return len(self._pending)

    @property
    def plan(self) -> np.ndarray:
        return self.file["plan"][:]

    def append(self, row: Row) -> None:
        self._pending.append(row)

    def commit(self) -> None:
        """Write the buffered rows past the committed count, flush them, then commit the count;
        a Ctrl-C or SIGTERM waits for the end (`hil.interrupts`)."""
        with uninterrupted():
            self._commit()

    def _commit(self) -> None:
        rows, f = self._pending, self.file
        if not rows:
            return
        i, k = self._count, len(rows)
        values = {
            "features": np.stack([r.features for r in rows]).astype(np.float32, copy=False),
            "labels": np.stack([np.asarray(r.label) for r in rows]),
            "index": [r.index for r in rows],
            "timestamp_s": [r.timestamp_s for r in rows],
            "exposure_s": [r.exposure_s for r in rows],
            "saturated_fraction": [r.saturated_fraction for r in rows],
            "simulated": [r.simulated for r in rows],
            "pattern_hash": [r.pattern_hash.encode() for r in rows],
            "checksum": [digest(r.features, r.label, r.index) for r in rows],
        }
        if "frames" in self._datasets and all(r.frame is not None for r in rows):
            values["frames"] = np.stack([r.frame for r in rows])
        arrays = {name: np.asarray(v, self._datasets[name][1]) for name, v in values.items()}
        self._check_space(sum(a.nbytes for a in arrays.values()))
        for name, array in arrays.items():
            ds = self._datasets[name][0]
            if self._lengths[name] != i + k:
                ds.resize(i + k, axis=0)
                self._lengths[name] = i + k
            ds[i : i + k] = array
        f.flush()
        self._committed[0] = i + k
        f.flush()
        self._count, self._pending = i + k, []

    def _check_space(self, nbytes: int) -> None:
        """`StoreFull` unless the disk holds these rows twice over plus the margin."""
        st = os.statvfs(self.path.parent)
        free, need = st.f_bavail * st.f_frsize, 2 * nbytes + SPACE_MARGIN_BYTES
        if free < need:
            self._pending = []  # not stored; a rerun captures them again
            raise StoreFull(
                f"{self.path}: disk full ({free / 2**20:.1f} MiB free, the next rows need "
                f"{need / 2**20:.1f} MiB): the {self._count} committed rows are intact; "
                "free some space and rerun the same command to resume"
            )

    def close(self) -> None:
        """Commit what waits, close the file, free the lock: whole, whatever signal comes."""
        if self.file:
            with uninterrupted():
                try:
                    self._commit()
                finally:
                    self.file.close()
                    self._lock.release()

    def __enter__(self) -> CaptureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _creating(path: Path) -> Path:
    return path.with_name(f".{path.name}.create.tmp")


def _create(path, plan, feature_shape, label_shape, identity, keep_frames) -> None:
    """The empty store, built under a temporary name and renamed when complete."""
    tmp = _creating(path)
    with h5py.File(tmp, "w", libver="latest") as f:
        _write_schema(f, plan, feature_shape, label_shape, identity, keep_frames)
    os.replace(tmp, path)


def _write_schema(f, plan, feature_shape, label_shape, identity, keep_frames) -> None:
    f.attrs.update(
        format=FORMAT,
        schema_version=SCHEMA_VERSION,
        identity=identity.model_dump_json(),
        feature_shape=list(feature_shape),
    )
    f.create_dataset("plan", data=np.asarray(plan, np.int64))
    f.create_dataset("committed", data=np.zeros(1, np.int64))
    f.create_dataset(
        "features",
        shape=(0, *feature_shape),
        maxshape=(None, *feature_shape),
        dtype="f4",
        chunks=(1, *feature_shape),
    )
    f.create_dataset(
        "labels",
        shape=(0, *label_shape),
        maxshape=(None, *label_shape),
        dtype="i8",
        chunks=(1, *label_shape) if label_shape else (256,),
    )
    for name, dtype in ROW_FIELDS.items():
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
    if keep_frames is not None:
        f.create_dataset(
            "frames",
            shape=(0, *keep_frames),
            maxshape=(None, *keep_frames),
            dtype="u2",
            chunks=(1, *keep_frames),
            compression="gzip",
        )


def _open_to_resume(path: Path) -> h5py.File:
    """Open an existing store for appending; one whose writer died is first recovered."""
    try:
        return h5py.File(path, "a", libver="latest")
    except OSError as e:
        if "consistency flags" not in str(e):  # not "a writer had it open": not a store at all
            raise UserError(f"{path}: cannot resume, not a readable capture store ({e})") from None
    try:  # we hold the writer lock, so the writer that left the flags set is gone
        _recover(path)
        return h5py.File(path, "a", libver="latest")
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: cannot resume, the store is damaged ({e})") from None


def _check_resumable(f, path, plan, feature_shape, label_shape, identity) -> None:
    if f.attrs.get("format") != FORMAT:
        raise UserError(f"{path}: exists and is not a hil capture store; choose another --out")
    version = int(f.attrs.get("schema_version", 0))
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: capture store schema {version}, this hil writes {SCHEMA_VERSION}; "
            "choose another --out"
        )
    differs = StoreIdentity.parse(f.attrs.get("identity", "{}"), path).differences(identity)
    if differs:
        raise UserError(
            f"{path}: exists from a different capture (differs in {', '.join(differs)}); "
            "choose another --out or delete it"
        )
    if not np.array_equal(f["plan"][:], np.asarray(plan, np.int64)):
        raise UserError(
            f"{path}: exists with another list of samples to capture (the dataset changed?); "
            "choose another --out or delete it"
        )
    shapes = (tuple(f["features"].shape[1:]), tuple(f["labels"].shape[1:]))
    if shapes != (tuple(feature_shape), tuple(label_shape)):
        raise UserError(
            f"{path}: holds feature maps {shapes[0]} and labels {shapes[1]}, this capture makes "
            f"{tuple(feature_shape)} and {tuple(label_shape)}; choose another --out"
        )


def _drop_damaged_rows(f: h5py.File, path: Path) -> None:
    """Commit only the rows before the first whose checksum fails (a disk that lost writes, an
    edit): the rerun captures the rest again rather than appending after damaged rows."""
    n = int(f["committed"][0])
    if n == 0:
        return
    data = {k: f[k][:n] for k in ("features", "labels", "index", "checksum")}
    rows = min(len(v) for v in data.values())  # a count committed past the rows written
    ok = np.concatenate(
        [_row_checksums({k: v[:rows] for k, v in data.items()}), np.zeros(n - rows, bool)]
    )
    if ok.all():
        return
    first = int(np.argmin(ok))
    log.warning(
        "%s: %d of %d committed rows fail their checksum (first: row %d); capturing again "
        "from row %d",
        path,
        int((~ok).sum()),
        n,
        first,
        first,
    )
    f["committed"][0] = first
    f.flush()


def _recover(path: Path) -> None:
    """Rewrite a store whose writer died (HDF5 then refuses to reopen it for writing, but SWMR
    readers still see every committed row) as a clean file with exactly those rows."""
    tmp = path.with_name(f".{path.name}.recover.tmp")
    with (
        h5py.File(path, "r", libver="latest", swmr=True) as src,
        h5py.File(tmp, "w", libver="latest") as dst,
    ):
        n = int(src["committed"][0])
        dst.attrs.update(dict(src.attrs))
        for name, ds in src.items():
            per_row = ds.maxshape[0] is None
            dst.create_dataset(
                name,
                data=ds[:n] if per_row else ds[:],
                maxshape=ds.maxshape,
                chunks=ds.chunks,
                compression=ds.compression,
            )
    os.replace(tmp, path)


def _open_for_reading(path: Path) -> h5py.File:
    """Plain read-only first: a damaged file fails at once, where SWMR reading would retry its
    metadata for a long time. SWMR only for a store a writer holds (or held, until it died)."""
    try:
        return h5py.File(path, "r", libver="latest")
    except OSError as e:
        if "consistency flags" not in str(e):
            raise
        return h5py.File(path, "r", libver="latest", swmr=True)


def committed(path: Path | str) -> int:
    """Committed rows of a store, also while a writer appends to it; 0 for a store not begun."""
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return int(f["committed"][0])
    except (OSError, KeyError):
        return 0


@dataclass(frozen=True)
class Captures:
    features: np.ndarray  # (N, m, H, W)
    labels: np.ndarray
    index: np.ndarray
    meta: dict[str, np.ndarray]
    identity: StoreIdentity


def _check_contents(path: Path, data: dict[str, np.ndarray], plan: np.ndarray) -> None:
    """What a checksum cannot see: rows rewritten together with their checksums. The writer
    commits the plan's indices in order and finite maps, so anything else was edited."""
    n = len(data["index"])
    off = np.flatnonzero(data["index"] != plan[:n]) if n <= len(plan) else [len(plan)]
    if len(off):
        r = int(off[0])
        says = f"the plan says {int(plan[r])}" if r < len(plan) else "beyond the plan"
        raise UserError(
            f"{path}: row {r} holds dataset index {int(data['index'][r])}, {says} "
            "(a duplicated or foreign index): the file was modified"
        )
    features = data["features"]
    bad = np.flatnonzero(~np.isfinite(features).all(axis=tuple(range(1, features.ndim))))
    if len(bad):
        raise UserError(
            f"{path}: non-finite feature maps in {len(bad)} rows (first: row {bad[0]}): "
            "the file was modified"
        )


def read(path: Path | str) -> Captures:
    """The committed rows of a store, verified; one clear error for a bad file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: capture store not found")
    try:
        with _open_for_reading(path) as f:
            if f.attrs.get("format") != FORMAT:
                raise UserError(f"{path}: not a hil capture store")
            version = int(f.attrs["schema_version"])
            if version > SCHEMA_VERSION:
                raise UserError(f"{path}: written by a newer hil (schema {version}); upgrade hil")
            if version < SCHEMA_VERSION:
                raise UserError(
                    f"{path}: written by an older hil (schema {version}); capture it again"
                )
            n = int(f["committed"][0])
            data = {k: f[k][:n] for k in ("features", "labels", *ROW_FIELDS)}
            plan = f["plan"][:]
            identity = f.attrs["identity"]
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: truncated or corrupt capture store ({e})") from None
    short = {k: len(v) for k, v in data.items() if len(v) != n}
    if short:
        name, rows = next(iter(short.items()))
        raise UserError(f"{path}: truncated: {name} has {rows} rows of {n} committed")
    bad = np.flatnonzero(~_row_checksums(data))
    if len(bad):
        raise UserError(
            f"{path}: checksum mismatch in {len(bad)} rows (first: row {bad[0]}, "
            f"dataset index {int(data['index'][bad[0]])}): the file was modified"
        )
    _check_contents(path, data, plan)
    meta = {k: v for k, v in data.items() if k not in ("features", "labels", "index", "checksum")}
    identity = StoreIdentity.parse(identity, path)
    return Captures(data["features"], data["labels"], data["index"], meta, identity)
