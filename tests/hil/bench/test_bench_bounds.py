"""Every numeric key of a bench file: non-finite, boolean, absurd and out-of-range values are one
line naming the key; the largest values the schema accepts still build the bench."""

import subprocess
import sys

import pytest

from hil.bench.config import numeric_keys, parse_bench
from hil.errors import UserError


def nested(path, value) -> dict:
    out: dict = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


def toml(data: dict, prefix: str = "") -> str:
    """A bench file of nested sections whose leaves are numbers or lists of numbers."""
    leaves = [f"{k} = {v!r}" for k, v in data.items() if not isinstance(v, dict)]
    text = (f"[{prefix}]\n" if prefix and leaves else "") + "".join(f"{line}\n" for line in leaves)
    for k, v in data.items():
        if isinstance(v, dict):
            text += toml(v, f"{prefix}.{k}" if prefix else k)
    return text


KEYS = list(numeric_keys())
BAD = {"inf": float("inf"), "nan": float("nan"), "true": True, "1e300": 1e300, "-1e300": -1e300}


def test_the_fuzzed_keys_cover_every_section():
    sections = {k[:-1] for k, _ in KEYS}
    assert {("frontend",), ("sim", "sensor"), ("sim", "fabrication"), ("sim", "optics")} <= sections
    assert len(KEYS) >= 30


@pytest.mark.parametrize("bad", BAD, ids=str)
@pytest.mark.parametrize(("key", "default"), KEYS, ids=[".".join(k) for k, _ in KEYS])
def test_a_bad_number_is_one_line_naming_the_key(key, default, bad):
    value = BAD[bad]
    if isinstance(default, tuple):
        value = [value, *default[1:]]
    with pytest.raises(UserError) as e:
        parse_bench(nested(key, value))
    message = str(e.value)
    assert ".".join(key) in message and "\n" not in message


LARGEST = [  # the biggest bench each sizing key accepts, one key at a time
    {"frontend": {"kernel_size": 101}},
    {"frontend": {"kernels": 64}},
    {"sim": {"optics": {"magnification": 4}}},
    {"sim": {"sensor": {"width": 8192, "height": 4096}}},
    {"frontend": {"display_scale": 4}, "sim": {"display": {"width": 128, "height": 128}}},
    {"sim": {"display": {"width": 8192, "height": 8192}}},
    {"sim": {"sensor": {"exposure_s": 60, "flux_e_per_s": 1e15, "full_well_e": 1e7}}},
    {"sim": {"fabrication": {"shift_px": [1000, -1000], "kernel_blur_px": 20}}},
]


def test_sizes_past_what_the_simulation_can_build_are_refused_with_the_estimate():
    with pytest.raises(UserError, match=r"1024 kernels of 7 px at magnification 1 would take "
                       r"the simulated camera about \d+ s to build"):  # fmt: skip
        parse_bench({"frontend": {"kernels": 1024}})
    with pytest.raises(UserError, match="8192 x 8192 is 67 MP; the simulated sensor takes at most"):
        parse_bench({"sim": {"sensor": {"width": 8192, "height": 8192}}})
    with pytest.raises(UserError, match="at magnification 100 would take"):
        parse_bench({"sim": {"optics": {"magnification": 100}}})
    with pytest.raises(UserError, match="black_level_dn 4000 leaves no room for signal"):
        parse_bench({"sim": {"sensor": {"black_level_dn": 4000}}})


@pytest.mark.parametrize("data", LARGEST, ids=lambda d: str(d)[:60])
def test_the_largest_accepted_benches_list_their_devices(tmp_path, data):
    path = tmp_path / "bench.toml"
    path.write_text(toml(data))
    parse_bench(data)
    done = subprocess.run(
        [sys.executable, "-m", "hil", "devices", "--bench", str(path)],
        capture_output=True,
        timeout=60,  # a hang guard; the 10 s figure is the closing note's measurement
        text=True,
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert "Traceback" not in done.stderr
