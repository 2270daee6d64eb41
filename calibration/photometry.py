"""Photometric calibration on the bench: exposure, dark, stray light, photon transfer, display.

Every function drives a bench through the driver protocols only (`display`, `camera`,
`light_sources`), so the same code runs on glass and on the simulated bench.
"""

from __future__ import annotations

import numpy as np

from calibration.errors import CalibrationError


def set_lights(bench, on: bool) -> None:
    for source in bench.light_sources:
        source.on() if on else source.off()


def uniform(bench, level: float) -> np.ndarray:
    return np.full(bench.display.shape, level, np.float32)


def snap(camera) -> np.ndarray:
    """One frame as float64, with a timeout that leaves room for a long exposure."""
    return camera.snap(camera.frame_timeout_s()).image.astype(np.float64)


def mean_frame(camera, n: int, variance: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-pixel mean and temporal variance (None without `variance`) of n frames, accumulated
    in place without storing them (a 1440×1080 frame is 12 MB in float64)."""
    total = snap(camera)
    total_sq = total * total if variance else None
    for _ in range(n - 1):
        f = snap(camera)
        total += f
        if total_sq is not None:
            total_sq += np.multiply(f, f, out=f)
    mean = np.divide(total, n, out=total)
    if total_sq is None:
        return mean, None
    var = np.maximum(total_sq / n - mean * mean, 0.0) * (n / max(n - 1, 1))
    return mean, var


def saturation_level(camera) -> float:
    """Counts at or above this are treated as clipped: read noise spreads a full well a few DN
    below the top code, so the top code alone undercounts saturation."""
    return 0.98 * camera.max_dn


MAX_SEARCH_EXPOSURE_S = 1.0  # the longest exposure the calibration searches


def find_exposure(
    bench,
    black_dn: float,
    target: float = 0.7,
    tolerance: float = 0.08,
    max_steps: int = 12,
    max_exposure_s: float = MAX_SEARCH_EXPOSURE_S,
) -> tuple[float, float]:
    """An exposure whose brightest white-field pixels sit near `target` of the usable range.

    Returns (exposure_s, peak fraction). Refuses, with what to change, when even the shortest
    exposure saturates or the longest one stays too dark.
    """
    cam = bench.camera
    lo, hi = cam.exposure_range_s[0], min(cam.exposure_range_s[1], max_exposure_s)
    usable = cam.max_dn - black_dn
    bench.display.show(uniform(bench, 1.0))
    set_lights(bench, True)
    exposure = min(max(cam.exposure_s, lo), hi)
    frac = 0.0
    for _ in range(max_steps):
        cam.exposure_s = exposure
        frame = snap(cam)
        saturated = float(np.mean(frame >= saturation_level(cam)))
        frac = float(np.percentile(frame, 99.9) - black_dn) / usable
        if saturated > 1e-4:
            if exposure <= lo:
                raise CalibrationError(
                    f"exposure: the white field saturates {100 * saturated:.2f}% of the sensor "
                    f"even at the shortest exposure ({lo} s): lower the light level or add an "
                    "ND filter"
                )
            exposure = max(lo, exposure / 4)
            continue
        if abs(frac - target) <= tolerance or (exposure <= lo and frac > target):
            return exposure, frac
        if exposure >= hi and frac < target:
            if frac < 0.05:
                raise CalibrationError(
                    f"exposure: the white field reaches only {100 * frac:.1f}% of full scale at "
                    f"the longest exposure ({hi} s): switch the light on, raise its level, open "
                    "the shutter or check the optics are not blocked"
                )
            return exposure, frac  # dim but usable
        exposure = float(np.clip(exposure * target / max(frac, 1e-3), lo, hi))
    if frac < 0.05:
        raise CalibrationError(
            f"exposure: the white field stays at {100 * frac:.1f}% of full scale: too dark to fit"
        )
    return exposure, frac


def measure_dark(bench, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean dark frame and per-pixel temporal read noise (DN), with every light off."""
    set_lights(bench, False)
    bench.display.blank()
    mean, var = mean_frame(bench.camera, frames)
    return mean, np.sqrt(var)


def measure_background(bench, dark: np.ndarray, frames: int) -> np.ndarray:
    """Stray light (DN/s): light on, display black; what the frontend records without a scene."""
    bench.display.show(uniform(bench, 0.0))
    set_lights(bench, True)
    mean, _ = mean_frame(bench.camera, frames, variance=False)
    return (mean - dark) / bench.camera.exposure_s


def photon_transfer(
    bench, dark: np.ndarray, mask: np.ndarray, levels: np.ndarray
) -> tuple[float, float, dict]:
    """Conversion gain (e-/DN) and read noise (e-) from the mean-variance line of frame pairs.

    The difference of two frames of the same scene cancels fixed-pattern structure, so its
    variance / 2 is the temporal noise; shot noise makes it grow as mean / gain.
    """
    set_lights(bench, True)
    means, variances = [], []
    for level in levels:
        bench.display.show(uniform(bench, float(level)))
        a, b = snap(bench.camera), snap(bench.camera)
        ok = mask & (a < saturation_level(bench.camera)) & (b < saturation_level(bench.camera))
        means.append(float(np.mean(((a + b) / 2 - dark)[ok])))
        variances.append(float(np.var((a - b)[ok]) / 2))
    slope, intercept = np.polyfit(means, variances, 1)
    if slope <= 0:
        raise CalibrationError(
            "photon transfer: noise does not grow with signal; is the camera's auto gain on?"
        )
    gain = 1.0 / slope
    read_e = float(np.sqrt(max(intercept - 1 / 12, 0.0))) * gain
    return gain, read_e, {"mean_dn": means, "var_dn": variances}


def display_response(
    bench,
    dark: np.ndarray,
    background: np.ndarray,
    mask: np.ndarray,
    levels: np.ndarray,
    frames: int,
) -> tuple[np.ndarray, float]:
    """Relative light out of the display per drive level (1 at level 1), and its gamma."""
    set_lights(bench, True)
    exposure = bench.camera.exposure_s
    signal = []
    for level in levels:
        bench.display.show(uniform(bench, float(level)))
        mean, _ = mean_frame(bench.camera, frames, variance=False)
        signal.append(float(np.mean((mean - dark - background * exposure)[mask])))
    response = np.asarray(signal) / signal[-1]
    fit = (levels > 0.1) & (response > 0.01)
    if fit.sum() < 2:
        raise CalibrationError("display response: too few usable gray levels to fit a gamma")
    gamma = float(np.polyfit(np.log(levels[fit]), np.log(response[fit]), 1)[0])
    return response.astype(np.float32), gamma
