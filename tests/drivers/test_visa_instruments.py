"""The VISA backends against the simulated instruments shipped in drivers/sim_instruments.yaml.

pyvisa keeps one library object per spec and process, and pyvisa-sim keeps each instrument's
state in it; so a second session opened here sees what the driver did, also after it closed.
"""

from __future__ import annotations

import logging
import time

import pytest
from pydantic import ValidationError

from drivers.errors import DeviceDisconnected, DeviceError, DeviceTimeout
from drivers.visa_instruments import (
    SIM_INSTRUMENTS,
    VisaLightOptions,
    VisaLightSource,
    VisaPowerMeter,
    VisaPowerMeterOptions,
    resolve_visa_library,
)
from tests.contracts import LightSourceContract, PowerMeterContract

pyvisa = pytest.importorskip("pyvisa")
pytest.importorskip("pyvisa_sim")

LED = "USB0::0x1313::0x80C8::M00000001::INSTR"
METER = "USB0::0x1313::0x8078::P0000001::INSTR"
STALLED_METER = "USB0::0x1313::0x8078::P0000002::INSTR"
FAULTED_METER = "USB0::0x1313::0x8078::P0000003::INSTR"
MAX_CURRENT_A = 0.5


def instrument(resource: str):
    """A session of our own on the simulated instrument, beside (or after) the driver's."""
    rm = pyvisa.ResourceManager(resolve_visa_library("sim"))
    return rm.open_resource(resource, read_termination="\n", write_termination="\n", timeout=1000)


def led(**kw) -> VisaLightSource:
    kw = {"resource": LED, "visa_library": "sim", "max_current_a": MAX_CURRENT_A, **kw}
    return VisaLightSource("led", VisaLightOptions(**kw))


def meter(**kw) -> VisaPowerMeter:
    return VisaPowerMeter(
        "meter", VisaPowerMeterOptions(**{"resource": METER, "visa_library": "sim", **kw})
    )


class TestVisaLightContract(LightSourceContract):
    expect_simulated = True

    def make(self, tmp_path):
        return led()

    def read_state(self, device):
        res = instrument(LED)
        try:
            on = res.query("OUTP?").strip() == "ON"
            current_a = float(res.query("SOUR:CURR?"))
        finally:
            res.close()
        return on, current_a / MAX_CURRENT_A


class TestVisaPowerMeterContract(PowerMeterContract):
    expect_simulated = True

    def make(self, tmp_path):
        return meter()


@pytest.mark.parametrize("level", [0.0, 0.1, 0.5, 1.0])
def test_level_sets_the_current_the_instrument_reports(level):
    with led(max_current_a=0.8) as light:
        light.level = level
        light.on()
    res = instrument(LED)
    try:
        assert float(res.query("SOUR:CURR?")) == pytest.approx(0.8 * level, abs=1e-4)
    finally:
        res.close()


def test_open_adopts_what_the_instrument_is_doing():
    res = instrument(LED)
    try:
        res.write("SOUR:CURR 0.1")
        res.write("OUTP ON")
        with led() as light:
            assert light.is_on and light.level == pytest.approx(0.1 / MAX_CURRENT_A)
        assert res.query("OUTP?") == "OFF"  # our session outlives the driver's
    finally:
        res.close()


def test_a_setting_the_instrument_refuses_is_caught_by_the_read_back():
    # max_current_a above the instrument's 1 A limit: it refuses 1.5 A and keeps the old current
    with led(max_current_a=2.0) as light, pytest.raises(DeviceError, match="setting refused"):
        light.level = 0.75


@pytest.mark.parametrize(
    ("resource", "library"),
    [
        ("USB0::0x1313::0x8078::NOSUCH01::INSTR", "sim"),
        ("ASRL/dev/hil-no-such-port::INSTR", "@py"),
    ],
)
def test_an_unknown_resource_is_disconnected_and_named(resource, library):
    light = led(resource=resource, visa_library=library, timeout_s=0.5)
    assert light.simulated is (library == "sim")
    with pytest.raises(DeviceDisconnected, match=resource.replace("::", ".*")):
        light.open()
    assert not light.is_open


def test_a_query_that_is_never_answered_times_out_on_time_after_logged_retries(caplog):
    # the stalled meter accepts MEAS:POW? and never answers; pyvisa-sim raises VI_ERROR_TMO
    with meter(resource=STALLED_METER, timeout_s=0.2, retries=2) as m:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hil.drivers"), pytest.raises(DeviceTimeout):
            m.read_w(timeout_s=1.0)
        elapsed = time.monotonic() - t0
    assert 0.55 < elapsed < 1.0 + 0.5
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_the_callers_timeout_caps_a_slower_instrument_timeout():
    with meter(resource=STALLED_METER, timeout_s=30.0) as m:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="MEAS:POW"):
            m.read_w(timeout_s=0.5)
        assert time.monotonic() - t0 < 0.5 + 0.5


def test_an_error_reply_where_a_number_is_expected_is_quoted():
    with meter(resource=FAULTED_METER) as m, pytest.raises(DeviceError, match="'ERROR'") as err:
        m.read_w()
    assert not isinstance(err.value, (DeviceTimeout, DeviceDisconnected))


def test_wavelength_is_set_checked_and_recorded():
    with meter(wavelength_nm=850.0, wavelength_query="SENS:CORR:WAV?") as m:
        assert 50e-6 < m.read_w() < 200e-6
        snap = m.snapshot()
    assert snap["wavelength_nm"] == 850.0 and snap["idn"].startswith("HIL,SIM-POWER-METER")
    assert snap["resource"] == METER
    res = instrument(METER)
    try:
        assert float(res.query("SENS:CORR:WAV?")) == 850.0
    finally:
        res.close()


def test_closing_a_driver_leaves_other_sessions_on_the_library_working():
    res = instrument(METER)
    try:
        with meter() as m:
            m.read_w()
        assert float(res.query("MEAS:POW?")) > 0
    finally:
        res.close()


def test_options_resolve_the_shipped_simulation_and_refuse_mistakes():
    assert SIM_INSTRUMENTS.is_file()
    assert resolve_visa_library("sim") == f"{SIM_INSTRUMENTS}@sim"
    assert resolve_visa_library("@py") == "@py"
    assert led(visa_library="@sim").simulated and not led(visa_library="@py").simulated
    with pytest.raises(ValidationError):
        VisaLightOptions(resource=LED, max_current_a=1.0, colour="red")
    with pytest.raises(ValidationError):
        VisaLightOptions(resource=LED, max_current_a=1.0, level_command="SOUR:CURR {amps}")
    with pytest.raises(ValidationError):
        VisaLightOptions(resource=LED)  # max_current_a has no default
    with pytest.raises(ValidationError):
        VisaPowerMeterOptions(resource=METER, wavelength_nm=850.0, wavelength_command=None)
    assert VisaLightOptions(resource=LED, max_current_a=1.0, level_command="LED {level:.3f}")
