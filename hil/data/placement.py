"""Putting images on the input grid: the one home of where an image lands and at what size.

The input grid (`[frontend] input_px`, `Design.hw`) is what the student is trained on; the
physical display shows it scaled and placed by `Design.on_display`, so no caller here sees the
display's own pixels. An image is scaled to FILL of the grid's shorter side (whole-pixel factors
when enlarged, so a grid pixel is a square of light) and centred on black. Training, rendering,
capture, the estimate and evaluation all place images here, and masks and teacher logits are
placed with the same arithmetic (`display_region`), so they land on the pixels the image does.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from hil.training.loop import IGNORE

__all__ = ["FILL", "display_region", "place_maps", "place_masks", "place_on_display", "to_display"]

FILL = 0.75  # of the grid's shorter side: what `hil train`, `hil capture` and `hil render` use

Region = tuple[int, int, int, int]  # (top, left, height, width) of the image on the grid


def place_on_display(image: np.ndarray, grid_hw: tuple[int, int], fill: float = FILL):
    """The image scaled to `fill` of the input grid's shorter side, centred on black.

    Upscaling repeats pixels (a grid pixel is a square of light); downscaling averages areas.
    """
    scale, (y, x, nh, nw) = _fit(image.shape[:2], grid_hw, fill)
    interp = cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA
    small = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.zeros((*grid_hw, *image.shape[2:]), np.float32)
    out[y : y + nh, x : x + nw] = small.reshape(nh, nw, *image.shape[2:])
    return out


def to_display(images: np.ndarray, grid_hw: tuple[int, int], fill: float = FILL) -> np.ndarray:
    """Images (N, C, h, w) placed on the input grid (H, W): (N, C, H, W), scaled and centred."""
    out = [place_on_display(img.transpose(1, 2, 0), grid_hw, fill) for img in images]
    out = np.asarray(out, np.float32)
    return out[:, None] if out.ndim == 3 else out.transpose(0, 3, 1, 2)


def display_region(
    image_hw: tuple[int, int], grid_hw: tuple[int, int], fill: float = FILL
) -> Region:
    """(top, left, height, width) of an image on the input grid: where `place_on_display` puts
    it, so masks and teacher logits land on the pixels the image does."""
    return _fit(image_hw, grid_hw, fill)[1]


def _fit(image_hw, grid_hw, fill: float) -> tuple[float, Region]:
    """(scale, region): the scale is whole when enlarging, the region centred."""
    (h, w), (dh, dw) = image_hw, grid_hw
    scale = fill * min(dh / h, dw / w)
    if scale >= 1:
        scale = int(scale)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return scale, ((dh - nh) // 2, (dw - nw) // 2, nh, nw)


def place_masks(masks: np.ndarray, grid_hw: tuple[int, int], fill: float = FILL) -> np.ndarray:
    """Masks (N, h, w) → (N, H, W) where the input grid has their images (nearest neighbour),
    the grid around them IGNORE: there the student sees black, not the scene."""
    top, left, nh, nw = display_region(masks.shape[-2:], grid_hw, fill)
    if masks.size and (masks.min() < 0 or masks.max() >= 2**16):
        raise ValueError("mask labels must lie in 0..65535")
    out = np.full((len(masks), *grid_hw), IGNORE, np.int64)
    for i, m in enumerate(masks):
        small = cv2.resize(m.astype(np.uint16), (nw, nh), interpolation=cv2.INTER_NEAREST)
        out[i, top : top + nh, left : left + nw] = small
    return out


def place_maps(maps: torch.Tensor, grid_hw: tuple[int, int], fill: float = FILL) -> torch.Tensor:
    """Maps (N, C, h, w), e.g. teacher logits, → (N, C, H, W) where the grid has the image:
    repeated pixels when enlarged, area means when shrunk (as for the image), zeros around."""
    top, left, nh, nw = display_region(maps.shape[-2:], grid_hw, fill)
    mode = "nearest" if nh >= maps.shape[-2] else "area"
    out = maps.new_zeros((*maps.shape[:-2], *grid_hw))
    out[..., top : top + nh, left : left + nw] = F.interpolate(maps, size=(nh, nw), mode=mode)
    return out
