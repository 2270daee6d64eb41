"""SCPI instruments through pyvisa: an LED driver as a light source and an optical power meter.

The command set comes from the bench file, so any message-based instrument fits without code. The
level in [0, 1] of a light source maps linearly to 0..`max_current_a`; the instrument's own answer
to `state_query` and `level_query` is checked after every change, so a refused setting is an
error, not a silently wrong light. A power meter's `read_w(timeout_s)` keeps to its timeout,
retries included.

Bench-file example (a simulated pair needs no hardware: `visa_library = "sim"`)::

    [devices.light]
    backend = "visa"
    resource = "USB0::0x1313::0x80C8::M00000001::INSTR"
    visa_library = "sim"
    max_current_a = 0.5

pyvisa is imported inside the methods, so importing this module never fails on a machine
without it; the failure then surfaces when a device opens.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.protocols import BackendOptions, LightSource, PowerMeter

log = logging.getLogger("hil.drivers")

#: The simulated instruments shipped with this package (pyvisa-sim device file).
SIM_INSTRUMENTS = Path(__file__).with_name("sim_instruments.yaml")

# SCPI's "not a number" (IEEE 488.2: 9.91E37) is what meters answer when over range or unsure
_SCPI_NAN = 9.9e37


def resolve_visa_library(spec: str) -> str:
    """The pyvisa library spec to open: "sim" means this package's simulated instruments."""
    return f"{SIM_INSTRUMENTS}@sim" if spec.strip() == "sim" else spec


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class VisaOptions(BackendOptions):
    """Keys shared by every VISA instrument."""

    resource: str = Field(
        min_length=1,
        description='VISA resource, e.g. "USB0::0x1313::0x80B0::P3000001::INSTR" or '
        '"ASRL/dev/ttyUSB0::INSTR"',
    )
    visa_library: str = Field(
        "@py",
        description='pyvisa library: "@py" (pyvisa-py), "" (vendor VISA), "@sim" or '
        '"<file>.yaml@sim" (pyvisa-sim), "sim" (the simulated instruments shipped with hil)',
    )
    read_termination: str = Field("\n", description="end of every reply")
    write_termination: str = Field("\n", description="appended to every command")
    timeout_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="timeout of one VISA read or write; a timed-out query is retried `retries` "
        "times, so a query takes at most (1 + retries) · timeout_s",
    )
    retries: int = Field(
        2,
        ge=0,
        le=5,
        description="retries of a timed-out query (only queries: they are idempotent)",
    )
    idn_query: str | None = Field(
        "*IDN?", description="identification query, asked on open and recorded; null to skip"
    )


class VisaLightOptions(VisaOptions):
    on_command: str = Field("OUTP ON", description="switches the output on")
    off_command: str = Field("OUTP OFF", description="switches the output off")
    level_command: str = Field(
        "SOUR:CURR {current_a:.4f}",
        description="sets the output; a format string with {current_a} (= level · max_current_a) "
        "and/or {level} (in [0, 1])",
    )
    max_current_a: float = Field(
        gt=0,
        description="current at level 1; level 0..1 maps linearly to 0..max_current_a "
        "(no default: it protects the LED)",
    )
    state_query: str | None = Field(
        "OUTP?", description="reads back on/off (1/0 or ON/OFF) after each switch; null to skip"
    )
    level_query: str | None = Field(
        "SOUR:CURR?",
        description="reads back the current in A after each change (must agree within 1 % of "
        "max_current_a); null to skip",
    )

    @field_validator("level_command")
    @classmethod
    def _formattable(cls, value: str) -> str:
        try:
            value.format(current_a=0.0, level=0.0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"level_command {value!r} must be a format string using {{current_a}} or "
                f"{{level}}: {e!r}"
            ) from e
        return value


class VisaPowerMeterOptions(VisaOptions):
    measure_query: str = Field("MEAS:POW?", description="answers one power reading in watts")
    wavelength_nm: float | None = Field(
        None, gt=0, description="wavelength correction set on open; null leaves the meter's own"
    )
    wavelength_command: str | None = Field(
        "SENS:CORR:WAV {wavelength_nm:.1f}",
        description="sets the wavelength correction; a format string with {wavelength_nm}",
    )
    wavelength_query: str | None = Field(
        None,
        description='reads the wavelength in nm back (e.g. "SENS:CORR:WAV?"), checked on open '
        "and recorded; null to skip",
    )

    @model_validator(mode="after")
    def _wavelength_settable(self) -> VisaPowerMeterOptions:
        if self.wavelength_nm is not None:
            if not self.wavelength_command:
                raise ValueError("wavelength_nm needs a wavelength_command")
            try:
                self.wavelength_command.format(wavelength_nm=self.wavelength_nm)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"wavelength_command {self.wavelength_command!r} must be a format string "
                    f"using {{wavelength_nm}}: {e!r}"
                ) from e
        return self


