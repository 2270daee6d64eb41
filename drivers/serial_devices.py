"""Shutters and LED/SLM controllers speaking line-based ASCII over a serial port (pyserial URLs).

The command map comes from the bench file. Every exchange is one command line, then (optionally)
the device's echo of it, then (optionally) one reply line: the acknowledgement of a set command or
the answer to a query. Reads run against a finite deadline and a line without its terminator is a
timeout, since pyserial hands back partial data rather than raising.

Bench-file example::

    [devices.light]
    backend = "serial"
    url = "/dev/ttyUSB0"          # or "loop://", "socket://host:port", "rfc2217://..."
    on_command = "OPEN"
    off_command = "CLOSE"
    state_query = "STATE?"
    ack = "OK"

`ShutterEmulator` answers like such a controller over a pseudo-terminal, for tests and demos
without hardware. A device reports `simulated = True` when its URL is `loop://` or the port of an
emulator running in this process (both are in its snapshot), False for every other port.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.protocols import BackendOptions, LightSource

log = logging.getLogger("hil.drivers")

#: Longest single wait inside a read, so a call's deadline is kept to within this.
POLL_S = 0.05

#: Ports served by a running ShutterEmulator in this process.
_EMULATED_PORTS: set[str] = set()


def _port_errors() -> tuple[type[BaseException], ...]:
    """What a port raises when its device is gone (termios.error is no OSError, on POSIX)."""
    import serial

    try:
        import termios
    except ImportError:  # Windows
        return (serial.SerialException, OSError)
    return (serial.SerialException, OSError, termios.error)


def is_simulated_url(url: str) -> bool:
    """True for pyserial's loopback and for ports served by a ShutterEmulator of this process."""
    return url.startswith("loop://") or url in _EMULATED_PORTS


class SerialLightOptions(BackendOptions):
    url: str = Field(
        min_length=1,
        description='pyserial port or URL: "/dev/ttyUSB0", "COM3", "loop://", "socket://host:port"',
    )
    baudrate: int = Field(9600, gt=0, description="bits per second")
    bytesize: Literal[5, 6, 7, 8] = Field(8, description="data bits")
    parity: Literal["N", "E", "O", "M", "S"] = Field("N", description="parity: N, E, O, M or S")
    stopbits: Literal[1, 1.5, 2] = Field(1, description="stop bits")
    timeout_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="deadline of one exchange (write, echo, reply); a timed-out query is retried "
        "`retries` times",
    )
    retries: int = Field(
        2, ge=0, le=5, description="retries of a timed-out state query (set commands: never)"
    )
    write_termination: str = Field("\r", description="appended to every command")
    read_termination: str = Field("\r", min_length=1, description="ends every reply line")
    encoding: str = Field("ascii", description="text encoding of commands and replies")
    on_command: str = Field("OPEN", min_length=1, description="opens the shutter / lights up")
    off_command: str = Field("CLOSE", min_length=1, description="closes the shutter / goes dark")
    level_command: str | None = Field(
        None,
        description='sets the level, a format string with {level} in [0, 1] (e.g. "LEVEL '
        '{level:.3f}"); null for on/off devices, whose level can then only be 1',
    )
    state_query: str | None = Field(
        "STATE?",
        description="asks on/off: read on open and after each switch to verify; null to skip",
    )
    on_reply: str = Field(
        "1|ON|OPEN", description="regex (full match, any case) of the state reply meaning on"
    )
    off_reply: str = Field(
        "0|OFF|CLOSED?", description="regex (full match, any case) of the state reply meaning off"
    )
    expect_echo: bool = Field(False, description="the device echoes each command line first")
    ack: str | None = Field(
        None, description='reply every set command must get (e.g. "OK"); null when none comes'
    )

    @field_validator("on_reply", "off_reply")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"not a regular expression: {value!r}: {e}") from e
        return value

    @field_validator("level_command")
    @classmethod
    def _formattable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.format(level=0.5)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{value!r} must be a format string using {{level}}: {e!r}") from e
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError as e:
            raise ValueError(str(e)) from e
        return value


