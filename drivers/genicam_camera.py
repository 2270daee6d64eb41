"""A GenICam camera through `harvesters` and a GenTL producer (.cti) from the camera's vendor.

With no producer given, the simulated producer shipped in the installed `genicam` wheel is used
(genicam 1.4.0: `TLSimu.cti`, two mono and two colour test-pattern devices with a software
trigger and no exposure node; genicam 1.6: `viky.cti`, free-running only). Frames from it are
flagged `simulated` everywhere, so a run record can never pass them off as light.

Frames are (H, W) integer DN: Mono8/10/12/16 as delivered (uint8 or uint16), RGB8/BGR8/RGBa8/BGRa8
reduced to BT.601 luma (uint8), because every Camera frame in this project is single-channel.

`harvesters` is imported only when a camera opens, so importing this module is cheap and never
fails on a machine without GenICam.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.protocols import BackendOptions, Camera, Frame

log = logging.getLogger("hil.drivers.genicam")

#: producers known to be simulators (file names as shipped in the genicam wheels)
SIMULATED_PRODUCERS = ("TLSimu.cti", "viky.cti")
_SIMULATED_DEVICE = re.compile(r"simu|viky|virtual|emulat", re.IGNORECASE)

#: pixel formats this driver decodes: name -> (bit depth, channel order or None for mono)
PIXEL_FORMATS: dict[str, tuple[int, str | None]] = {
    "Mono8": (8, None),
    "Mono10": (10, None),
    "Mono12": (12, None),
    "Mono16": (16, None),
    "RGB8": (8, "RGB"),
    "BGR8": (8, "BGR"),
    "RGBa8": (8, "RGBA"),
    "BGRa8": (8, "BGRA"),
}

#: ITU-R BT.601 luma weights in thousandths (as OpenCV's RGB2GRAY), applied in exact integers
LUMA_WEIGHTS_PERMILLE = {"R": 299, "G": 587, "B": 114}

PixelFormat = Literal["Mono8", "Mono10", "Mono12", "Mono16", "RGB8", "BGR8", "RGBa8", "BGRa8"]

_DRAIN_POLL_S = 0.001


def find_simulated_producer() -> Path | None:
    """The simulated .cti shipped inside the installed `genicam` package, without importing it."""
    try:
        spec = importlib.util.find_spec("genicam")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.cti"))
        if found:
            return found[0]
    return None


def to_mono(data: np.ndarray, pixel_format: str, height: int, width: int) -> np.ndarray:
    """Decode one buffer's pixel data into a new (H, W) integer frame.

    Mono10/12 are the unpacked PFNC formats (LSB-aligned in 16 bits); a value above the declared
    bit depth means the data is not what the camera claims, so it is refused, not masked.
    Colour formats become BT.601 luma, rounded half up in exact integer arithmetic.
    """
    if pixel_format not in PIXEL_FORMATS:
        raise DeviceError(
            f"unsupported pixel format {pixel_format!r} (supported: {', '.join(PIXEL_FORMATS)})"
        )
    bits, order = PIXEL_FORMATS[pixel_format]
    raw = np.ascontiguousarray(np.asarray(data)).reshape(-1)
    if bits > 8:
        if raw.dtype.itemsize == 1:
            raw = raw.view("<u2")
        raw = raw.astype(np.uint16, copy=False)
    else:
        raw = raw.view(np.uint8) if raw.dtype.itemsize == 1 else raw.astype(np.uint8)
    channels = 1 if order is None else len(order)
    if raw.size != height * width * channels:
        raise DeviceError(
            f"{pixel_format} buffer holds {raw.size} values, expected {height}x{width}x{channels}"
            " (incomplete or mis-described buffer)"
        )
    if order is None:
        image = np.array(raw.reshape(height, width), copy=True)
        if bits not in (8, 16) and int(image.max(initial=0)) > 2**bits - 1:
            raise DeviceError(
                f"{pixel_format} frame has values above {2**bits - 1} (MSB-aligned or packed data?)"
            )
        return image
    pixels = raw.reshape(height, width, channels).astype(np.uint32)
    luma = sum(LUMA_WEIGHTS_PERMILLE[c] * pixels[..., i] for i, c in enumerate(order) if c in "RGB")
    return ((luma + 500) // 1000).astype(np.uint8)


class _ExposureNode:
    """The camera's exposure feature: `ExposureTime` (SFNC) or `ExposureTimeAbs`, both in µs."""

    NAMES = ("ExposureTime", "ExposureTimeAbs")

    def __init__(self, name: str, node: Any) -> None:
        self.name = name
        self.node = node

    @classmethod
    def find(cls, node_map: Any) -> _ExposureNode | None:
        for name in cls.NAMES:
            node = _node(node_map, name)
            if node is not None:
                return cls(name, node)
        return None

    def get_s(self) -> float:
        return float(self.node.value) * 1e-6

    def set_s(self, exposure_s: float) -> float:
        """Write the exposure and return what the camera actually took (it may round)."""
        self.node.value = float(exposure_s) * 1e6
        return self.get_s()

    def range_s(self) -> tuple[float, float]:
        return float(self.node.min) * 1e-6, float(self.node.max) * 1e-6


