"""Simulated bench devices: the driver protocols implemented on one `SimWorld`.

They can misbehave on request (`inject`) so that callers' handling of timeouts, disconnects and
corrupt frames is tested against the same code paths real devices take.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import Field

from drivers.errors import DeviceDisconnected, DeviceTimeout
from drivers.protocols import BackendOptions, Camera, Display, Frame, LightSource, PowerMeter
from sim.clock import RealClock
from sim.world import SimWorld


class SimDisplay(Display):
    backend = "sim"
    simulated = True

    def __init__(self, world: SimWorld, name: str = "sim-display") -> None:
        super().__init__(name, world.display_shape, world.params.display.bit_depth)
        self.world = world

    @classmethod
    def from_options(cls, name: str, options: BackendOptions, context: Any) -> SimDisplay:
        return cls(context.sim_world(), name)

    def _show_hw(self, levels) -> None:
        self.world.show(levels)


class SimCamera(Camera):
    """Frames arrive no faster than max(exposure, 1 / fps_limit) apart, on the world's clock.

    A frame sees the scene as it was when its exposure began. In real time it is rendered on the
    camera's own thread during the exposure, as a real sensor integrates while the host waits,
    so rendering does not slow the caller below the frame-rate limit.
    """

    backend = "sim"
    simulated = True

    def __init__(self, world: SimWorld, name: str = "sim-camera") -> None:
        sp = world.params.sensor
        super().__init__(name, world.frame_shape, sp.bit_depth, (1e-6, 60.0))
        self.world = world
        self._exposure_s = sp.exposure_s
        self._next_start = -float("inf")
        self._frame_id = 0
        self._renderer: ThreadPoolExecutor | None = None
        self.inject()

    @classmethod
    def from_options(cls, name: str, options: BackendOptions, context: Any) -> SimCamera:
        return cls(context.sim_world(), name)

    def seed_noise(self, key: int) -> None:
        self.world.seed_noise(key)

    def inject(
        self, stall: bool = False, timeouts: int = 0, disconnect: bool = False, corrupt: int = 0
    ) -> None:
        """Misbehave: never deliver (`stall`), time out the next `timeouts` snaps, be unplugged
        until `reconnect()`, or deliver `corrupt` truncated frames. No arguments: behave."""
        self._stall, self._timeouts = stall, timeouts
        self._unplugged, self._corrupt = disconnect, corrupt

    @property
    def frame_period_s(self) -> float:
        return max(self._exposure_s, 1.0 / self.world.params.sensor.fps_limit)

    def _open_hw(self) -> None:
        self._unplugged = False

    def _close_hw(self) -> None:
        if self._renderer is not None:
            self._renderer.shutdown()
            self._renderer = None

    def _expose(self, wait_s: float) -> np.ndarray:
        """Wait out the exposure and return its frame, rendered meanwhile when time is real."""
        clock = self.world.clock
        if not isinstance(clock, RealClock) or wait_s <= 0:
            clock.sleep(wait_s)
            return self.world.capture(self._exposure_s)
        if self._renderer is None:
            self._renderer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-render")
        image = self._renderer.submit(self.world.capture, self._exposure_s)
        clock.sleep(wait_s)
        return image.result()

    def _get_exposure_hw(self) -> float:
        return self._exposure_s

    def _set_exposure_hw(self, exposure_s: float) -> None:
        self._exposure_s = exposure_s

    def _snap_hw(self, timeout_s: float) -> Frame:
        clock = self.world.clock
        if self._unplugged:
            raise DeviceDisconnected(f"{self.name}: camera unplugged")
        now = clock.now()
        start = max(now, self._next_start)
        if self._stall or self._timeouts or start + self._exposure_s - now > timeout_s:
            self._timeouts = max(0, self._timeouts - 1)
            clock.sleep(timeout_s)
            raise DeviceTimeout(f"{self.name}: no frame within {timeout_s} s")
        image = self._expose(start + self._exposure_s - now)
        if self._corrupt:
            self._corrupt -= 1
            image = image[: image.shape[0] // 2]
        self._next_start = start + self.frame_period_s
        self._frame_id += 1
        saturated = float((image >= self.max_dn).mean())
        meta = {"saturated_fraction": saturated}
        return Frame(image, clock.now(), self._exposure_s, self._frame_id, True, meta)


class SimLightSource(LightSource):
    """A source in the simulated display's illumination path (laser, backlight, shutter)."""

    backend = "sim"
    simulated = True

    def __init__(self, world: SimWorld, name: str = "sim-light") -> None:
        super().__init__(name)
        self.world = world

    @classmethod
    def from_options(cls, name: str, options: BackendOptions, context: Any) -> SimLightSource:
        return cls(context.sim_world(), name)

    def _open_hw(self) -> None:
        self.world.set_source(self.name, False, self.level)

    def _set_output_hw(self, on: bool, level: float) -> None:
        self.world.set_source(self.name, on, level)


class SimPowerMeterOptions(BackendOptions):
    full_scale_w: float = Field(1e-3, gt=0, description="power of a white field at full light")
    noise: float = Field(1e-3, ge=0, description="relative noise of a reading")


class SimPowerMeter(PowerMeter):
    """Measures the light leaving the simulated display."""

    backend = "sim"
    simulated = True
    Options = SimPowerMeterOptions

    def __init__(
        self, world: SimWorld, name: str = "sim-power-meter", options: SimPowerMeterOptions = None
    ) -> None:
        super().__init__(name)
        self.world, self.options = world, options or SimPowerMeterOptions()
        self._rng = np.random.default_rng(world.params.fabrication.seed)

    @classmethod
    def from_options(cls, name: str, options: BackendOptions, context: Any) -> SimPowerMeter:
        return cls(context.sim_world(), name, options)

    def _read_hw(self, timeout_s: float) -> float:
        power = self.world.display_power() * self.options.full_scale_w
        return max(0.0, power * (1 + self.options.noise * self._rng.standard_normal()))
