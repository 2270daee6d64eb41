"""How well a calibration found what the simulated world really does: its ground truth.

The only reader of the simulated world outside bench assembly, and only on a simulated bench:
a real bench has no truth to compare with, and a replayed one only its own calibration.
Calibration itself never reads the world; this compares afterwards.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.ndimage import shift as subpixel_shift

from calibration import calfile
from calibration.design import Design
from calibration.model import emitted_light, predict_signal, tile_maps
from calibration.psf import psf_centroid
from hil.bench.assembly import Bench
from sim.devices import SimCamera


def has_truth(bench: Bench) -> bool:
    """Whether the bench's camera records the simulated world (not a lab, not a replay)."""
    return isinstance(bench.camera, SimCamera) and not bench.config.sim.replay


def _true_points(world, p: int, points: np.ndarray, delta: np.ndarray):
    """Where the world puts input-grid points of tile p on the sensor, in the calibration's
    convention (the PSF keeps its design's centroid: the map moves by the fabricated PSF's
    centroid shift δ)."""
    return np.asarray(world.geometry.to_sensor(p, points + delta), np.float64)


def _white_field_error(world, cal: calfile.Calibration, scale: float) -> float:
    """The calibrated model's white-field signal against the world's noise-free irradiance
    (which holds the glass's gain already: `scale` is DN/s per unit irradiance)."""
    levels, sources = world.levels.clone(), dict(world.sources)
    try:
        world.sources = {"truth": (True, 1.0)}
        world.show(world_display(world, cal))
        truth = (world.irradiance().numpy() - world.fabrication.background) * scale
    finally:
        world.levels, world.sources = levels, sources
    ones = np.ones((1, *cal.input_shape), np.float32)
    model = predict_signal(cal, emitted_light(cal, ones))[0]
    lit = truth > 0.05 * truth.max()
    return float(np.linalg.norm((model - truth)[lit]) / np.linalg.norm(truth[lit]))


def world_display(world, cal: calfile.Calibration) -> np.ndarray:
    """A white input grid on the world's display, placed as the calibration placed it."""
    (h, w), s, (x, y) = cal.input_shape, cal.display_scale, cal.display_origin
    out = np.zeros(world.display_shape, np.float32)
    out[y : y + s * h, x : x + s * w] = 1.0
    return out


def ground_truth(bench: Bench, cal: calfile.Calibration, design: Design) -> dict[str, Any] | None:
    """Fitted quantities against the simulated world that produced them; None without one.

    A PSF and a misalignment share their translation; the calibration pins each measured PSF to
    its design's centroid, so the truth is put in the same convention: the true registration
    moves by the fabricated PSF's centroid shift δ and the true PSF moves back by δ.
    """
    if not has_truth(bench):
        return None
    world = bench.world
    sensor, fab = world.sensor, world.fabrication
    scale = fab.gain * sensor.params.flux_e_per_s / sensor.gain_e_per_dn  # DN/s per irradiance
    fabricated = world.frontend.psfs.numpy().astype(np.float64)
    h, w = design.hw
    ys, xs = np.mgrid[0:h:2, 0:w:2]
    points = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    centre = np.array([[(w - 1) / 2, (h - 1) / 2]])
    maps = tile_maps(cal)
    psf_err, reg_sq, gain_err, centre_err, input_per_sensor = [], [], [], [], []
    for p, tile in enumerate(maps):
        delta = psf_centroid(fabricated[p]) - psf_centroid(design.psfs[p])
        # where a lit input pixel's spot (its light's centroid) lands, the quantity the dot
        # grid measures: the calibrated map at the point plus its design PSF's lead, against
        # the world's map at the point plus the fabricated PSF's lead
        lead = design.centroid_offset(p)
        truth_pts = _true_points(world, p, points + lead, delta)
        reg_sq.append(np.mean(np.sum((tile.to_sensor(points + lead) - truth_pts) ** 2, 1)))
        truth_centre = _true_points(world, p, centre + lead, delta)
        found = tile.to_sensor(centre + lead)
        centre_err.append(float(np.hypot(*(found - truth_centre)[0])))
        input_per_sensor.append(1 / math.sqrt(abs(np.linalg.det(tile.affine[:, :2]))))
        back = (0, -delta[1], -delta[0])
        truth_psf = subpixel_shift(fabricated[p], back, order=3, mode="grid-constant") * scale
        psf_err.append(np.linalg.norm(cal.psfs[p] - truth_psf) / np.linalg.norm(truth_psf))
        gain_err.append(abs(cal.psfs[p].sum() / (fabricated[p].sum() * scale) - 1))
    rms_px = math.sqrt(np.mean(reg_sq))
    return {
        "psf_rel_error": float(np.mean(psf_err)),
        "psf_rel_error_max": float(np.max(psf_err)),
        "registration_rms_px": rms_px,
        "registration_rms_input_px": float(
            math.sqrt(np.mean(np.asarray(reg_sq) * np.square(input_per_sensor)))
        ),
        "tile_centre_error_px_max": float(np.max(centre_err)),
        "gain_rel_error": float(np.mean(gain_err)),
        "display_gamma_error": float(cal.display_gamma - world.params.display.gamma),
        "conversion_gain_rel_error": float(cal.conversion_gain_e_per_dn / sensor.gain_e_per_dn - 1),
        "white_field_rel_error": _white_field_error(world, cal, scale / fab.gain),
    }