class SerialLightSource(LightSource):
    """A shutter or LED/SLM controller switched by ASCII commands."""

    backend = "serial"
    Options = SerialLightOptions

    def __init__(self, name: str, options: SerialLightOptions) -> None:
        super().__init__(name)
        self.options = options
        self.simulated = is_simulated_url(options.url)
        self._port: Any = None
        self._rx = bytearray()  # bytes read past the end of the last line
        self._level_sent: str | None = None
        self._lock = threading.Lock()
        self._on_re = re.compile(options.on_reply, re.IGNORECASE)
        self._off_re = re.compile(options.off_reply, re.IGNORECASE)
        self._wterm = options.write_termination.encode(options.encoding)
        self._rterm = options.read_termination.encode(options.encoding)

    @property
    def where(self) -> str:
        return f"{self.kind} {self.name!r} ({self.options.url})"

    # --- life cycle

    def _open_hw(self) -> None:
        import serial

        o = self.options
        try:
            port = serial.serial_for_url(
                o.url,
                baudrate=o.baudrate,
                bytesize=o.bytesize,
                parity=o.parity,
                stopbits=o.stopbits,
                timeout=min(POLL_S, o.timeout_s),
                write_timeout=o.timeout_s,
                do_not_open=True,
            )
            port.open()
        except ValueError as e:  # an unknown URL scheme or setting: a bench-file mistake
            raise DeviceError(f"{self.where}: bad serial port {o.url!r}: {e}") from e
        except (serial.SerialException, OSError) as e:
            raise DeviceDisconnected(f"{self.where}: cannot open serial port {o.url!r}: {e}") from e
        self._port, self._level_sent = port, None
        try:
            if o.state_query:  # start from what the device does, not from what we assumed
                self._on = self._parse_state(self._query(o.state_query), o.state_query)
        except BaseException:
            self._close_hw()
            raise

    def _close_hw(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception as e:  # a port that is gone cannot be closed; nothing to do
                log.debug("%s: closing the port failed: %s", self.where, e)

    # --- the protocol

    def _set_output_hw(self, on: bool, level: float) -> None:
        o = self.options
        if o.level_command is None and level != 1.0:
            raise ValueError(f"{self.name}: this device has no level_command; its level is 1")
        level_command = o.level_command.format(level=level) if o.level_command else None
        try:
            if not on:  # off first: never a flash at the new level
                self._set(o.off_command)
            if level_command is not None and level_command != self._level_sent:
                self._set(level_command)
                self._level_sent = level_command
            if on:
                self._set(o.on_command)
            if o.state_query:
                reply = self._query(o.state_query)
                if self._parse_state(reply, o.state_query) != on:
                    raise DeviceError(
                        f"{self.where}: switched {'on' if on else 'off'}, but {o.state_query!r} "
                        f"answers {reply!r}"
                    )
        except BaseException:
            self._level_sent = None  # unknown now: send it again next time
            raise

    def _parse_state(self, reply: str, query: str) -> bool:
        if self._on_re.fullmatch(reply):
            return True
        if self._off_re.fullmatch(reply):
            return False
        raise DeviceError(f"{self.where}: {query!r} answered {reply!r}, not on or off")

    def snapshot(self) -> dict[str, Any]:
        o = self.options
        return super().snapshot() | {
            "url": o.url,
            "baudrate": o.baudrate,
            "framing": f"{o.bytesize}{o.parity}{o.stopbits}",
        }

    # --- exchanges

    def _set(self, command: str) -> None:
        """A set command: never retried (it need not be idempotent); its ack is checked."""
        reply = self._exchange(command, want_reply=self.options.ack is not None)
        if self.options.ack is not None and reply != self.options.ack:
            raise DeviceError(
                f"{self.where}: {command!r} answered {reply!r}, expected {self.options.ack!r}"
            )

    def _query(self, query: str) -> str:
        """An idempotent query, retried after a timeout (bounded, logged)."""
        attempts = 1 + self.options.retries
        for attempt in range(1, attempts):
            try:
                return self._exchange(query, want_reply=True)
            except DeviceTimeout as e:
                log.warning("%s (attempt %d of %d); retrying", e, attempt, attempts)
        try:
            return self._exchange(query, want_reply=True)
        except DeviceTimeout as e:
            if attempts == 1:
                raise
            raise DeviceTimeout(f"{e} ({attempts} attempts)") from e

    def _exchange(self, command: str, want_reply: bool) -> str | None:
        import serial

        port = self._port
        if port is None:
            raise DeviceDisconnected(f"{self.where} is not open")
        deadline = time.monotonic() + self.options.timeout_s
        try:
            with self._lock:
                # a strict request/reply master: whatever is pending (a prompt, a late reply to a
                # timed-out query) is stale
                port.reset_input_buffer()
                self._rx.clear()
                port.write(command.encode(self.options.encoding) + self._wterm)
                if self.options.expect_echo:
                    self._strip_echo(command, deadline)
                return self._read_line(command, deadline) if want_reply else None
        except DeviceError:
            raise
        except serial.SerialTimeoutException as e:
            raise DeviceTimeout(f"{self.where}: writing {command!r} timed out: {e}") from e
        except _port_errors() as e:
            raise DeviceDisconnected(f"{self.where}: lost during {command!r}: {e!r}") from e

    def _strip_echo(self, command: str, deadline: float) -> None:
        echo = self._read_line(command, deadline, what="echo of")
        if not echo.startswith(command):
            raise DeviceError(f"{self.where}: expected the echo of {command!r}, got {echo!r}")
        rest = echo[len(command) :].strip()
        if rest:  # echo and reply on one line: keep the reply for the next read
            self._rx[:0] = rest.encode(self.options.encoding) + self._rterm

    def _read_line(self, command: str, deadline: float, what: str = "reply to") -> str:
        port, term = self._port, self._rterm
        while (end := self._rx.find(term)) < 0:
            if time.monotonic() >= deadline:
                partial = f" (got {bytes(self._rx)!r} without {term!r})" if self._rx else ""
                raise DeviceTimeout(
                    f"{self.where}: no {what} {command!r} within {self.options.timeout_s:g} s"
                    f"{partial}"
                )
            self._rx += port.read(max(1, port.in_waiting))
        line = bytes(self._rx[:end])
        del self._rx[: end + len(term)]
        return line.decode(self.options.encoding, errors="replace").strip()


@dataclass(eq=False, kw_only=True)
class ShutterEmulator:
    """A shutter/LED controller on a pseudo-terminal (POSIX), for tests and demos.

    The driver opens `port` (the pty's slave path) like any serial port. The emulator reads
    command lines and answers like a simple controller: `on_command`/`off_command` switch it,
    "LEVEL <x>" sets `level`, `state_query` answers `on_reply`/`off_reply`, "*IDN?" names it,
    anything else answers "ERR". Set commands answer `ack` (when not None); with `echo` each line
    is echoed first. Clear `answering` and it swallows commands silently (a hung device). It
    stops by itself after `lifetime_s`, so a forgotten one cannot outlive a test run.
    """

    terminator: str = "\r"
    echo: bool = False
    ack: str | None = "OK"
    on_command: str = "OPEN"
    off_command: str = "CLOSE"
    state_query: str = "STATE?"
    on_reply: str = "1"
    off_reply: str = "0"
    lifetime_s: float = 60.0
    # state: what the emulated controller is doing now, and what it has received
    is_on: bool = field(default=False, init=False)
    level: float = field(default=1.0, init=False)
    answering: bool = field(default=True, init=False)
    received: list[str] = field(default_factory=list, init=False)
    port: str | None = field(default=None, init=False)
    _fds: tuple[int, int] | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> ShutterEmulator:
        import tty

        master, slave = os.openpty()
        tty.setraw(slave)  # no echo or CR/LF translation by the terminal itself
        self._fds = (master, slave)  # holding the slave keeps the master readable between clients
        self.port = os.ttyname(slave)
        _EMULATED_PORTS.add(self.port)
        self._thread = threading.Thread(
            target=self._serve, name=f"ShutterEmulator {self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and hang up: a driver still holding the port sees it disconnected."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        _EMULATED_PORTS.discard(self.port)

    def __enter__(self) -> ShutterEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        master = self._fds[0]
        term = self.terminator.encode()
        buf = b""
        end = time.monotonic() + self.lifetime_s
        while not self._stop.is_set() and time.monotonic() < end:
            if not select.select([master], [], [], 0.02)[0]:
                continue
            try:
                buf += os.read(master, 1024)
            except OSError:  # no client right now
                time.sleep(0.02)
                continue
            while term in buf:
                line, buf = buf.split(term, 1)
                out = self._handle(line.decode("ascii", errors="replace").strip())
                if out:
                    os.write(master, "".join(s + self.terminator for s in out).encode())

    def _handle(self, command: str) -> list[str]:
        self.received.append(command)
        if not self.answering:
            return []
        reply = self._respond(command)
        return ([command] if self.echo else []) + ([reply] if reply is not None else [])

    def _respond(self, command: str) -> str | None:
        if command == self.on_command:
            self.is_on = True
            return self.ack
        if command == self.off_command:
            self.is_on = False
            return self.ack
        if command == self.state_query:
            return self.on_reply if self.is_on else self.off_reply
        if command.startswith("LEVEL "):
            try:
                level = float(command[6:])
            except ValueError:
                return "ERR"
            if not 0.0 <= level <= 1.0:
                return "ERR"
            self.level = level
            return self.ack
        if command == "*IDN?":
            return "HIL,ShutterEmulator,0,1.0"
        return "ERR"
