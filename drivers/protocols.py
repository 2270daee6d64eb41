"""The device protocols every backend implements, real or simulated.

Public methods validate and convert; a backend implements only the small private hooks (`_show_hw`,
`_snap_hw`, ...), so every backend gets the same checks and the same errors.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout, SourceEnded

log = logging.getLogger("hil.drivers")

SNAP_TIMEOUT_S = 5.0  # a frame that takes longer than this past its exposure is lost


class BackendOptions(BaseModel):
    """A backend's keys in its bench-file section; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(2.0, gt=0, le=600, description="timeout of every device call")


class Device:
    """Open/close life cycle, a context manager, and a settings snapshot for the run record.

    A backend sets `backend` and an `Options` model for its bench-file keys; the registry builds
    it from a bench file through `from_options`.
    """

    kind: ClassVar[str] = "device"
    backend: ClassVar[str] = ""
    simulated: bool = False
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, name: str) -> None:
        self.name = name
        self._open = False

    @classmethod
    def from_options(cls, name: str, options: BackendOptions, context: Any = None) -> Device:
        """Build from validated options. Real backends take (name, options); simulated ones
        override this to reach the world through `context.sim_world()`."""
        return cls(name, options)

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        """Open the device; any failure surfaces as a DeviceError naming the device."""
        if self._open:
            return
        try:
            self._open_hw()
        except DeviceError:
            raise
        except Exception as e:
            raise DeviceDisconnected(f"{self.kind} {self.name!r}: cannot open: {e}") from e
        self._open = True

    def reconnect(self) -> None:
        """Close (ignoring errors of a device that is gone) and open again."""
        log.warning("%s %r: reconnecting", self.kind, self.name)
        try:
            self.close()
        except Exception as e:
            log.warning("%s %r: close before reconnect failed: %s", self.kind, self.name, e)
            self._open = False
        self.open()

    def close(self) -> None:
        if self._open:
            try:
                self._close_hw()
            finally:
                self._open = False

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> None:
        if not self._open:
            raise DeviceDisconnected(f"{self.kind} {self.name!r} is not open")

    def snapshot(self) -> dict[str, Any]:
        """Settings worth recording with every run."""
        return {
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "simulated": self.simulated,
        }

    def _open_hw(self) -> None:
        pass

    def _close_hw(self) -> None:
        pass


def check_timeout(timeout_s: float) -> float:
    timeout_s = float(timeout_s)
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be finite and positive, got {timeout_s}")
    return timeout_s


class Display(Device, ABC):
    """A monitor or SLM: shows a (H, W) image of values in [0, 1] or integer levels."""

    kind = "display"

    def __init__(self, name: str, shape: tuple[int, ...], bit_depth: int = 8) -> None:
        super().__init__(name)
        self.shape = tuple(int(s) for s in shape)
        self.bit_depth = int(bit_depth)
        self.listeners: list[Callable[[np.ndarray], None]] = []

    def to_levels(self, image: np.ndarray) -> np.ndarray:
        """Validate an image and convert it to float32 in [0, 1] as the display will show it."""
        image = np.asarray(image)
        if image.shape != self.shape:
            raise ValueError(f"{self.name}: image must be {self.shape} (H, W), got {image.shape}")
        top = 2**self.bit_depth - 1
        if np.issubdtype(image.dtype, np.integer):
            if image.min() < 0 or image.max() > top:
                raise ValueError(f"{self.name}: integer levels must lie in [0, {top}]")
            return (image.astype(np.float32) / top).astype(np.float32)
        if np.issubdtype(image.dtype, np.floating):
            if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise ValueError(f"{self.name}: float images must be finite and in [0, 1]")
            # a real display shows quantised levels; so does every backend
            return (np.round(image * top) / top).astype(np.float32)
        raise TypeError(f"{self.name}: unsupported image dtype {image.dtype}")

    def show(self, image: np.ndarray) -> None:
        self._require_open()
        self._output(self.to_levels(image))

    def blank(self) -> None:
        """Show black; also what every exit path does."""
        if self._open:
            self._output(np.zeros(self.shape, np.float32))

    def _output(self, levels: np.ndarray) -> None:
        self._show_hw(levels)
        for listener in self.listeners:  # e.g. a simulated camera watching a real display
            listener(levels)

    def snapshot(self) -> dict[str, Any]:
        return super().snapshot() | {"shape": list(self.shape), "bit_depth": self.bit_depth}

    @abstractmethod
    def _show_hw(self, levels: np.ndarray) -> None: ...


