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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from calibration import calfile
from hil.acquire.features import FeatureExtractor, pre_compensate
from hil.acquire.identity import StoreIdentity, as_shown, pattern_hash
from hil.acquire.store import CaptureStore, Row
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig
from hil.bench.design import grid_origin
from hil.data.datasets import Dataset, array_digest, load_dataset
from hil.data.sampling import stratified_fraction
from hil.interrupts import uninterrupted

COMMIT_EVERY_S = 0.2  # a crash loses at most this much capture time (retaken on the rerun)


@dataclass(frozen=True)
class CaptureRequest:
    """What to capture: a stratified `fraction` of a dataset's split, into the store `out`."""

    calibration: Path
    dataset: str
    split: str
    out: Path
    fraction: float = 1.0
    seed: int = 0  # of the subset, and of the simulated noise
    keep_frames: bool = False
    data_root: Path | None = None

    def args(self) -> dict[str, Any]:
        """The arguments a run record keeps."""
        keys = ("calibration", "out", "dataset", "split", "fraction", "seed")
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items() if k in keys}


@dataclass(frozen=True)
class _Capture:
    """What the capture loop works through: the plan's images, shown and turned into rows."""

    bench: Bench
    store: CaptureStore
    plan: np.ndarray  # dataset indices, in capture order
    shown: np.ndarray  # the plan's images on the input grid
    labels: np.ndarray  # the whole dataset's
    cal: calfile.Calibration
    extract: FeatureExtractor
    seed: int
    keep_frames: bool


def run_capture(
    config: BenchConfig,
    request: CaptureRequest,
    console: Console,
    *,
    data: Dataset | None = None,
    check: Callable[[calfile.Calibration], None] | None = None,
) -> dict[str, Any]:
    """Capture `request` on the bench; `data` is the dataset if already loaded, and `check` sees
    the calibration before anything is shown (a student that cannot read its maps fails then)."""
    r = request
    bench = Bench(config)
    if data is None:
        data = load_dataset(r.dataset, r.data_root)
    plan = stratified_fraction(data.labels, data.split(r.split), r.fraction, r.seed)
    shown = as_shown(data.images[plan], bench.design.hw)
    with bench:
        design = bench.design
        origin = grid_origin(design, bench.display.shape, f"display {bench.display.name!r}")
        inputs = calfile.fingerprint_inputs(
            design, bench.camera.shape, bench.display.shape, bench.camera.bit_depth
        )
        cal = calfile.load(r.calibration, expect_fingerprint=inputs)
        if check is not None:
            check(cal)
        extract = FeatureExtractor(cal, design.psfs.sum(axis=(1, 2, 3)))
        with _open_store(bench, r, plan, data, cal, extract, origin) as store:
            start = store.count
            job = _Capture(
                bench, store, plan, shown, data.labels, cal, extract, r.seed, r.keep_frames
            )
            stats = _capture_loop(job, start, console)
            captured = store.count
        snapshot = bench.snapshot()
    return {
        "store": str(r.out),
        "dataset": r.dataset,
        "split": r.split,
        "fraction": r.fraction,
        "planned": len(plan),
        "captured": captured,
        "resumed_from": start,
        "calibration_id": cal.id,
        "simulated": snapshot["simulated"],
        "bench": snapshot,
        **stats,
    }


def _open_store(
    bench: Bench,
    r: CaptureRequest,
    plan: np.ndarray,
    data: Dataset,
    cal: calfile.Calibration,
    extract: FeatureExtractor,
    origin: tuple[int, int],
) -> CaptureStore:
    """A new store for `plan`, or the one a previous run of the same request left to resume;
    `origin` is the (x, y) of the input grid's top-left on the display."""
    design = bench.design
    identity = StoreIdentity(
        dataset=r.dataset,
        split=r.split,
        fraction=r.fraction,
        seed=r.seed,
        data_digest=array_digest(data.images, data.labels),
        indices_digest=array_digest(plan),
        input_shape=design.hw,
        display_scale=design.display_scale,
        display_origin=origin,
        display_shape=tuple(bench.display.shape),
        calibration_id=cal.id,
        bench_fingerprint=cal.fingerprint,
        simulated=bench.simulated,
    )
    return CaptureStore.open_for_capture(
        r.out,
        plan=plan,
        feature_shape=(cal.kernels if cal.signed else cal.tiles, *extract.shape),
        label_shape=tuple(data.labels.shape[1:]),
        identity=identity,
        keep_frames=tuple(bench.camera.shape) if r.keep_frames else None,
    )


def _capture_loop(job: _Capture, start: int, console: Console) -> dict[str, float]:
    """Show and snap plan entries `start`.. on this thread while a worker stores the rows."""
    job.bench.camera.exposure_s = job.cal.exposure_s
    for source in job.bench.light_sources:
        source.on()
    todo: queue.Queue = queue.Queue(maxsize=64)
    failure: list[BaseException] = []
    thread = threading.Thread(
        target=_write_rows, args=(job, todo, failure), name="capture-writer", daemon=True
    )
    thread.start()
    t0 = time.perf_counter()
    try:
        taken = _show_and_snap(job, start, todo, failure, console)
    finally:  # the writer stores every frame already taken, even on Ctrl-C; a signal while it
        with uninterrupted():  # finishes would leave it writing beside the store's close
            while thread.is_alive():
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


def _show_and_snap(
    job: _Capture, start: int, todo: queue.Queue, failure: list, console: Console
) -> int:
    """Hand (plan position, frame) pairs to the writer; returns how many frames were taken."""
    cam, display, design = job.bench.camera, job.bench.display, job.bench.design
    display_hw = display.shape[:2]
    timeout_s = cam.frame_timeout_s()  # the exposure is fixed for the whole capture
    t0, taken = time.perf_counter(), 0
    columns = (
        TextColumn("capturing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} samples/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("capture", total=len(job.plan), completed=start, rate=0.0)
        for i in range(start, len(job.plan)):
            if failure:
                break
            display.show(design.on_display(pre_compensate(job.shown[i], job.cal), display_hw))
            cam.seed_noise(job.seed * 1_000_003 + int(job.plan[i]))  # same noise on a rerun
            frame = cam.snap(timeout_s)
            while not failure:  # a writer that died takes nothing more
                try:
                    todo.put((i, frame), timeout=0.1)
                    break
                except queue.Full:
                    pass
            taken += 1
            bar.update(task, advance=1, rate=taken / (time.perf_counter() - t0))
    return taken


def _write_rows(job: _Capture, todo: queue.Queue, failure: list) -> None:
    """The worker: frames into rows, committed at most COMMIT_EVERY_S apart; None ends it."""
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
                job.store.append(_row(job, *item))
            if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                job.store.commit()
                last_commit = time.monotonic()
        job.store.commit()
    except BaseException as e:  # surface it on the main thread
        failure.append(e)


def _row(job: _Capture, i: int, frame) -> Row:
    image = frame.image
    return Row(
        index=int(job.plan[i]),
        features=job.extract(image),
        label=job.labels[job.plan[i]],
        timestamp_s=frame.timestamp_s,
        exposure_s=frame.exposure_s,
        saturated_fraction=float(np.mean(image >= 0.98 * job.bench.camera.max_dn)),
        pattern_hash=pattern_hash(job.shown[i]),
        simulated=frame.simulated,
        frame=image if job.keep_frames else None,
    )