def _node(node_map: Any, name: str) -> Any | None:
    """A feature node of the node map, or None if the device does not have it."""
    try:
        if not node_map.has_node(name):
            return None
        return getattr(node_map, name)
    except Exception:
        return None


def _set_node(node_map: Any, name: str, value: Any) -> None:
    node = _node(node_map, name)
    if node is None:
        raise DeviceError(f"device has no {name} node")
    try:
        node.value = value
    except Exception as e:
        raise DeviceError(f"cannot set {name} = {value!r}: {e}") from e


def _try_set_enum(node_map: Any, name: str, value: str) -> bool:
    """Set an optional enumeration if the device has it and offers the value."""
    node = _node(node_map, name)
    if node is None:
        return False
    try:
        if str(node.value) == value:
            return True
        if value not in tuple(node.symbolics):
            return False
        node.value = value
        return True
    except Exception as e:
        log.warning("cannot set %s = %s: %s", name, value, e)
        return False


@dataclass
class _Producer:
    harvester: Any
    users: int = 0


class _Producers:
    """One Harvester per producer file in this process, shared by every camera on it.

    A GenTL producer initialises once per process: a second Harvester on the same .cti sees no
    devices. And `Harvester.update()` invalidates every acquirer already made, so the device list
    is enumerated only when the first camera on a producer opens.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, _Producer] = {}

    def acquire(self, key: str, enumeration_timeout_s: float) -> tuple[Any, bool]:
        """The producer's Harvester, and whether other cameras already hold it (stale list)."""
        from harvesters.core import Harvester

        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                harvester = Harvester()
                try:
                    harvester.timeout_for_update = max(1, int(enumeration_timeout_s * 1000))
                    harvester.add_file(key, check_existence=True, check_validity=True)
                    harvester.update()
                except Exception as e:
                    harvester.reset()
                    raise DeviceError(f"cannot load GenTL producer {key}: {e}") from e
                entry = self._open[key] = _Producer(harvester)
            entry.users += 1
            return entry.harvester, entry.users > 1

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry.users -= 1
            if entry.users <= 0:
                del self._open[key]
                entry.harvester.reset()


_PRODUCERS = _Producers()


