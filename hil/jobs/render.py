"""What the camera of the simulated bench records for given pictures, and its raw feature maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from drivers.protocols import Frame
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig
from hil.bench.design import grid_origin
from hil.data.images import read_image
from hil.data.placement import place_on_display
from hil.output.figures import save_frame_png, save_map_sheet
from sim.psf_frontend import PSFFrontend, signed_combine
from sim.sensor import Sensor


def snap_dark(bench: Bench, frames: int = 8) -> np.ndarray:
    """Mean of `frames` frames with the light off: the dark level to subtract."""
    bench.light.off()
    return np.mean(
        [bench.camera.snap(bench.camera.frame_timeout_s()).image for _ in range(frames)], axis=0
    )


def snap_levels(bench: Bench, levels: list[np.ndarray]) -> list[Frame]:
    """Show each display image with the light on and record one frame of it."""
    bench.light.on()
    frames = []
    for lv in levels:
        bench.display.show(lv)
        frames.append(bench.camera.snap(bench.camera.frame_timeout_s()))
    bench.light.off()
    return frames


def raw_feature_maps(bench: Bench, frame: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """Dark-subtracted design tiles in irradiance units, ± pairs subtracted: (m, H, W).

    Uncalibrated on purpose: design tile boxes and the nominal sensor response, so what differs
    from the design is what calibration will have to find.
    """
    design, sensor = bench.design, Sensor(bench.config.sim.sensor)
    scale = sensor.gain_e_per_dn / (sensor.params.flux_e_per_s * bench.camera.exposure_s)
    signal = torch.as_tensor((frame - dark) * scale, dtype=torch.float32)
    tiles = torch.stack([signal[y : y + h, x : x + w] for y, x, h, w in design.tile_boxes])
    return (signed_combine(tiles) if design.signed else tiles).numpy()


def designed_feature_maps(bench: Bench, levels: np.ndarray) -> np.ndarray:
    """The design's noise-free feature maps of an input-grid image: what the ONN was trained
    on."""
    d = bench.design
    optic = PSFFrontend(
        d.kernels,
        d.kernel_size,
        d.channels,
        d.signed,
        psfs=torch.from_numpy(d.psfs.astype(np.float32)),
        trainable=False,
    )
    x = torch.as_tensor(levels, dtype=torch.float32)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    with torch.no_grad():
        return optic(x)[0].numpy()


def render_image(
    config: BenchConfig, image: Path, out: Path, tiles: Path | None, fill: float
) -> dict[str, Any]:
    channels = config.frontend.channels
    with Bench(config) as bench:
        design, display = bench.design, bench.display
        grid_origin(design, display.shape, f"display {display.name!r}")
        levels = place_on_display(read_image(image, channels), design.hw, fill)
        dark = snap_dark(bench)
        (frame,) = snap_levels(bench, [design.on_display(levels, display.shape[:2])])
        save_frame_png(frame.image, bench.camera.bit_depth, out)
        if tiles is not None:
            rows = [
                ("designed", designed_feature_maps(bench, levels)),
                ("captured", raw_feature_maps(bench, frame.image, dark)),
            ]
            save_map_sheet(rows, tiles, f"{image.name}: feature maps, design vs simulated bench")
        return {
            "frame": str(out),
            "tiles": str(tiles) if tiles else None,
            "frame_shape": list(frame.image.shape),
            "bit_depth": bench.camera.bit_depth,
            "png_scale": 2 ** (16 - bench.camera.bit_depth),
            "max_dn": int(frame.image.max()),
            "saturated_fraction": float((frame.image >= bench.camera.max_dn).mean()),
            "simulated": bench.simulated,
            "bench": bench.snapshot(),
        }