class _VisaLink:
    """One VISA session: finite timeouts, typed errors, bounded retries of idempotent queries.

    The ResourceManager is shared (pyvisa keeps one per library and process), so closing a device
    closes only its own session: closing the manager would cut every other device on it.
    """

    def __init__(self, owner: str, options: VisaOptions) -> None:
        self.owner = owner
        self.options = options
        self.library = resolve_visa_library(options.visa_library)
        self.simulated = self.library.endswith("@sim")
        self._res: Any = None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.owner} ({self.options.resource})"

    def open(self) -> None:
        import pyvisa

        o = self.options
        try:
            rm = pyvisa.ResourceManager(self.library)
        except Exception as e:
            raise DeviceDisconnected(
                f"{self.owner}: cannot load VISA library {self.library!r}: {e}"
            ) from e
        try:
            res = rm.open_resource(
                o.resource,
                read_termination=o.read_termination,
                write_termination=o.write_termination,
                timeout=_ms(o.timeout_s),
                open_timeout=_ms(o.timeout_s),
            )
        except Exception as e:
            raise DeviceDisconnected(
                f"{self.owner}: cannot open VISA resource {o.resource!r}: {e}"
            ) from e
        # pyvisa-sim reports an unknown resource only in a status pyvisa does not raise on and
        # hands back VI_NULL; no VISA library ever returns that for a session that opened
        if not res.session:
            raise DeviceDisconnected(f"{self.owner}: VISA resource {o.resource!r} not found")
        if not hasattr(res, "query"):
            res.close()
            raise DeviceError(f"{self.where}: not a message-based (SCPI) resource")
        self._res = res

    def close(self) -> None:
        res, self._res = self._res, None
        if res is not None:
            try:
                res.close()
            except Exception as e:  # a device that is gone cannot be closed; nothing to do
                log.debug("%s: closing the VISA session failed: %s", self.where, e)

    def _typed(self, e: Exception, what: str, timeout_s: float) -> DeviceError:
        import pyvisa
        from pyvisa.constants import StatusCode

        if isinstance(e, DeviceError):
            return e
        if isinstance(e, pyvisa.errors.VisaIOError):
            if e.error_code == StatusCode.error_timeout:
                return DeviceTimeout(f"{self.where}: no reply to {what!r} within {timeout_s:g} s")
            gone = (
                StatusCode.error_resource_not_found,
                StatusCode.error_connection_lost,
                StatusCode.error_invalid_object,
                StatusCode.error_no_listeners,
                StatusCode.error_io,
            )
            if e.error_code in gone:
                return DeviceDisconnected(f"{self.where}: lost during {what!r}: {e.description}")
            return DeviceError(f"{self.where}: {what!r} failed: {e}")
        if isinstance(e, (pyvisa.errors.InvalidSession, OSError)):
            return DeviceDisconnected(f"{self.where}: lost during {what!r}: {e}")
        return DeviceError(f"{self.where}: {what!r} failed: {type(e).__name__}: {e}")

    def _session(self) -> Any:
        if self._res is None:
            raise DeviceDisconnected(f"{self.where} is not open")
        return self._res

    def write(self, command: str) -> None:
        """Send a command; never retried, since a command need not be idempotent."""
        res = self._session()
        try:
            with self._lock:
                res.timeout = _ms(self.options.timeout_s)
                res.write(command)
        except Exception as e:
            raise self._typed(e, command, self.options.timeout_s) from e

    def query(self, query: str, deadline: float | None = None) -> str:
        """Ask an idempotent query, retrying timeouts; `deadline` (monotonic) caps all attempts."""
        res = self._session()
        attempts = 1 + self.options.retries
        attempt = 0
        while True:
            attempt += 1
            t = self.options.timeout_s
            if deadline is not None:
                t = min(t, deadline - time.monotonic())
                if t <= 0:
                    raise DeviceTimeout(f"{self.where}: no reply to {query!r} before the deadline")
            try:
                with self._lock:
                    res.timeout = _ms(t)
                    return res.query(query).strip()
            except Exception as e:
                err = self._typed(e, query, t)
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if not isinstance(err, DeviceTimeout) or attempt == attempts or out_of_time:
                    if isinstance(err, DeviceTimeout) and attempt > 1:
                        err = DeviceTimeout(f"{err} ({attempt} attempts)")
                    raise err from e
            log.warning(
                "%s: no reply to %r within %.3g s (attempt %d of %d); retrying",
                self.where,
                query,
                t,
                attempt,
                attempts,
            )
            self._clear()

    def _clear(self) -> None:
        """Best-effort device clear, so a late reply is not taken for the retry's."""
        try:
            with self._lock:
                self._res.clear()
        except Exception as e:  # pyvisa-sim and some interfaces do not implement it
            log.debug("%s: device clear failed: %s", self.where, e)

    def number(self, query: str, deadline: float | None = None) -> float:
        """A query whose reply must be a finite number; anything else quotes the reply."""
        reply = self.query(query, deadline)
        try:
            value = float(reply)
        except ValueError:
            raise DeviceError(f"{self.where}: {query!r} answered {reply!r}, not a number") from None
        if not math.isfinite(value) or abs(value) >= _SCPI_NAN:
            raise DeviceError(
                f"{self.where}: {query!r} answered {reply!r} (SCPI not-a-number: over range?)"
            )
        return value

    def identify(self) -> str | None:
        q = self.options.idn_query
        if not q:
            return None
        reply = self.query(q)
        if not reply:
            raise DeviceError(f"{self.where}: empty answer to {q!r}")
        return reply


