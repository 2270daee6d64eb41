"""Kernel layout from fabrication constraints: how many kernels a metasurface holds, and where.

Stage 1 of NTKD (design, before fabrication). The metasurface (h x w µm) carries a symmetric grid of
square sub-optics of side k with at least d between neighbours, so

    rows = floor((h + d) / (k + d)),   cols = floor((w + d) / (k + d)).

Choices (the paper gives only the formula):

- **Signed kernels** are a positive and a negative sub-optic side by side in one row (as
  `sim.layout.TileLayout` places their tiles), so their aberrations and illumination match and the
  subtraction cancels them. A row holds ``cols // 2`` pairs; with an odd column count the last
  column stays empty rather than splitting a pair across rows.
- **Colour**: one sub-optic serves all channels of its kernel. Its PSF depends on the wavelength
  and a monochrome sensor integrates over the spectrum, so it records ``Σ_c x_c ⊛ PSF_c``: exactly
  one kernel over C channels. The channel count therefore never costs sub-optics (the published
  CIFAR-10 system: 16 signed 7x7x3 kernels on 32 sub-optics, a 4x8 grid).
- **On the sensor** each sub-optic's image of the scene lands under it, scaled by the
  magnification M from metasurface to sensor: a tile of ``k·M/p`` pixels (pixel pitch p) at a
  pitch of ``(k + d)·M/p`` pixels, the used grid centred on the sensor. Tiles are rounded to whole
  pixels, the tile down (a box never reaches beyond its sub-optic's image) and the pitch to the
  nearest, so neighbouring boxes never overlap.
- **Bench file**: ``[frontend]`` gets the kernel count, the PSF side in sensor pixels (the
  ONN's kernel size, not the sub-optic), signedness, channels and the gap. The simulated bench
  lays its tiles out itself (`TileLayout.grid`: most nearly square, each tile the display's size),
  so its grid can differ from the metasurface's (32 tiles: 6x6 there, 4x8 here).

Every impossible constraint is a `UserError` naming the constraint that binds and by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hil.bench.config import FrontendConfig, to_toml
from hil.errors import UserError
from sim.layout import TileLayout

__all__ = ["Layout", "design_layout", "layout_for_kernels"]

_EPS = 1e-9  # floor() tolerance: (h + d)/(k + d) computed for an exact fit may land a hair below


@dataclass(frozen=True)
class Layout:
    """A kernel layout on the metasurface and its image on the sensor."""

    rows: int  # sub-optic grid on the metasurface (slots, used or not)
    cols: int
    kernels: int  # kernels realised (a signed one takes a ± pair of sub-optics)
    tiles: int  # sub-optics used = feature-map tiles on the sensor
    kernel_um: float  # sub-optic side on the metasurface
    spacing_um: float
    pitch_um: float  # kernel_um + spacing_um
    tile_px: int  # side of one tile on the sensor
    gap_px: int  # dark gap between neighbouring tiles
    sensor_px: tuple[int, int]
    tile_boxes_px: list[tuple[int, int, int, int]]  # (y0, x0, h, w) per tile, in tile order
    frontend: FrontendConfig
    binding: list[str] = field(default_factory=list)  # what limits the layout, and the margins

    @property
    def capacity(self) -> int:
        """Kernels the grid could hold: ``rows · cols`` unsigned, ``rows · (cols // 2)`` signed."""
        return self.rows * (self.cols // 2 if self.frontend.signed else self.cols)

    def frontend_toml(self) -> str:
        """The bench file's ``[frontend]`` section for this layout."""
        return "[frontend]\n" + to_toml(self.frontend)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": [self.rows, self.cols],
            "kernels": self.kernels,
            "capacity": self.capacity,
            "tiles": self.tiles,
            "kernel_um": self.kernel_um,
            "spacing_um": self.spacing_um,
            "pitch_um": self.pitch_um,
            "tile_px": self.tile_px,
            "gap_px": self.gap_px,
            "sensor_px": list(self.sensor_px),
            "tile_boxes_px": [list(b) for b in self.tile_boxes_px],
            "frontend": self.frontend.model_dump(),
            "frontend_toml": self.frontend_toml(),
            "binding": list(self.binding),
        }


def positive(name: str, value: float, unit: str = "µm", allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{name} must be {bound} {unit} (got {value:g})")
    return value


def pair(name: str, value, unit: str) -> tuple[float, float]:
    try:
        h, w = value
    except (TypeError, ValueError):
        raise UserError(f"{name} must be two numbers, height and width (got {value!r})") from None
    return (
        positive(f"{name} height", h, unit),
        positive(f"{name} width", w, unit),
    )


def _fit(extent: float, k: float, d: float) -> int:
    return math.floor((extent + d) / (k + d) + _EPS)


def _slack(extent: float, n: int, k: float, d: float) -> tuple[float, float]:
    """(unused µm with n slots, µm more needed for one more slot)."""
    used = n * k + (n - 1) * d
    return round(extent - used, 6) + 0.0, round(used + d + k - extent, 6) + 0.0


def _sides(kernel_um: float, spacing_um: float) -> tuple[float, float]:
    return positive("kernel side", kernel_um), positive("spacing", spacing_um, allow_zero=True)


def _channels_and_kernel(channels: int, kernel_size_px: int) -> int:
    """The kernel size in whole pixels, once channels and kernel size are checked."""
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3 (got {channels})")
    if int(kernel_size_px) < 1:
        raise UserError(f"kernel size must be >= 1 px (got {kernel_size_px})")
    return int(kernel_size_px)


@dataclass(frozen=True)
class _Grid:
    """The formula's grid: rows x cols sub-optics of side k, d apart, on an h x w metasurface."""

    h: float
    w: float
    k: float
    d: float
    rows: int
    cols: int
    signed: bool

    @property
    def per_row(self) -> int:
        return self.cols // 2 if self.signed else self.cols

    @property
    def capacity(self) -> int:
        return self.rows * self.per_row


def _grid(h: float, w: float, k: float, d: float, signed: bool) -> _Grid:
    """The largest symmetric grid, or the constraint that leaves no kernel."""
    for name, extent in (("height", h), ("width", w)):
        if extent < k:
            raise UserError(
                f"metasurface {name} {extent:g} µm < one kernel {k:g} µm: nothing fits; "
                f"shrink the kernel by {k - extent:g} µm or enlarge the metasurface"
            )
    grid = _Grid(h, w, k, d, _fit(h, k, d), _fit(w, k, d), signed)
    if grid.capacity == 0:  # signed with a single column
        need = 2 * k + d
        raise UserError(
            f"a signed kernel needs a ± pair of sub-optics side by side ({need:g} µm = 2 x "
            f"{k:g} + {d:g} µm), the metasurface width is {w:g} µm: the width binds "
            f"(short by {need - w:g} µm); zero kernels after pairing"
        )
    return grid


def _margins(g: _Grid) -> list[str]:
    """What limits the grid along each side, and by how much."""
    binding: list[str] = []
    for name, extent, n in (("height", g.h, g.rows), ("width", g.w, g.cols)):
        spare, more = _slack(extent, n, g.k, g.d)
        binding.append(
            f"{name}: {n} x {g.k + g.d:g} µm pitch uses {extent - spare:g} of {extent:g} µm "
            f"({spare:g} µm spare; one more {'row' if name == 'height' else 'column'} needs "
            f"{more:g} µm more)"
        )
    if g.signed and g.cols % 2:
        binding.append(f"signed pairs: {g.cols} columns is odd, the last column stays empty")
    return binding


def _kernel_count(g: _Grid, kernels: int | None, binding: list[str]) -> int:
    """The kernels realised: all that fit by default, else ``kernels`` if the grid holds them."""
    if kernels is None:
        return g.capacity
    kernels = int(kernels)
    if kernels < 1:
        raise UserError(f"kernels must be >= 1 (got {kernels})")
    if kernels > g.capacity:
        per = "signed kernels, 2 sub-optics each" if g.signed else "kernels"
        raise UserError(
            f"{kernels} kernels do not fit: a {g.rows} x {g.cols} grid of {g.k:g} µm sub-optics "
            f"(spacing {g.d:g} µm) on {g.h:g} x {g.w:g} µm holds {g.capacity} {per}; "
            f"the metasurface binds (short by {kernels - g.capacity} "
            f"kernel{'s' if kernels - g.capacity > 1 else ''})"
        )
    if kernels < g.capacity:
        binding.append(f"{g.capacity - kernels} of {g.capacity} kernel slots left unused")
    return kernels


def _sensor_tiles(
    g: _Grid, tiles: int, mag: float, pixel: float, sensor_hw: tuple[int, int], kernel_px: int
) -> tuple[int, int, list[tuple[int, int, int, int]], str]:
    """(tile px, gap px, boxes, the sensor's margin): each sub-optic's image lands under it,
    scaled by the magnification ``mag`` in pixels of pitch ``pixel``, the used grid centred."""
    (sh, sw), k, scale = sensor_hw, g.k, mag / pixel
    tile_px = math.floor(k * scale + _EPS)
    if tile_px < kernel_px:
        need_mag = kernel_px * pixel / k
        need_pix = k * mag / kernel_px
        raise UserError(
            f"one sub-optic images to {k * scale:.3g} px on the sensor ({k:g} µm x {mag:g} / "
            f"{pixel:g} µm), smaller than the {kernel_px} px kernel: the pixel pitch binds "
            f"(needs magnification >= {need_mag:.3g} or pixels <= {need_pix:.3g} µm)"
        )
    gap_px = max(0, round((k + g.d) * scale) - tile_px)
    pitch_px = tile_px + gap_px
    grid_cols = min(2 * g.per_row if g.signed else g.cols, tiles)  # odd last column stays dark
    grid_rows = math.ceil(tiles / grid_cols)
    need_h, need_w = grid_rows * pitch_px - gap_px, grid_cols * pitch_px - gap_px
    if need_h > sh or need_w > sw:
        short = f"{max(0, need_h - sh)} x {max(0, need_w - sw)}"
        raise UserError(
            f"{tiles} tiles ({grid_rows} x {grid_cols} at a {pitch_px} px pitch, {tile_px} px "
            f"each) need {need_h} x {need_w} px on the sensor, which has {sh} x {sw} px: the "
            f"sensor binds (short by {short} px)"
        )
    layout = TileLayout(tiles, tile_px, tile_px, gap_px, grid_cols)
    y_off, x_off = (sh - need_h) // 2 - gap_px, (sw - need_w) // 2 - gap_px
    boxes = [(y + y_off, x + x_off, bh, bw) for y, x, bh, bw in layout.boxes]
    margin = (
        f"sensor: tiles cover {need_h} x {need_w} of {sh} x {sw} px "
        f"({tile_px} px tiles, {gap_px} px gaps)"
    )
    return tile_px, gap_px, boxes, margin


def design_layout(  # noqa: PLR0913  one argument per fabrication constraint, named at every call
    metasurface_um: tuple[float, float],
    kernel_um: float,
    spacing_um: float,
    *,
    pixel_um: float,
    sensor_px: tuple[int, int],
    magnification: float = 1.0,
    signed: bool = True,
    channels: int = 1,
    kernel_size_px: int = 7,
    kernels: int | None = None,
) -> Layout:
    """The largest symmetric grid of ``kernel_um`` sub-optics on the metasurface, and its tiles.

    ``kernels``: realise only this many (the first tiles in row-major order); default every kernel
    that fits. ``kernel_size_px`` is the PSF side in sensor pixels written to ``[frontend]``
    (the ONN's kernel size); it must fit inside one tile.
    """
    (h, w), k, d = pair("metasurface", metasurface_um, "µm"), *_sides(kernel_um, spacing_um)
    pixel = positive("pixel pitch", pixel_um)
    mag = positive("magnification", magnification, unit="")
    sh, sw = (int(v) for v in pair("sensor", sensor_px, "px"))
    kernel_size_px = _channels_and_kernel(channels, kernel_size_px)
    grid = _grid(h, w, k, d, signed)
    binding = _margins(grid)
    kernels = _kernel_count(grid, kernels, binding)
    tiles = 2 * kernels if signed else kernels
    tile_px, gap_px, boxes, margin = _sensor_tiles(
        grid, tiles, mag, pixel, (sh, sw), kernel_size_px
    )
    binding.append(margin)
    if gap_px > 1024:
        raise UserError(f"tile gap {gap_px} px exceeds the bench file's 1024 px bound")
    try:
        frontend = FrontendConfig(
            kernels=kernels,
            kernel_size=kernel_size_px,
            signed=signed,
            channels=channels,
            tile_gap_px=gap_px,
        )
    except ValueError as e:  # pydantic bounds (e.g. more than 1024 kernels)
        raise UserError(f"[frontend] cannot hold this layout: {e}") from None
    return Layout(
        rows=grid.rows,
        cols=grid.cols,
        kernels=kernels,
        tiles=tiles,
        kernel_um=k,
        spacing_um=d,
        pitch_um=k + d,
        tile_px=tile_px,
        gap_px=gap_px,
        sensor_px=(sh, sw),
        tile_boxes_px=boxes,
        frontend=frontend,
        binding=binding,
    )


def layout_for_kernels(
    kernels: int,
    metasurface_um: tuple[float, float],
    spacing_um: float,
    *,
    signed: bool = True,
    **sensor: Any,
) -> Layout:
    """``kernels`` kernels on the metasurface with the largest sub-optics that fit.

    For a candidate kernel count the sub-optic side is free: larger sub-optics collect more light
    and resolve more, so take the grid (rows x cols, an even column count when signed) whose
    sub-optic side ``min((h + d)/rows, (w + d)/cols) - d`` is largest. The layout is then
    `design_layout` at that side: its grid is the formula's, which may hold more kernels than
    asked (the spare slots stay empty and are noted in ``binding``). ``sensor``: the keyword
    arguments of `design_layout` for the sensor side.
    """
    h, w = pair("metasurface", metasurface_um, "µm")
    d = positive("spacing", spacing_um, allow_zero=True)
    kernels = int(kernels)
    if kernels < 1:
        raise UserError(f"kernels must be >= 1 (got {kernels})")
    n = 2 * kernels if signed else kernels
    best = 0.0
    for r in range(1, n + 1):
        c = math.ceil(n / r)
        if signed and c % 2:
            c += 1
        best = max(best, min((h + d) / r, (w + d) / c) - d)
    if best <= 0:
        raise UserError(
            f"{n} sub-optics with {d:g} µm spacing leave no room on {h:g} x {w:g} µm: "
            "the spacing binds; reduce it or the kernel count"
        )
    return design_layout((h, w), best, d, signed=signed, kernels=kernels, **sensor)
