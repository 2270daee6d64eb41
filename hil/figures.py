"""Pictures a person can open: raw frames as 16-bit PNG, feature maps as labelled sheets."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_frame_png(image_dn: np.ndarray, bit_depth: int, path: Path | str) -> None:
    """A camera frame as a lossless 16-bit PNG, DN shifted to the top bits so viewers show it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    scaled = np.asarray(image_dn, np.uint16) << np.uint16(16 - bit_depth)
    if not cv2.imwrite(str(tmp), scaled):
        raise OSError(f"could not write {path}")
    os.replace(tmp, path)


def save_map_sheet(rows: list[tuple[str, np.ndarray]], path: Path | str, title: str = "") -> None:
    """One row of maps (m, H, W) per label; signed maps on a symmetric red-blue scale."""
    path = Path(path)
    m = max(maps.shape[0] for _, maps in rows)
    fig, axes = plt.subplots(
        len(rows), m, figsize=(1.3 * m + 1, 1.3 * len(rows) + 0.6), squeeze=False
    )
    for r, (label, maps) in enumerate(rows):
        signed = maps.min() < 0
        lim = float(np.abs(maps).max()) or 1.0
        for c in range(m):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < maps.shape[0]:
                cmap, lo = ("RdBu_r", -lim) if signed else ("gray", 0.0)
                ax.imshow(maps[c], cmap=cmap, vmin=lo, vmax=lim, interpolation="nearest")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
