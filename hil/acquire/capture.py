"""`hil capture`: dataset images through the bench into feature maps, at the camera's pace.

show → settle → snap → dark and stray-light removal → registration → crop tiles → ± subtraction
→ store. Showing and snapping run on this thread; turning frames into feature maps and writing
them runs on a worker, so the rate approaches the camera's. The worker commits rows in batches
(at most COMMIT_EVERY_S apart), so a kill loses only uncommitted frames and the store stays
exactly-once; Ctrl-C stores every frame already taken. A rerun of the same command resumes
after the last committed sample, with the same simulated noise per sample as an unbroken run.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from calibration import calfile
from hil.acquire.identity import StoreIdentity, array_digest, as_shown, pattern_hash
from hil.acquire.store import CaptureStore, Row
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig
from hil.data.datasets import load_dataset
from hil.data.sampling import stratified_fraction

SNAP_TIMEOUT_S = 5.0
COMMIT_EVERY_S = 0.2  # a crash loses at most this much capture time (retaken on the rerun)


class FeatureExtractor:
    """Frame (DN) → feature maps on the design's grid (m, Hd, Wd), in the design's units.

    Each tile is sampled (bilinearly, edges clamped) at the registered position of every display
    pixel, so maps from all tiles line up with each other and with the simulated frontend's
    output; dividing by the bench's throughput (measured kernel sums over designed ones) puts them
    in its units. Sampling and the ± subtraction are one sparse matrix, built once, so a frame
    costs one product instead of a resampling per tile.
    """

    def __init__(self, cal: calfile.Calibration, design_psf_sums: np.ndarray) -> None:
        self.cal = cal
        h, w = cal.display_shape[:2]
        ys, xs = np.mgrid[:h, :w].astype(np.float64)
        points = np.stack([xs.ravel(), ys.ravel(), np.ones(h * w)])
        sample = [bilinear_weights((a @ points)[::-1], cal.frame_shape) for a in cal.affines]
        if cal.signed:
            sample = [p - n for p, n in zip(sample[0::2], sample[1::2], strict=True)]
        self.weights = scipy.sparse.vstack(sample, format="csr")
        self.shape = (h, w)
        ratio = cal.psfs.sum(axis=(1, 2, 3)) / design_psf_sums
        self.scale = float(np.median(ratio))
        self._dark = cal.dark_dn.astype(np.float64).ravel()
        self._background = cal.background_dn_per_s.astype(np.float64).ravel()

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        signal = (frame.ravel() - self._dark) / self.cal.exposure_s - self._background
        maps = self.weights @ signal / self.scale
        return maps.reshape(-1, *self.shape).astype(np.float32)


def bilinear_weights(yx: np.ndarray, shape: tuple[int, int]) -> scipy.sparse.csr_matrix:
    """Rows of weights that sample an image of `shape` bilinearly at points (2, n) (y, x), clamped
    to the image like `scipy.ndimage.map_coordinates(order=1, mode="nearest")`."""
    h, w = shape
    y, x = np.clip(yx[0], 0, h - 1), np.clip(yx[1], 0, w - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 2, 0))
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 2, 0))
    fy, fx = y - y0, x - x0
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    rows = np.tile(np.arange(len(y)), 4)
    cols = np.concatenate([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    vals = np.concatenate([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(y), h * w))


def pre_compensate(levels: np.ndarray, cal: calfile.Calibration) -> np.ndarray:
    """Drive levels whose light is proportional to `levels`: the inverse display response."""
    return np.interp(levels, cal.display_response, cal.display_levels).astype(np.float32)


def run_capture(
    config: BenchConfig,
    calibration: Path,
    dataset: str,
    split: str,
    out: Path,
    console: Console,
    *,
    fraction: float = 1.0,
    seed: int = 0,
    keep_frames: bool = False,
    data_root: Path | None = None,
) -> dict[str, Any]:
    bench = Bench(config)
    data = load_dataset(dataset, data_root)
    plan = stratified_fraction(data.labels, data.split(split), fraction, seed)
    shown = as_shown(data.images[plan], bench.display.shape[:2])
    with bench:
        design = bench.design
        inputs = calfile.fingerprint_inputs(
            design, bench.camera.shape, bench.display.shape, bench.camera.bit_depth
        )
        cal = calfile.load(calibration, expect_fingerprint=inputs)
        extract = FeatureExtractor(cal, design.psfs.sum(axis=(1, 2, 3)))
        identity = StoreIdentity(
            dataset=dataset,
            split=split,
            fraction=fraction,
            seed=seed,
            data_digest=array_digest(data.images, data.labels),
            indices_digest=array_digest(plan),
            display_shape=tuple(bench.display.shape),
            calibration_id=cal.id,
            bench_fingerprint=cal.fingerprint,
            simulated=bench.simulated,
        )
        label_shape = tuple(data.labels.shape[1:])
        store = CaptureStore.open_for_capture(
            out,
            plan=plan,
            feature_shape=(cal.kernels if cal.signed else cal.tiles, *extract.shape),
            label_shape=label_shape,
            identity=identity,
            keep_frames=tuple(bench.camera.shape) if keep_frames else None,
        )
        with store:
            start = store.count
            stats = _capture_loop(
                bench, store, plan, shown, data, cal, extract, start, seed, console, keep_frames
            )
            captured = store.count
        snapshot = bench.snapshot()
    return {
        "store": str(out),
        "dataset": dataset,
        "split": split,
        "fraction": fraction,
        "planned": len(plan),
        "captured": captured,
        "resumed_from": start,
        "calibration_id": cal.id,
        "simulated": snapshot["simulated"],
        "bench": snapshot,
        **stats,
    }


def _capture_loop(bench, store, plan, shown, data, cal, extract, start, seed, console, keep):
    cam, display = bench.camera, bench.display
    cam.exposure_s = cal.exposure_s
    for source in bench.light_sources:
        source.on()
    world = getattr(cam, "world", None)  # a simulated camera: reproducible noise per sample
    todo: queue.Queue = queue.Queue(maxsize=64)
    failure: list[BaseException] = []

    def writer() -> None:
        last_commit = time.monotonic()
        try:
            while True:
                try:
                    item = todo.get(timeout=COMMIT_EVERY_S)
                except queue.Empty:
                    item = ()  # nothing new: commit what waits
                if item is None:
                    break
                if item:
                    i, frame = item
                    store.append(
                        Row(
                            index=int(plan[i]),
                            features=extract(frame.image),
                            label=data.labels[plan[i]],
                            timestamp_s=frame.timestamp_s,
                            exposure_s=frame.exposure_s,
                            saturated_fraction=float(np.mean(frame.image >= 0.98 * cam.max_dn)),
                            pattern_hash=pattern_hash(shown[i]),
                            simulated=frame.simulated,
                            frame=frame.image if keep else None,
                        )
                    )
                if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    store.commit()
                    last_commit = time.monotonic()
            store.commit()
        except BaseException as e:  # surface it on the main thread
            failure.append(e)

    thread = threading.Thread(target=writer, name="capture-writer", daemon=True)
    thread.start()
    t0, taken = time.perf_counter(), 0
    columns = (
        TextColumn("capturing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} samples/s"),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("capture", total=len(plan), completed=start, rate=0.0)
            for i in range(start, len(plan)):
                if failure:
                    break
                display.show(pre_compensate(shown[i], cal))
                if world is not None:
                    world.noise.manual_seed(seed * 1_000_003 + int(plan[i]))
                frame = cam.snap(SNAP_TIMEOUT_S)
                while not failure:  # a writer that died takes nothing more
                    try:
                        todo.put((i, frame), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                taken += 1
                bar.update(task, advance=1, rate=taken / (time.perf_counter() - t0))
    finally:
        while thread.is_alive():  # the writer stores every frame already taken, even on Ctrl-C
            try:
                todo.put(None, timeout=0.1)
                break
            except queue.Full:
                pass
        thread.join()
    if failure:
        raise failure[0]
    elapsed = time.perf_counter() - t0
    return {"seconds": round(elapsed, 3), "samples_per_s": taken / elapsed if elapsed else 0.0}