class GenICamCamera(Camera):
    """Any GenICam (GigE Vision, USB3 Vision, ...) camera whose vendor ships a GenTL producer.

    `shape`, `bit_depth` and `exposure_range_s` are read from the device when it opens and kept
    after it closes; before the first open they are placeholders ((0, 0), the option's pixel
    format depth, the fixed exposure). A device without an exposure node (both simulated
    producers) reports the fixed `fixed_exposure_s`, and its range collapses to that value, so the
    protocol still works and the recorded exposure says where it came from.
    """

    backend = "genicam"

    class Options(BackendOptions):
        """The bench-file keys of a GenICam camera."""

        producer: str | None = Field(
            None,
            description="path to the vendor's GenTL producer (.cti); default: the simulated "
            "producer shipped in the installed genicam package (frames flagged simulated)",
        )
        serial: str | None = Field(
            None, description="select the device by serial number (as the producer lists it)"
        )
        index: int = Field(
            0, ge=0, description="select the device by its position in the producer's list"
        )
        pixel_format: PixelFormat | None = Field(
            None,
            description="PixelFormat to set at open; colour formats are reduced to luma; "
            "default: keep the device's",
        )
        trigger: Literal["software", "free_run"] = Field(
            "software",
            description="software: each snap fires TriggerSoftware and returns that frame; "
            "free_run: each snap drops queued frames and returns the next one",
        )
        fixed_exposure_s: float = Field(
            0.01,
            gt=0,
            le=600,
            description="exposure recorded for a device with no exposure node (e.g. the "
            "simulated producers); it cannot be changed there",
        )

    def __init__(self, name: str, options: GenICamCamera.Options | None = None) -> None:
        self.options = options if options is not None else self.Options()
        bits = PIXEL_FORMATS[self.options.pixel_format or "Mono8"][0]
        fixed = self.options.fixed_exposure_s
        super().__init__(name, (0, 0), bits, (fixed, fixed))
        if self.options.producer is not None:
            self.producer: Path | None = Path(self.options.producer).expanduser()
        else:
            self.producer = find_simulated_producer()
        self.simulated = self.options.producer is None or (
            self.producer is not None
            and bool({self.producer.name, self.producer.resolve().name} & set(SIMULATED_PRODUCERS))
        )
        self.pixel_format: str | None = self.options.pixel_format
        self.device_info: dict[str, str] = {}
        self.has_gain = False
        self._ia: Any = None
        self._producer_key: str | None = None
        self._exposure: _ExposureNode | None = None
        self._exposure_cache_s = fixed
        self._last_frame_id: int | None = None

    # --- life cycle -------------------------------------------------------------------------

    def _open_hw(self) -> None:
        if self.producer is None:
            raise DeviceError(
                f"camera {self.name!r}: no producer given and no simulated *.cti found in the "
                "installed genicam package (genicam 1.5.x ships none); set `producer`"
            )
        if not self.producer.is_file():
            raise DeviceError(f"camera {self.name!r}: GenTL producer {self.producer} not found")
        key = str(self.producer.resolve())
        harvester, shared = _PRODUCERS.acquire(key, self.options.timeout_s)
        self._producer_key = key
        try:
            index = self._pick_device(harvester, shared)
            try:
                self._ia = harvester.create(index)
            except Exception as e:
                raise DeviceError(
                    f"camera {self.name!r}: cannot open {self.device_info.get('serial')}: "
                    f"{type(e).__name__}: {e} (already open elsewhere?)"
                ) from e
            self._configure(self._ia.remote_device.node_map)
            try:
                self._ia.start()
            except Exception as e:
                raise DeviceError(f"camera {self.name!r}: cannot start acquisition: {e}") from e
        except BaseException:
            self._release()
            raise
        self._last_frame_id = None

    def _pick_device(self, harvester: Any, shared: bool) -> int:
        infos = list(harvester.device_info_list)
        listed = [f"{_info(d, 'serial_number')} ({_info(d, 'model')})" for d in infos] or ["none"]
        if shared:  # re-enumerating would break the other cameras' acquirers
            listed.append("(listed when the first camera on this producer opened)")
        if self.options.serial is not None:
            matches = [
                i for i, d in enumerate(infos) if _info(d, "serial_number") == self.options.serial
            ]
            if not matches:
                raise DeviceDisconnected(
                    f"camera {self.name!r}: no device with serial {self.options.serial!r} on "
                    f"{self.producer}; available: {', '.join(listed)}"
                )
            index = matches[0]
        else:
            index = self.options.index
            if index >= len(infos):
                raise DeviceDisconnected(
                    f"camera {self.name!r}: no device #{index} on {self.producer}; "
                    f"available: {', '.join(listed)}"
                )
        d = infos[index]
        self.device_info = {
            key: _info(d, attr)
            for key, attr in (("model", "model"), ("serial", "serial_number"), ("vendor", "vendor"))
        }
        described = " ".join(self.device_info.values()) + " " + _info(d, "display_name")
        if _SIMULATED_DEVICE.search(described):
            self.simulated = True
        return index

    def _configure(self, nm: Any) -> None:
        """Set pixel format and trigger before streaming (they lock once acquisition starts)."""
        if self.options.pixel_format is not None:
            _set_node(nm, "PixelFormat", self.options.pixel_format)
        pf_node = _node(nm, "PixelFormat")
        pixel_format = str(pf_node.value) if pf_node is not None else "Mono8"
        if pixel_format not in PIXEL_FORMATS:
            raise DeviceError(
                f"camera {self.name!r}: device pixel format {pixel_format!r} is not supported "
                f"(supported: {', '.join(PIXEL_FORMATS)}); set `pixel_format`"
            )
        self.pixel_format = pixel_format
        self.bit_depth = PIXEL_FORMATS[pixel_format][0]
        try:
            self.shape = (int(nm.Height.value), int(nm.Width.value))
        except Exception as e:
            raise DeviceError(f"camera {self.name!r}: cannot read Height/Width: {e}") from e

        _try_set_enum(nm, "AcquisitionMode", "Continuous")
        _try_set_enum(nm, "TriggerSelector", "FrameStart")
        if self.options.trigger == "software":
            if _node(nm, "TriggerSoftware") is None or _node(nm, "TriggerMode") is None:
                raise DeviceError(
                    f"camera {self.name!r}: device has no software trigger "
                    "(TriggerMode/TriggerSoftware); use trigger = 'free_run'"
                )
            _set_node(nm, "TriggerSource", "Software")
            _set_node(nm, "TriggerMode", "On")
        elif _node(nm, "TriggerMode") is not None:
            _set_node(nm, "TriggerMode", "Off")

        # automatic exposure or gain would make DN depend on the scene, not on the light level
        _try_set_enum(nm, "ExposureAuto", "Off")
        _try_set_enum(nm, "GainAuto", "Off")
        self._exposure = _ExposureNode.find(nm)
        if self._exposure is not None:
            self._exposure_cache_s = self._exposure.get_s()
            self.exposure_range_s = self._exposure.range_s()
        else:
            fixed = self.options.fixed_exposure_s
            log.warning(
                "camera %r has no exposure node; recording the fixed exposure %g s",
                self.name,
                fixed,
            )
            self._exposure_cache_s = fixed
            self.exposure_range_s = (fixed, fixed)
        self.has_gain = _node(nm, "Gain") is not None

    def _close_hw(self) -> None:
        errors = self._release()
        if errors:
            raise DeviceError(f"camera {self.name!r}: close: {'; '.join(errors)}")

    def _release(self) -> list[str]:
        """Stop, destroy the acquirer, release the producer; every step runs even if one fails."""
        errors: list[str] = []
        ia, self._ia = self._ia, None
        if ia is not None:
            for step in ("stop", "destroy"):
                try:
                    getattr(ia, step)()
                except Exception as e:
                    errors.append(f"{step}: {e}")
        key, self._producer_key = self._producer_key, None
        if key is not None:
            try:
                _PRODUCERS.release(key)
            except Exception as e:
                errors.append(f"release producer: {e}")
        for error in errors:
            log.warning("camera %r: %s", self.name, error)
        return errors

    # --- acquisition ------------------------------------------------------------------------

    def _fire_trigger(self) -> None:
        """Fire the software trigger (tests replace it to make a frame that never arrives)."""
        try:
            self._ia.remote_device.node_map.TriggerSoftware.execute()
        except Exception as e:
            raise DeviceError(f"camera {self.name!r}: TriggerSoftware failed: {e}") from e

    def _drain(self, deadline: float) -> None:
        """Requeue frames already waiting, so the snap returns one taken after it was asked for."""
        for _ in range(int(getattr(self._ia, "num_buffers", 16)) + 1):
            if time.monotonic() >= deadline:
                return
            buffer = self._try_fetch(_DRAIN_POLL_S)
            if buffer is None:
                return
            buffer.queue()

    def _try_fetch(self, timeout_s: float) -> Any:
        try:
            buffer = self._ia.try_fetch(timeout=max(timeout_s, 1e-6))
        except Exception as e:
            raise DeviceError(f"camera {self.name!r}: fetch failed: {e}") from e
        if isinstance(buffer, list):  # several streams: the first is the image
            for extra in buffer[1:]:
                if extra is not None:
                    extra.queue()
            buffer = buffer[0]
        return buffer

    def _snap_hw(self, timeout_s: float) -> Frame:
        # try_fetch in a loop rather than fetch(): fetch restarts its timeout after every
        # incomplete buffer, so only our own deadline bounds the whole call.
        deadline = time.monotonic() + timeout_s
        self._drain(deadline)
        if self.options.trigger == "software":
            self._fire_trigger()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceTimeout(
                    f"camera {self.name!r}: no frame within {timeout_s} s "
                    f"(trigger: {self.options.trigger})"
                )
            buffer = self._try_fetch(remaining)
            if buffer is not None:
                break
        # host clock, not the device's: a device clock is not the bench's (display, light) and
        # may wrap (TLSimu's restarts every second) or reset on reconnect; it goes in meta
        host_s = time.monotonic()
        with buffer:  # the buffer goes back to the producer on exit: copy everything out first
            try:
                component = buffer.payload.components[0]
                data = np.array(component.data, copy=True)
                pixel_format = str(component.data_format)
                height, width = int(component.height), int(component.width)
            except (IndexError, AttributeError, TypeError) as e:
                raise DeviceError(f"camera {self.name!r}: buffer has no image: {e}") from e
            device_ts = _optional(lambda: buffer.timestamp / buffer.timestamp_frequency)
            device_id = _optional(lambda: int(buffer.frame_id))
        if pixel_format != self.pixel_format:
            raise DeviceError(
                f"camera {self.name!r}: device delivered {pixel_format} but declares "
                f"{self.pixel_format} (the producer ignored PixelFormat?)"
            )
        image = to_mono(data, pixel_format, height, width)

        last = self._last_frame_id
        if device_id is not None and (last is None or device_id > last):
            frame_id = device_id
        else:  # no id from the producer, or one that went backwards: count on from the last
            frame_id = 0 if last is None else last + 1
        self._last_frame_id = frame_id
        return Frame(
            image=image,
            timestamp_s=host_s,
            exposure_s=self._exposure_cache_s,
            frame_id=int(frame_id),
            simulated=self.simulated,
            meta={
                "pixel_format": pixel_format,
                "device_frame_id": device_id,
                "device_timestamp_s": device_ts,
                "exposure_source": self._exposure.name if self._exposure else "fixed_exposure_s",
                "trigger": self.options.trigger,
                **{f"device_{k}": v for k, v in self.device_info.items()},
            },
        )

    # --- exposure and gain ------------------------------------------------------------------

    def _get_exposure_hw(self) -> float:
        if self._open and self._exposure is not None:
            try:
                self._exposure_cache_s = self._exposure.get_s()
            except Exception as e:
                raise DeviceError(f"camera {self.name!r}: cannot read exposure: {e}") from e
        return self._exposure_cache_s

    def _set_exposure_hw(self, exposure_s: float) -> None:
        if self._exposure is None:
            return  # the range is collapsed to the fixed value, so this is that value
        try:
            self._exposure_cache_s = self._exposure.set_s(exposure_s)
        except Exception as e:
            raise DeviceError(f"camera {self.name!r}: cannot set exposure: {e}") from e

    def _gain_node(self) -> Any:
        self._require_open()
        node = _node(self._ia.remote_device.node_map, "Gain")
        if node is None:
            raise DeviceError(f"camera {self.name!r} has no Gain node")
        return node

    @property
    def gain(self) -> float:
        """Analog gain in the device's unit (dB in SFNC); only for devices with a Gain node."""
        return float(self._gain_node().value)

    @gain.setter
    def gain(self, value: float) -> None:
        node = self._gain_node()
        value = float(value)
        lo, hi = float(node.min), float(node.max)
        if not (lo <= value <= hi):
            raise ValueError(f"{self.name}: gain {value} outside [{lo}, {hi}]")
        try:
            node.value = value
        except Exception as e:
            raise DeviceError(f"camera {self.name!r}: cannot set gain: {e}") from e

    def snapshot(self) -> dict[str, Any]:
        snap = super().snapshot() | {
            "producer": str(self.producer) if self.producer else None,
            "device": dict(self.device_info),
            "pixel_format": self.pixel_format,
            "trigger": self.options.trigger,
            "exposure_range_s": list(self.exposure_range_s),
            "exposure_node": self._exposure.name if self._exposure else None,
        }
        if self._open and self.has_gain:
            snap["gain"] = _optional(lambda: self.gain)
        return snap


def _info(device_info: Any, attr: str) -> str:
    value = _optional(lambda: getattr(device_info, attr))
    return "" if value is None else str(value)


def _optional(read: Any) -> Any:
    """A value the producer may not provide: None instead of an exception."""
    try:
        return read()
    except Exception:
        return None
