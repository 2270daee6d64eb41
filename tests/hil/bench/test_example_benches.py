"""Every bench file in examples/ loads, and its simulated twin is the bench its comments say."""

from pathlib import Path

import pytest

from hil.bench.assembly import Bench
from hil.bench.config import load_bench
from sim.clock import VirtualClock

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("bench-*.toml"))


def test_there_are_at_least_five_foreign_benches():
    assert len([p for p in EXAMPLES if p.name != "bench-lab.toml"]) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_an_example_bench_builds_its_simulated_twin_as_written(path: Path):
    config = load_bench(path)
    sim = config.sim
    world = Bench(config, clock=VirtualClock()).sim_world()
    if sim.sensor.width is not None:
        assert world.frame_shape == (sim.sensor.height, sim.sensor.width)
    assert world.display_shape[:2] == (sim.display.height, sim.display.width)
    assert world.grid_hw == tuple(config.frontend.input_px)
    # every sub-image's corners land on the sensor: calibration can find all of them
    h, w = world.grid_hw
    corners = [[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]]
    fh, fw = world.frame_shape
    for p in range(world.geometry.n_tiles):
        xy = world.geometry.to_sensor(p, corners)
        assert (xy[:, 0] > 0).all() and (xy[:, 0] < fw - 1).all(), (p, xy)
        assert (xy[:, 1] > 0).all() and (xy[:, 1] < fh - 1).all(), (p, xy)
