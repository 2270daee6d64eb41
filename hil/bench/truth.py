"""How well a calibration found what the simulated world really does: its ground truth.

The only reader of the simulated world outside bench assembly, and only on a simulated bench:
a real bench has no truth to compare with, and a replayed one only its own calibration.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.ndimage import shift as subpixel_shift

from calibration import calfile
from calibration.design import Design
from calibration.geometry import apply_affine
from calibration.psf import psf_centroid
from hil.bench.assembly import Bench
from sim.devices import SimCamera
from sim.fabrication import illumination_map


def has_truth(bench: Bench) -> bool:
    """Whether the bench's camera records the simulated world (not a lab, not a replay)."""
    return isinstance(bench.camera, SimCamera) and not bench.config.sim.replay


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
    h, w = cal.display_shape[:2]
    ys, xs = np.mgrid[0:h:2, 0:w:2]
    points = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    landed = fab.warp_points(torch.as_tensor(points)).numpy()
    psf_err, reg_sq, gain_err = [], [], []
    for p, (y0, x0, _, _) in enumerate(design.tile_boxes):
        delta = psf_centroid(fabricated[p]) - psf_centroid(design.psfs[p])
        truth_pts = landed + [x0, y0] + delta
        reg_sq.append(np.mean(np.sum((apply_affine(cal.affines[p], points) - truth_pts) ** 2, 1)))
        back = (0, -delta[1], -delta[0])
        truth_psf = subpixel_shift(fabricated[p], back, order=3, mode="grid-constant") * scale
        psf_err.append(np.linalg.norm(cal.psfs[p] - truth_psf) / np.linalg.norm(truth_psf))
        gain_err.append(abs(cal.psfs[p].sum() / (fabricated[p].sum() * scale) - 1))
    illum_truth = illumination_map((h, w), fab.params.illumination_falloff).numpy()
    return {
        "psf_rel_error": float(np.mean(psf_err)),
        "psf_rel_error_max": float(np.max(psf_err)),
        "registration_rms_px": float(math.sqrt(np.mean(reg_sq))),
        "gain_rel_error": float(np.mean(gain_err)),
        "display_gamma_error": float(cal.display_gamma - world.params.display.gamma),
        "conversion_gain_rel_error": float(cal.conversion_gain_e_per_dn / sensor.gain_e_per_dn - 1),
        "illumination_rel_error": float(
            np.linalg.norm(cal.illumination - illum_truth) / np.linalg.norm(illum_truth)
        ),
    }
