"""UVC/USB cameras, network streams and recordings through OpenCV's VideoCapture.

`VideoCapture.read()` has no timeout and blocks forever on a dead device or a silent stream, so
every OpenCV call on a capture runs in one daemon worker thread per open camera and the caller
waits a finite time. A call that never returns strands only that thread: the camera reports
DeviceTimeout, then DeviceDisconnected while the call is still stuck, and `reconnect()` starts a
fresh worker (the stuck one releases its capture and ends if its call ever returns, so at most one
thread is left behind per reconnect of a dead device).

Sources and what their frames claim:

- a device index (int), a device node (/dev/video0), a URL (rtsp://, http://), a named pipe:
  live sources, frames have simulated=False; a failed read means the device or stream is gone
  (DeviceDisconnected);
- a video file or an image sequence (`frames_%04d.png`, read with OpenCV's CAP_IMAGES so 16-bit
  images stay 16-bit): a replay, not a live measurement, so frames have simulated=True; its end is
  DeviceTimeout ("no frame will arrive") unless `loop` restarts it at its first frame.

Frames are (H, W) integers: colour frames become luminance with OpenCV's BT.601 weights,
Y = 0.299 R + 0.587 G + 0.114 B, rounded to the nearest integer (cv2.COLOR_BGR2GRAY).
`timestamp_s` is time.monotonic() when the read returned, for every source (a file's own clock
restarts when it loops; it is kept in meta["source_pos_s"] with meta["source_frame"]).

Exposure: OpenCV's CAP_PROP_EXPOSURE units depend on the capture backend. They are converted for
V4L2 (100 us units, manual exposure mode) and DSHOW/MSMF (log2 seconds) and read back; any other
backend, a device that refuses the property, and every replay keep a nominal value: the value last
set (0.01 s until then), reported as `exposure_control = "nominal"` in the snapshot. The V4L2 and
DSHOW/MSMF conversions follow OpenCV's documentation; no hardware checked them here, and the value
read back from the device is what frames report.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout, SourceEnded
from drivers.protocols import BackendOptions, Camera, Frame

log = logging.getLogger("hil.drivers.opencv")

NOMINAL_EXPOSURE_S = 0.01
REPLAY_KINDS = ("file", "sequence")


class _Late(Exception):
    """The worker did not finish a call in time (the call goes on in the worker)."""


class _Stuck(Exception):
    """An earlier call is still running in the worker."""

    def __init__(self, age_s: float) -> None:
        super().__init__(age_s)
        self.age_s = age_s


class _Worker:
    """One daemon thread that owns a VideoCapture and runs every call on it, in order."""

    def __init__(self, label: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: threading.Event | None = None
        self._since = 0.0
        threading.Thread(target=self._loop, daemon=True, name=f"opencv-camera-{label}").start()

    @property
    def busy(self) -> bool:
        return self._done is not None and not self._done.is_set()

    def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        if self.busy:
            raise _Stuck(time.monotonic() - self._since)
        done, box = self._submit(fn)
        if not done.wait(timeout_s):
            raise _Late
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self, last: Callable[[], Any], timeout_s: float) -> None:
        """Run `last` (the release) after whatever is in flight, then end the thread.

        Waits for it only when nothing is stuck, so a reopen finds the device released.
        """
        was_busy = self.busy
        done, _ = self._submit(last)
        self._jobs.put(None)
        if not was_busy:
            done.wait(timeout_s)

    def _submit(self, fn: Callable[[], Any]) -> tuple[threading.Event, list]:
        done, box = threading.Event(), []
        self._done, self._since = done, time.monotonic()
        self._jobs.put((fn, done, box))
        return done, box

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done, box = job
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the waiting caller
                box.append((False, e))
            done.set()


def source_kind(source: int | str) -> str:
    """'device', 'url', 'stream' (a named pipe), 'sequence' (a printf pattern) or 'file'."""
    if isinstance(source, int):
        return "device"
    if "://" in source:
        return "url"
    if re.search(r"%0?\d*d", source):
        return "sequence"
    if source.startswith("/dev/"):
        return "device"
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return "file"
    if stat.S_ISFIFO(mode):
        return "stream"
    if stat.S_ISCHR(mode):
        return "device"
    return "file"


def sequence_files(pattern: str) -> list[Path]:
    """The files an image-sequence pattern such as `frames_%04d.png` names, in order."""
    folder, base = os.path.split(pattern)
    regex = re.compile(re.sub(r"%0?\d*d", r"\\d+", re.escape(base)) + "$")
    root = Path(folder or ".")
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if regex.match(p.name))


def _exposure_units(api: str) -> tuple[Callable[[float], float], Callable[[float], float]] | None:
    """(seconds -> CAP_PROP_EXPOSURE value, value -> seconds) for backends with known units."""
    if api == "V4L2":  # V4L2_CID_EXPOSURE_ABSOLUTE, in 100 us
        return (lambda s: s / 1e-4), (lambda v: v * 1e-4)
    if api in ("DSHOW", "MSMF"):  # log2 of seconds
        return (lambda s: float(round(math.log2(s)))), (lambda v: 2.0**v)
    return None


class _Session:
    """One open capture: what the worker thread reads and changes, and only it.

    A worker stranded in a call that returns after a reconnect touches only its own session.
    """

    def __init__(self, source: int | str, kind: str, loop: bool, label: str) -> None:
        self.source, self.kind, self.loop, self.label = source, kind, loop, label
        self.cap: Any = None
        self.api: str | None = None
        self.next_index = 0  # of the next frame in a replay

    def _new_capture(self) -> Any:
        import cv2

        if self.cap is not None:
            self.cap.release()
        api = cv2.CAP_IMAGES if self.kind == "sequence" else cv2.CAP_ANY
        self.cap = cv2.VideoCapture(self.source, api)
        if not self.cap.isOpened():
            self.release()
            raise DeviceDisconnected(f"{self.label}: OpenCV cannot open source {self.source!r}")
        self.api, self.next_index = self.cap.getBackendName(), 0
        return self.cap

    def open(self) -> tuple[np.ndarray, float]:
        """Open and read the first frame (its shape is the camera's)."""
        ok, image = self._new_capture().read()
        if not ok:
            self.release()
            raise DeviceDisconnected(
                f"{self.label}: source {self.source!r} opened but delivered no frame"
            )
        self.next_index = 1
        return image, time.monotonic()

    def read(self) -> tuple[np.ndarray, float, int, float] | None:
        """(image, monotonic time, index in the replay, position in the file in ms) or None."""
        import cv2

        ok, image = self.cap.read()
        if not ok and self.kind in REPLAY_KINDS and self.loop:
            ok, image = self._new_capture().read()  # reopening is exact for every codec
        if not ok:
            return None
        index = self.next_index
        self.next_index += 1
        return image, time.monotonic(), index, float(self.cap.get(cv2.CAP_PROP_POS_MSEC))

    def exposure(self, seconds: float | None) -> tuple[str, float | None]:
        """Set (unless None) and read back the exposure: ('device', s) or ('nominal', seconds)."""
        import cv2

        units = None if self.kind in REPLAY_KINDS else _exposure_units(self.api or "")
        if units is None:
            return "nominal", seconds
        to_device, from_device = units
        if seconds is not None:
            if self.api == "V4L2":
                self.cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 1)  # V4L2_EXPOSURE_MANUAL
            if not self.cap.set(cv2.CAP_PROP_EXPOSURE, to_device(seconds)):
                return "nominal", seconds
        actual = from_device(float(self.cap.get(cv2.CAP_PROP_EXPOSURE)))
        if not (math.isfinite(actual) and 1e-6 < actual < 100):
            return "nominal", seconds
        return "device", actual

    def release(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class OpenCVCamera(Camera):
    """A camera, stream or recording read through cv2.VideoCapture with finite timeouts."""

    backend = "opencv"

    class Options(BackendOptions):
        source: int | str = Field(
            ...,
            description="device index (int), device node, video file, image-sequence pattern "
            "such as 'frames_%04d.png', named pipe, or URL (rtsp://, http://)",
        )
        bit_depth: int = Field(
            8, ge=1, le=16, description="bits per pixel the source delivers (8, or up to 16)"
        )
        exposure_s: float | None = Field(
            None,
            ge=1e-5,
            le=10.0,
            description="exposure to set at open where the backend's units are known (V4L2, "
            "DSHOW, MSMF); elsewhere kept as a nominal value; default: leave as is",
        )
        loop: bool = Field(
            False,
            description="files and sequences: restart at the first frame at the end instead "
            "of timing out (tests, replays)",
        )
        grayscale: bool = Field(
            True,
            description="convert colour frames to luminance (0.299 R + 0.587 G + 0.114 B); "
            "false: the source must be monochrome and is passed through unconverted",
        )

        @field_validator("source")
        @classmethod
        def _digits_are_a_device_index(cls, value: int | str) -> int | str:
            return int(value) if isinstance(value, str) and value.isdigit() else value

    def __init__(self, name: str, options: OpenCVCamera.Options) -> None:
        super().__init__(name, (0, 0), options.bit_depth, (1e-5, 10.0))  # shape: known at open
        self.options = options
        self.source_kind = source_kind(options.source)
        self.simulated = self.source_kind in REPLAY_KINDS
        self._worker: _Worker | None = None
        self._session: _Session | None = None
        self._api: str | None = None
        self._exposure_s = options.exposure_s or NOMINAL_EXPOSURE_S
        self._exposure_control = "nominal"
        self._pending: tuple | None = None
        self._frame_id = 0

    @property
    def _label(self) -> str:
        return f"camera {self.name!r}"

    # -- worker calls ----------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
        if self._worker is None:
            raise DeviceDisconnected(f"{self._label} is not open")
        try:
            return self._worker.call(fn, timeout_s)
        except _Stuck as e:
            raise DeviceDisconnected(
                f"{self._label}: an earlier OpenCV call on {self.options.source!r} has been "
                f"blocked for {e.age_s:.1f} s; the device is unresponsive, call reconnect()"
            ) from None
        except _Late:
            raise DeviceTimeout(
                f"{self._label}: no {what} from {self.options.source!r} within {timeout_s} s"
            ) from None

    # -- hooks -----------------------------------------------------------------------------------

    def _open_hw(self) -> None:
        o = self.options
        self.source_kind = source_kind(o.source)
        self.simulated = self.source_kind in REPLAY_KINDS
        if self.source_kind == "sequence" and not sequence_files(str(o.source)):
            raise DeviceDisconnected(f"{self._label}: no file matches the sequence {o.source!r}")
        if self.source_kind == "file" and not os.path.exists(str(o.source)):
            raise DeviceDisconnected(f"{self._label}: source file {o.source!r} does not exist")
        session = _Session(o.source, self.source_kind, o.loop, self._label)
        self._worker, self._session, self._frame_id = _Worker(self.name), session, 0
        try:
            image, t = self._call(session.open, o.timeout_s, "opening answer")
            self._api = session.api
            self.shape = self._to_mono(image).shape
            # a replay's first frame is data: deliver it; a live one is stale by the first snap
            self._pending = (image, t, 0, 0.0) if self.simulated else None
            if o.exposure_s is not None:
                self._set_exposure_hw(o.exposure_s)
            else:  # what the device runs at, where it says so
                control, actual = self._call(
                    lambda: session.exposure(None), o.timeout_s, "exposure answer"
                )
                if control == "device":
                    self._exposure_s, self._exposure_control = actual, control
        except BaseException:
            self._close_hw()
            raise

    def _close_hw(self) -> None:
        worker, session = self._worker, self._session
        self._worker, self._session, self._pending = None, None, None
        if worker is not None and session is not None:
            worker.stop(session.release, self.options.timeout_s)

    def _snap_hw(self, timeout_s: float) -> Frame:
        if self._pending is not None:
            raw, self._pending = self._pending, None
        else:
            raw = self._call(self._session.read, timeout_s, "frame")
        if raw is None:
            if self.simulated:
                raise SourceEnded(
                    f"{self._label}: source {self.options.source!r} ended after "
                    f"{self._session.next_index} frames; no frame will arrive (set loop: true "
                    "to replay)"
                )
            raise DeviceDisconnected(
                f"{self._label}: source {self.options.source!r} delivered no frame (unplugged "
                "or stream ended); call reconnect()"
            )
        image, t, index, pos_ms = raw
        image = self._to_mono(image)
        self._frame_id += 1
        meta = {"source_frame": index, "source_pos_s": pos_ms / 1000.0} if self.simulated else {}
        return Frame(image, t, self._exposure_s, self._frame_id, self.simulated, meta)

    def _to_mono(self, image: np.ndarray) -> np.ndarray:
        """(H, W) integers in [0, max_dn] from whatever OpenCV delivered."""
        import cv2

        if image.dtype not in (np.uint8, np.uint16):
            raise DeviceError(f"{self._label}: unsupported frame dtype {image.dtype}")
        if image.dtype == np.uint16 and self.bit_depth <= 8:
            raise DeviceError(
                f"{self._label}: the source delivers 16-bit frames; set bit_depth (e.g. 12 or 16)"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.ndim == 3:
            channels = image.shape[2]
            if channels not in (3, 4):
                raise DeviceError(f"{self._label}: cannot use {channels}-channel frames")
            if self.options.grayscale:
                code = cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY
                image = cv2.cvtColor(image, code)
            elif all(np.array_equal(image[..., 0], image[..., c]) for c in (1, 2)):
                image = image[..., 0]  # a grey source OpenCV expanded to BGR
            else:
                raise DeviceError(
                    f"{self._label}: the source delivers colour frames; set grayscale: true"
                )
        if image.ndim != 2:
            raise DeviceError(f"{self._label}: frame of shape {image.shape} is not an image")
        if int(image.max(initial=0)) > self.max_dn:
            raise DeviceError(
                f"{self._label}: frame value {int(image.max())} exceeds bit_depth "
                f"{self.bit_depth} (max {self.max_dn}); set bit_depth to the source's"
            )
        return np.ascontiguousarray(image)

    def _get_exposure_hw(self) -> float:
        return self._exposure_s

    def _set_exposure_hw(self, exposure_s: float) -> None:
        session = self._session
        if session is None or self.simulated:
            self._exposure_s, self._exposure_control = exposure_s, "nominal"
            return
        control, actual = self._call(
            lambda: session.exposure(exposure_s), self.options.timeout_s, "exposure answer"
        )
        if control == "nominal":
            log.warning(
                "%s: backend %s has no usable exposure control; %g s is nominal only",
                self._label,
                self._api,
                exposure_s,
            )
        self._exposure_s, self._exposure_control = actual, control

    def snapshot(self) -> dict[str, Any]:
        return super().snapshot() | {
            "source": self.options.source,
            "source_kind": self.source_kind,
            "backend_api": self._api,
            "exposure_control": self._exposure_control,
            "loop": self.options.loop,
            "grayscale": self.options.grayscale,
        }
