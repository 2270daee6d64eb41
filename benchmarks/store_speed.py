"""The capture store's writes against plain h5py writes of the same feature maps.

    .venv/bin/python benchmarks/store_speed.py [--rows 960] [--batch 24] [--repeats 3]

Both write `--rows` rows of 8 float32 32x32 feature maps (the default bench's), committed
`--batch` rows at a time (a capture commits every 0.2 s: 24 rows at 120 fps). The store
(`CaptureStore`) writes each row's checksum and metadata, checks the free space and flushes
twice per commit (rows, then the committed count); the reference is a bare resizable h5py
dataset of the same chunks, flushed once per batch. Their ratio is what durability costs; the
rows per second against the camera's rate is the headroom the capture has.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from hil.acquire.identity import StoreIdentity
from hil.acquire.store import CaptureStore, Row

SHAPE = (8, 32, 32)


def _identity() -> StoreIdentity:
    zeros = "0" * 32
    return StoreIdentity(
        dataset="digits", split="train", fraction=1.0, seed=0, data_digest=zeros,
        indices_digest=zeros, input_shape=(32, 32), display_scale=1, display_origin=(0, 0),
        display_shape=(32, 32), calibration_id="bench", bench_fingerprint="bench",
        simulated=True,
    )  # fmt: skip


def _maps(rows: int) -> np.ndarray:
    return np.random.default_rng(0).random((rows, *SHAPE), dtype=np.float32)


def store_time(path: Path, maps: np.ndarray, batch: int) -> float:
    """Seconds to append and commit every row of ``maps`` to a new capture store."""
    rows = len(maps)
    t0 = time.perf_counter()
    with CaptureStore.open_for_capture(
        path, plan=np.arange(rows), feature_shape=SHAPE, label_shape=(),
        identity=_identity(),
    ) as store:  # fmt: skip
        for i in range(rows):
            store.append(Row(i, maps[i], i % 10, time.time(), 0.01, 0.0, "0" * 16, True))
            if (i + 1) % batch == 0:
                store.commit()
    return time.perf_counter() - t0


def plain_time(path: Path, maps: np.ndarray, batch: int) -> float:
    """Seconds to write the same rows to a bare resizable h5py dataset, a flush per batch."""
    t0 = time.perf_counter()
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset(
            "features", shape=(0, *SHAPE), maxshape=(None, *SHAPE), dtype="f4",
            chunks=(1, *SHAPE),
        )  # fmt: skip
        for i in range(0, len(maps), batch):
            part = maps[i : i + batch]
            ds.resize(i + len(part), axis=0)
            ds[i : i + len(part)] = part
            f.flush()
    return time.perf_counter() - t0


def ratios(rows: int, batch: int, repeats: int) -> tuple[list[float], float]:
    """(store / plain per interleaved repeat, the store's best rows per second)."""
    maps = _maps(rows)
    out, best = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            store = store_time(Path(tmp) / f"store{r}.h5", maps, batch)
            plain = plain_time(Path(tmp) / f"plain{r}.h5", maps, batch)
            out.append(store / plain)
            best = max(best, rows / store)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=960)
    ap.add_argument("--batch", type=int, default=24, help="rows per commit")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    found, rate = ratios(args.rows, args.batch, args.repeats)
    print(f"{args.rows} rows of {SHAPE} float32, {args.batch} per commit, {args.repeats} repeats")
    print(f"store / plain h5py: min {min(found):.3f}, median {statistics.median(found):.3f}")
    print(f"store: {rate:.0f} rows/s at best ({rate / 120:.1f}x a 120 fps camera)")


if __name__ == "__main__":
    main()