def _parse_on(reply: str, where: str, query: str) -> bool:
    word = reply.strip().upper()
    if word in ("ON", "1", "+1"):
        return True
    if word in ("OFF", "0", "+0"):
        return False
    raise DeviceError(f"{where}: {query!r} answered {reply!r}, not on/off")


class VisaLightSource(LightSource):
    """An LED driver or any SCPI current source: on/off plus a current for the level."""

    backend = "visa"
    Options = VisaLightOptions

    def __init__(self, name: str, options: VisaLightOptions) -> None:
        super().__init__(name)
        self.options = options
        self._link = _VisaLink(f"{self.kind} {name!r}", options)
        self.simulated = self._link.simulated
        self._idn: str | None = None
        self._level_sent: str | None = None  # the last level command the instrument took

    def _open_hw(self) -> None:
        self._link.open()
        try:
            self._idn = self._link.identify()
            self._level_sent = None
            self._adopt_instrument_state()
        except BaseException:
            self._link.close()
            raise

    def _adopt_instrument_state(self) -> None:
        """Start from what the instrument does, not from what this object assumed."""
        o = self.options
        if o.state_query:
            self._on = _parse_on(self._link.query(o.state_query), self._link.where, o.state_query)
        if o.level_query:
            current = self._link.number(o.level_query)
            if not (-1e-9 <= current <= o.max_current_a * 1.000001):
                log.warning(
                    "%s: found at %g A, outside 0..max_current_a = %g A",
                    self._link.where,
                    current,
                    o.max_current_a,
                )
            self._level = min(max(current / o.max_current_a, 0.0), 1.0)

    def _close_hw(self) -> None:
        self._link.close()

    def _set_output_hw(self, on: bool, level: float) -> None:
        o = self.options
        current = level * o.max_current_a
        level_command = o.level_command.format(current_a=current, level=level)
        try:
            if not on:  # off first: never a flash at the new level
                self._link.write(o.off_command)
            if level_command != self._level_sent:
                self._link.write(level_command)
                self._level_sent = level_command
            if on:
                self._link.write(o.on_command)
            self._verify(on, current)
        except BaseException:
            self._level_sent = None  # unknown now: send it again next time
            raise

    def _verify(self, on: bool, current: float) -> None:
        o, where = self.options, self._link.where
        if o.state_query:
            reply = self._link.query(o.state_query)
            if _parse_on(reply, where, o.state_query) != on:
                raise DeviceError(
                    f"{where}: switched {'on' if on else 'off'}, but {o.state_query!r} "
                    f"answers {reply!r}"
                )
        if o.level_query:
            got = self._link.number(o.level_query)
            if abs(got - current) > 0.01 * o.max_current_a:
                raise DeviceError(
                    f"{where}: set {current:.6g} A, but {o.level_query!r} answers {got:.6g} A "
                    "(setting refused or out of the instrument's range?)"
                )

    def snapshot(self) -> dict[str, Any]:
        return super().snapshot() | {
            "resource": self.options.resource,
            "visa_library": self._link.library,
            "idn": self._idn,
            "max_current_a": self.options.max_current_a,
            "current_a": self._level * self.options.max_current_a,
        }


class VisaPowerMeter(PowerMeter):
    """An optical power meter answering one reading in watts per query."""

    backend = "visa"
    Options = VisaPowerMeterOptions

    def __init__(self, name: str, options: VisaPowerMeterOptions) -> None:
        super().__init__(name)
        self.options = options
        self._link = _VisaLink(f"{self.kind} {name!r}", options)
        self.simulated = self._link.simulated
        self._idn: str | None = None
        self._wavelength_nm: float | None = options.wavelength_nm

    def _open_hw(self) -> None:
        self._link.open()
        try:
            self._idn = self._link.identify()
            self._configure()
        except BaseException:
            self._link.close()
            raise

    def _configure(self) -> None:
        o = self.options
        if o.wavelength_nm is not None:
            self._link.write(o.wavelength_command.format(wavelength_nm=o.wavelength_nm))
        if o.wavelength_query:
            self._wavelength_nm = self._link.number(o.wavelength_query)
            if o.wavelength_nm is not None and abs(self._wavelength_nm - o.wavelength_nm) > 0.5:
                raise DeviceError(
                    f"{self._link.where}: wavelength set to {o.wavelength_nm:g} nm, but "
                    f"{o.wavelength_query!r} answers {self._wavelength_nm:g} nm"
                )

    def _close_hw(self) -> None:
        self._link.close()

    def _read_hw(self, timeout_s: float) -> float:
        # the caller's timeout bounds the whole reading, retries included
        return self._link.number(self.options.measure_query, time.monotonic() + timeout_s)

    def snapshot(self) -> dict[str, Any]:
        return super().snapshot() | {
            "resource": self.options.resource,
            "visa_library": self._link.library,
            "idn": self._idn,
            "measure_query": self.options.measure_query,
            "wavelength_nm": self._wavelength_nm,
        }
