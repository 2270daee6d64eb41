"""The serial backend against pyserial's loopback and a shutter controller emulated on a pty."""

from __future__ import annotations

import logging
import sys
import time

import pytest
from pydantic import ValidationError

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.serial_devices import (
    SerialLightOptions,
    SerialLightSource,
    ShutterEmulator,
    is_simulated_url,
)
from tests.contracts import LightSourceContract

pytest.importorskip("serial")
needs_pty = pytest.mark.skipif(sys.platform == "win32", reason="the emulator needs a POSIX pty")

TIMEOUT_S = 0.3


def shutter(url: str, **kw) -> SerialLightSource:
    return SerialLightSource("shutter", SerialLightOptions(url=url, timeout_s=TIMEOUT_S, **kw))


@pytest.fixture
def emulator():
    with ShutterEmulator(lifetime_s=20.0) as emu:
        yield emu


@needs_pty
class TestSerialShutterContract(LightSourceContract):
    expect_simulated = True

    @pytest.fixture(autouse=True)
    def _emulator(self, emulator):
        self.emulator = emulator

    def make(self, tmp_path):
        return shutter(self.emulator.port, ack="OK", level_command="LEVEL {level:.3f}")

    def read_state(self, device):
        return self.emulator.is_on, self.emulator.level


def test_loopback_returns_exactly_what_the_driver_writes():
    with shutter("loop://", state_query=None, level_command="LEVEL {level:.3f}") as dev:
        port = dev._port
        dev.level = 0.5  # off first, then the level: each exchange starts on an empty buffer
        assert port.read(port.in_waiting) == b"LEVEL 0.500\r"
        dev.on()  # the level is unchanged: not sent again
        assert port.read(port.in_waiting) == b"OPEN\r"
        dev.off()
        assert port.read(port.in_waiting) == b"CLOSE\r"
        assert dev.snapshot()["simulated"] is True


def test_loopback_with_other_terminators():
    opts = {"write_termination": "\r\n", "state_query": None, "on_command": "ens=1"}
    with shutter("loop://", **opts) as dev:
        dev.on()
        assert dev._port.read(dev._port.in_waiting) == b"ens=1\r\n"


def test_an_unparsable_state_reply_is_quoted():
    # over the loopback the state query reads back itself
    dev = shutter("loop://", state_query="STATE?")
    with pytest.raises(DeviceError, match="'STATE\\?'"):
        dev.open()
    assert not dev.is_open


def test_a_reply_without_its_terminator_is_a_timeout():
    # reading until LF, the loopback only ever returns "STATE?\r": partial data, no terminator
    dev = shutter("loop://", read_termination="\n", retries=0)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="without"):
        dev.open()
    assert time.monotonic() - t0 < TIMEOUT_S + 0.5


@needs_pty
def test_echo_is_stripped(emulator):
    emulator.echo = True
    with shutter(emulator.port, expect_echo=True, ack="OK") as dev:
        dev.on()
        assert emulator.is_on and dev.is_on
        dev.off()
        assert not emulator.is_on
    # without expect_echo the echo is taken for the ack and quoted
    with shutter(emulator.port, state_query=None, ack="OK") as dev:
        with pytest.raises(DeviceError, match="'OPEN'"):
            dev.on()
        emulator.echo = False  # so that closing works


@needs_pty
def test_an_unexpected_acknowledgement_is_quoted(emulator):
    with shutter(emulator.port, ack="OK") as dev:
        emulator.ack = "BUSY"
        with pytest.raises(DeviceError, match="'BUSY'") as err:
            dev.on()
        assert not isinstance(err.value, (DeviceTimeout, DeviceDisconnected))
        emulator.ack = "OK"


@needs_pty
def test_a_device_that_stops_answering_times_out_on_time(emulator):
    with shutter(emulator.port, ack="OK") as dev:
        emulator.answering = False
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="'OPEN'"):
            dev.on()  # a set command: never retried
        assert time.monotonic() - t0 < TIMEOUT_S + 0.5
        assert not dev.is_on
        emulator.answering = True


@needs_pty
def test_state_queries_are_retried_a_bounded_logged_number_of_times(emulator, caplog):
    emulator.ack = None  # no ack: only the state query waits for a reply
    with shutter(emulator.port, retries=2) as dev:
        emulator.answering = False
        t0 = time.monotonic()
        logs = caplog.at_level(logging.WARNING, logger="hil.drivers")
        with logs, pytest.raises(DeviceTimeout, match="3 attempts"):
            dev.on()
        assert time.monotonic() - t0 < 3 * TIMEOUT_S + 0.5
        emulator.answering = True
    assert emulator.received.count("STATE?") >= 1 + 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


@needs_pty
def test_open_adopts_the_devices_state(emulator):
    emulator.is_on = True
    with shutter(emulator.port, ack="OK") as dev:
        assert dev.is_on
    assert not emulator.is_on


@needs_pty
def test_a_device_that_hangs_up_is_disconnected(emulator):
    dev = shutter(emulator.port)
    dev.open()
    emulator.stop()
    with pytest.raises(DeviceDisconnected, match="lost"):
        dev.on()
    with pytest.raises(DeviceDisconnected):
        dev.close()  # switching off on the way out fails loudly, but the port is closed
    assert not dev.is_open


def test_a_missing_port_is_disconnected_and_named():
    dev = shutter("/dev/hil-no-such-port")
    assert dev.simulated is False
    with pytest.raises(DeviceDisconnected, match="/dev/hil-no-such-port"):
        dev.open()
    assert not dev.is_open


def test_a_device_without_level_command_only_has_level_one():
    with shutter("loop://", state_query=None) as dev:
        dev.level = 1.0
        with pytest.raises(ValueError, match="level"):
            dev.level = 0.5
        assert dev.level == 1.0


@needs_pty
def test_which_urls_are_simulated(emulator):
    assert is_simulated_url("loop://") and is_simulated_url(emulator.port)
    assert not is_simulated_url("/dev/ttyUSB0") and not is_simulated_url("socket://lab:4000")


def test_options_refuse_mistakes():
    with pytest.raises(ValidationError):
        SerialLightOptions(url="loop://", colour="red")
    with pytest.raises(ValidationError):
        SerialLightOptions(url="loop://", on_reply="(")
    with pytest.raises(ValidationError):
        SerialLightOptions(url="loop://", level_command="LEVEL {lvl}")
    with pytest.raises(ValidationError):
        SerialLightOptions(url="loop://", parity="X")
    with pytest.raises(ValidationError):
        SerialLightOptions(url="loop://", encoding="no-such-codec")
