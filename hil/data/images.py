"""Reading a picture file (PNG, JPEG, TIFF, ... or .npy) as a float image in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from hil.errors import UserError

__all__ = ["read_image"]


def read_image(path: Path | str, channels: int = 1) -> np.ndarray:
    """An image file (PNG, JPEG, TIFF, ... or .npy) as float32 in [0, 1], (H, W) or (H, W, 3)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    if path.suffix.lower() == ".npy":
        try:
            img = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UserError(f"{path}: not a readable .npy array: {e}") from None
    else:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise UserError(f"{path}: not an image OpenCV can read")
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise UserError(f"{path}: expected a (H, W) or (H, W, 3) image, got {img.shape}")
    if np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float32) / np.iinfo(img.dtype).max
    img = np.asarray(img, np.float32)
    if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
        raise UserError(f"{path}: float images must hold values in [0, 1]")
    if channels == 1 and img.ndim == 3:
        img = img @ np.array([0.299, 0.587, 0.114], np.float32)  # Rec. 601 luma
    elif channels == 3 and img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img