class RetryPolicy(BaseModel):
    """How a camera rides out transient faults: a timed-out or corrupt frame is asked for again,
    a disconnect is reopened, up to `retries` times per frame with a doubling pause."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retries: int = Field(
        5, ge=0, le=100, description="attempts after the first, per frame (slmsuite's 5)"
    )
    retry_backoff_s: float = Field(
        0.05, ge=0, le=10, description="pause before the first retry, doubled each time"
    )


class FaultInjection(BaseModel):
    """Faults to rehearse on any camera: after `after_frames` good frames, the next `timeouts`
    snaps time out (each waiting `wait_s`, default the snap's own timeout), then the camera
    drops off `disconnects` times, each needing a reconnect."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeouts: int = Field(0, ge=0, le=1000, description="snaps that time out")
    disconnects: int = Field(0, ge=0, le=100, description="times the camera drops off")
    after_frames: int = Field(0, ge=0, le=10**9, description="good frames before the faults")
    wait_s: float | None = Field(
        None, ge=0, le=600, description="how long an injected timeout waits"
    )


@dataclass
class Frame:
    """One camera frame in digital numbers, with what a later reader needs to trust it."""

    image: np.ndarray
    timestamp_s: float
    exposure_s: float
    frame_id: int
    simulated: bool
    meta: dict[str, Any] = field(default_factory=dict)


class Camera(Device, ABC):
    """A camera delivering (H, W) frames in DN with a bounded exposure."""

    kind = "camera"

    def __init__(
        self,
        name: str,
        shape: tuple[int, int],
        bit_depth: int,
        exposure_range_s: tuple[float, float],
    ) -> None:
        super().__init__(name)
        self.shape = (int(shape[0]), int(shape[1]))
        self.bit_depth = int(bit_depth)
        self.exposure_range_s = (float(exposure_range_s[0]), float(exposure_range_s[1]))
        self.retry = RetryPolicy()
        self.faults = FaultInjection()
        self.retried: list[dict[str, Any]] = []  # every retry, for the run record
        self._good_frames = 0
        self._exposure_set: float | None = None
        self._injected = {"timeouts": 0, "disconnects": 0}

    @property
    def max_dn(self) -> int:
        return 2**self.bit_depth - 1

    @property
    def exposure_s(self) -> float:
        return self._get_exposure_hw()

    @exposure_s.setter
    def exposure_s(self, value: float) -> None:
        lo, hi = self.exposure_range_s
        value = float(value)
        if not (lo <= value <= hi):
            raise ValueError(f"{self.name}: exposure {value} s outside [{lo}, {hi}] s")
        self._require_open()
        self._set_exposure_hw(value)
        self._exposure_set = value

    def frame_timeout_s(self) -> float:
        """How long to wait for a frame at the current exposure: at least SNAP_TIMEOUT_S, and room
        for a long exposure. The one timeout every caller that waits for frames uses."""
        return max(SNAP_TIMEOUT_S, 2 * self.exposure_s + 1)

    def seed_noise(self, key: int) -> None:
        """Draw the next frames' noise from `key`: a simulated camera then gives a sample the same
        noise on a rerun as in an unbroken run. A real sensor's noise is its own: nothing to do."""

    def snap(self, timeout_s: float = 2.0) -> Frame:
        """Acquire one frame, each attempt within timeout_s, retrying transient faults under
        `retry`; when they run out, the last error, naming the camera and the attempts."""
        timeout_s = check_timeout(timeout_s)
        self._require_open()
        attempts, gone = 1 + self.retry.retries, False
        for attempt in range(1, attempts + 1):
            try:
                if gone:
                    self.reconnect()
                    if self._exposure_set is not None:  # a reopened camera may have reset it
                        self._set_exposure_hw(self._exposure_set)
                frame = self._snap_once(timeout_s)
                self._good_frames += 1
                return frame
            except SourceEnded:
                raise
            except DeviceError as e:
                if attempt == attempts:
                    raise type(e)(f"{e} (gave up after {attempts} attempts)") from e
                gone = isinstance(e, DeviceDisconnected)
                self._note_retry(e, attempt, attempts)
        raise AssertionError("unreachable")

    def _snap_once(self, timeout_s: float) -> Frame:
        self._inject_fault(timeout_s)
        frame = self._snap_hw(timeout_s)
        if frame.image.shape != self.shape:
            raise DeviceError(
                f"{self.name}: frame is {frame.image.shape}, expected {self.shape} (corrupt?)"
            )
        return frame

    def _inject_fault(self, timeout_s: float) -> None:
        f, done = self.faults, self._injected
        if self._good_frames < f.after_frames:
            return
        if done["timeouts"] < f.timeouts:
            done["timeouts"] += 1
            time.sleep(timeout_s if f.wait_s is None else min(f.wait_s, timeout_s))
            raise DeviceTimeout(f"{self.name}: no frame within {timeout_s} s (injected)")
        if done["disconnects"] < f.disconnects:
            done["disconnects"] += 1
            self.close()
            raise DeviceDisconnected(f"{self.name}: camera dropped off (injected)")

    def _note_retry(self, error: DeviceError, attempt: int, attempts: int) -> None:
        pause = self.retry.retry_backoff_s * 2 ** (attempt - 1)
        log.warning(
            "%s (attempt %d of %d); retrying in %.3g s", error, attempt, attempts, pause,
        )  # fmt: skip
        self.retried.append(
            {"frame": self._good_frames, "attempt": attempt, "error": type(error).__name__,
             "message": str(error)}
        )  # fmt: skip
        time.sleep(pause)

    def snapshot(self) -> dict[str, Any]:
        return (
            super().snapshot()
            | {
                "shape": list(self.shape),
                "bit_depth": self.bit_depth,
                "exposure_s": self.exposure_s if self._open else None,
                "retry": self.retry.model_dump(),
                "retries": len(self.retried),
                "retried": self.retried[:100],
            }
            | ({"injected": self.faults.model_dump()} if self.faults != FaultInjection() else {})
        )

    @abstractmethod
    def _snap_hw(self, timeout_s: float) -> Frame: ...

    @abstractmethod
    def _get_exposure_hw(self) -> float: ...

    @abstractmethod
    def _set_exposure_hw(self, exposure_s: float) -> None: ...


class LightSource(Device, ABC):
    """A light source with an on/off switch and a relative level in [0, 1]."""

    kind = "light"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._on = False
        self._level = 1.0
        self.listeners: list[Callable[[bool, float], None]] = []

    @property
    def is_on(self) -> bool:
        return self._on

    @property
    def level(self) -> float:
        return self._level

    @level.setter
    def level(self, value: float) -> None:
        value = float(value)
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"{self.name}: level must be in [0, 1], got {value}")
        self._require_open()
        self._output(self._on, value)

    def on(self) -> None:
        self._require_open()
        self._output(True, self._level)

    def off(self) -> None:
        """Switch off; safe to call on any exit path, open or not."""
        if self._open:
            self._output(False, self._level)
        self._on = False

    def _output(self, on: bool, level: float) -> None:
        self._set_output_hw(on, level)
        self._on, self._level = on, level
        for listener in self.listeners:
            listener(on, level)

    def close(self) -> None:
        try:
            self.off()
        finally:
            super().close()

    def snapshot(self) -> dict[str, Any]:
        return super().snapshot() | {"on": self._on, "level": self._level}

    @abstractmethod
    def _set_output_hw(self, on: bool, level: float) -> None: ...


class PowerMeter(Device, ABC):
    """An optical power meter: one reading in watts per call."""

    kind = "power_meter"

    def read_w(self, timeout_s: float = 2.0) -> float:
        timeout_s = check_timeout(timeout_s)
        self._require_open()
        value = float(self._read_hw(timeout_s))
        if not math.isfinite(value):
            raise DeviceError(f"{self.name}: power reading {value} is not a number")
        return value

    @abstractmethod
    def _read_hw(self, timeout_s: float) -> float: ...
