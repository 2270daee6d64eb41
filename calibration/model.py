"""The calibrated forward model: what the bench records for any image, from a calibration alone.

It is the model every fitted quantity was fitted to, so it predicts frames for new images (the
check that a calibration is good) and drives the replay bench.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from calibration.psf import render_tiles

if TYPE_CHECKING:
    from calibration.calfile import Calibration


def as_channels(levels: np.ndarray) -> np.ndarray:
    """Display drive levels (N, H, W) or (N, H, W, 3) → (N, C, H, W)."""
    levels = np.asarray(levels, np.float64)
    return levels[:, None] if levels.ndim == 3 else levels.transpose(0, 3, 1, 2)


def emitted_light(cal, levels: np.ndarray) -> np.ndarray:
    """Relative light leaving the display (N, C, Hd, Wd): measured response × illumination."""
    x = as_channels(levels)
    response = np.interp(x, cal.display_levels, cal.display_response)
    return response * cal.illumination


def predict_signal(cal, emitted: np.ndarray) -> np.ndarray:
    """Scene signal in DN/s (N, H, W): every tile's warped, convolved light, overlap-added."""
    return render_tiles(emitted, cal.affines, cal.psfs, cal.frame_shape)


def predict_frames(cal, levels: np.ndarray, exposure_s: float | None = None) -> np.ndarray:
    """Expected frames in DN for display levels (N, Hd, Wd[, 3]), as the camera would average."""
    exposure = cal.exposure_s if exposure_s is None else exposure_s
    signal = predict_signal(cal, emitted_light(cal, levels))
    return cal.dark_dn + exposure * (cal.background_dn_per_s + signal)


def noise_variance(cal, mean_dn: np.ndarray) -> np.ndarray:
    """Temporal variance (DN²) of a frame with this mean: read noise, then shot noise."""
    electrons_dn = np.maximum(mean_dn - cal.dark_dn, 0.0)
    return cal.read_noise_dn**2 + electrons_dn / cal.conversion_gain_e_per_dn


def validate_prediction(cal: Calibration, images: np.ndarray, captured: np.ndarray) -> dict:
    """How well the calibration predicts frames of new images, against the noise it expects.

    `excess_rel_error` is the residual beyond what sensor noise explains, relative to the
    signal: the model's own error. `chi2` is the residual over the expected noise (1 is perfect).
    """
    predicted = predict_frames(cal, images)
    residual = captured - predicted
    var = noise_variance(cal, predicted)
    signal = predicted - cal.dark_dn
    use = np.abs(signal) > 0  # where the scene reaches
    excess = max(float(np.mean(residual[..., use] ** 2) - np.mean(var[..., use])), 0.0)
    return {
        "prediction_chi2": float(np.mean(residual[..., use] ** 2 / var[..., use])),
        "prediction_excess_rel_error": float(np.sqrt(excess / np.mean(signal[..., use] ** 2))),
        "prediction_rel_error": float(
            np.sqrt(np.mean(residual[..., use] ** 2) / np.mean(signal[..., use] ** 2))
        ),
    }
