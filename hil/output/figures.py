"""Pictures a person can open: raw frames as 16-bit PNG, feature maps as labelled sheets."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import matplotlib.patches

from calibration.atomic import atomic_path
from calibration.model import tile_maps

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save_frame_png(image_dn: np.ndarray, bit_depth: int, path: Path | str) -> None:
    """A camera frame as a lossless 16-bit PNG, DN shifted to the top bits so viewers show it."""
    scaled = np.asarray(image_dn, np.uint16) << np.uint16(16 - bit_depth)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), scaled):
            raise OSError(f"could not write {path}")


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
    save_figure(fig, path)


def save_calibration_plots(cal, design_psfs: np.ndarray, out_dir: Path) -> dict[str, Path]:
    """The pictures a person checks after `hil calibrate`: PSFs, registration, photometry."""
    out_dir = Path(out_dir)
    paths = {
        "psfs": out_dir / "psfs.png",
        "residuals": out_dir / "residuals.png",
        "photometry": out_dir / "photometry.png",
        "subimages": out_dir / "subimages.png",
        "registration": out_dir / "registration.png",
    }
    labels = [f"{p // 2}{'+-'[p % 2]}" if cal.signed else str(p) for p in range(cal.tiles)]
    outlines = [grid_outline(m, cal.input_shape) for m in tile_maps(cal)]
    title = "bright field: each sub-image's input grid as registered, labelled by its kernel"
    save_subimages_png(cal.bright_field_dn_per_s, outlines, labels, paths["subimages"], title)
    kernels = next(s for s in cal.steps if s["name"] == "kernels")
    save_registration_png(kernels, cal.frame_shape, paths["registration"])
    design = design_psfs.sum(axis=1)
    measured = cal.psfs.sum(axis=1)
    norm = measured.sum(axis=(1, 2), keepdims=True) / design.sum(axis=(1, 2), keepdims=True)
    rows = [("designed", design * norm), ("measured", measured)]
    save_map_sheet(rows, paths["psfs"], "PSFs per tile (design scaled to the measured sum)")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    tiles = np.arange(len(cal.psfs))
    axes[0].bar(tiles, cal.registration_rms_px)
    axes[0].set(xlabel="tile", ylabel="px", title="registration RMS residual")
    axes[1].bar(tiles, cal.psf_residual)
    axes[1].set(xlabel="tile", ylabel="relative", title="PSF fit residual")
    save_figure(fig, paths["residuals"])

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    levels = np.asarray(cal.display_levels)
    axes[0].plot(levels, cal.display_response, "o", ms=3, label="measured")
    axes[0].plot(levels, levels**cal.display_gamma, "-", label=f"gamma {cal.display_gamma:.2f}")
    axes[0].set(xlabel="drive level", ylabel="relative light", title="display response")
    axes[0].legend(fontsize=8)
    ptc = next((s for s in cal.steps if s["name"] == "photon transfer"), None)
    if ptc:
        mean = np.asarray(ptc["mean_dn"])
        axes[1].plot(mean, ptc["var_dn"], "o", ms=3)
        axes[1].plot(mean, mean / cal.conversion_gain_e_per_dn + np.median(cal.read_noise_dn) ** 2)
        axes[1].set(
            xlabel="mean (DN)",
            ylabel="variance (DN²)",
            title=f"photon transfer: {cal.conversion_gain_e_per_dn:.2f} e-/DN",
        )
    im = axes[2].imshow(cal.illumination, cmap="viridis")
    axes[2].set(title="display illumination (input grid)", xticks=[], yticks=[])
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    save_figure(fig, paths["photometry"])
    return paths


def save_figure(fig, path: Path | str) -> Path:
    """Lay out, write atomically (a person never opens half a picture) and close."""
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def save_confusion_png(
    matrix: np.ndarray, path: Path | str, title: str = "", names: list[str] | None = None
) -> Path:
    """The confusion matrix as a picture: counts in each cell, rows true, columns predicted."""
    matrix = np.asarray(matrix)
    k = len(matrix)
    names = names or [str(c) for c in range(k)]
    fig = Figure(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k))
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    if k <= 30:
        top = matrix.max()
        for (i, j), v in np.ndenumerate(matrix):
            color = "white" if v > 0.6 * top else "black"
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k), names, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_overlay_png(
    images: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    path: Path | str,
    title: str = "",
) -> Path:
    """A row per sample: the shown image, the true mask over it, the predicted mask over it.

    `images` (N, H, W) or (N, H, W, 3) in [0, 1]; masks (N, H, W) on the same grid.
    """
    n = len(images)
    fig = Figure(figsize=(6.0, 2.0 * n + (0.4 if title else 0.0)))
    axes = fig.subplots(n, 3, squeeze=False)
    for r in range(n):
        image = images[r] if images[r].ndim == 3 else np.repeat(images[r][..., None], 3, axis=2)
        for c, (label, mask) in enumerate(
            (("shown", None), ("true", truth), ("predicted", predicted))
        ):
            ax = axes[r, c]
            ax.imshow(image, vmin=0, vmax=1, interpolation="nearest")
            if mask is not None:  # background (0) and IGNORE stay clear
                shaded = np.ma.masked_less_equal(mask[r], 0)
                ax.imshow(shaded, cmap="autumn", alpha=0.55, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def save_subimages_png(
    signal: np.ndarray, outlines: list[np.ndarray], labels: list[str], path: Path | str, title=""
) -> Path:
    """The bright-field frame with every found sub-image outlined and labelled at its centre
    (by its kernel once assigned, by its found order when calibration stopped before);
    `outlines` are closed polygons (N, 2) of sensor (x, y)."""
    fig = Figure(figsize=(8, 8 * signal.shape[0] / max(signal.shape[1], 1) + 0.6))
    ax = fig.add_subplot()
    ax.imshow(signal, cmap="gray", vmin=0, vmax=max(float(np.percentile(signal, 99.5)), 1e-12))
    for outline, label in zip(outlines, labels, strict=True):
        closed = np.vstack([outline, outline[:1]])
        ax.plot(closed[:, 0], closed[:, 1], color="tab:orange", lw=1)
        cx, cy = outline.mean(axis=0)
        ax.text(cx, cy, label, color="tab:orange", fontsize=8, ha="center", va="center")
    ax.set(title=title or "bright field: sub-images found", xticks=[], yticks=[])
    return save_figure(fig, path)


def box_outline(box) -> np.ndarray:
    """The corners (4, 2) of a (y0, x0, h, w) box of pixels, as a polygon."""
    y0, x0, h, w = box
    return np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]]) - 0.5


def grid_outline(tile_map, input_hw) -> np.ndarray:
    """The input grid's edge (4·16, 2) on the sensor through a tile's map (distortion shown)."""
    h, w = input_hw
    t = np.linspace(0, 1, 16, endpoint=False)
    x0, x1, y0, y1 = -0.5, w - 0.5, -0.5, h - 0.5
    edge = np.concatenate(
        [
            np.stack([x0 + (x1 - x0) * t, np.full_like(t, y0)], 1),
            np.stack([np.full_like(t, x1), y0 + (y1 - y0) * t], 1),
            np.stack([x1 - (x1 - x0) * t, np.full_like(t, y1)], 1),
            np.stack([np.full_like(t, x0), y1 - (y1 - y0) * t], 1),
        ]
    )
    return tile_map.to_sensor(edge)


def save_registration_png(geometry: dict, frame_hw, path: Path | str, gain: float = 0.0) -> Path:
    """Registration residuals on the sensor: an arrow per dot from the map's prediction to its
    spot, magnified (`gain`, default so that the largest is 4% of the frame)."""
    spots = [np.asarray(d["spots_px"]).reshape(-1, 2) for d in geometry["dots"]]
    miss = [np.asarray(d["miss_px"]).reshape(-1, 2) for d in geometry["dots"]]
    top = max((float(np.abs(m).max()) for m in miss if m.size), default=0.0)
    gain = gain or (0.04 * max(frame_hw) / top if top > 0 else 1.0)
    fig = Figure(figsize=(8, 8 * frame_hw[0] / max(frame_hw[1], 1) + 0.6))
    ax = fig.add_subplot()
    for s, m in zip(spots, miss, strict=True):
        if s.size:
            ax.quiver(
                s[:, 0],
                s[:, 1],
                m[:, 0] * gain,
                m[:, 1] * gain,
                angles="xy",
                scale_units="xy",
                scale=1,
                width=0.002,
                color="tab:blue",
            )
    ax.set(xlim=(-0.5, frame_hw[1] - 0.5), ylim=(frame_hw[0] - 0.5, -0.5), aspect="equal")
    ax.set_title(f"registration residuals, ×{gain:.0f} (largest {top:.3f} px)", fontsize=9)
    return save_figure(fig, path)
