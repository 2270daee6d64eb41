"""The optic's design, from the bench file alone: its `[frontend]` section and design checkpoint.

A real bench has no simulated world to ask, so the design never comes from one: it is a student's
PSFs (`design = "onn.pt"`, what went to fabrication) or, without one, the random design seeded by
`design_seed`, drawn by the same `sim` code the ONN's frontend uses. The simulated world is then
built from this design (see `hil.bench.assembly`), never the other way round.
"""

from __future__ import annotations

import numpy as np
import torch

from calibration.design import Design
from hil.bench.config import BenchConfig, FrontendConfig
from hil.errors import UserError
from hil.models.checkpoint import load_onn
from sim.layout import TileLayout
from sim.psf_frontend import PSFFrontend

GRID_KEYS = "[frontend] input_px, display_scale, display_origin_px"


def input_hw(config: BenchConfig) -> tuple[int, int]:
    """The input grid the design images onto each tile: `[frontend] input_px`."""
    h, w = config.frontend.input_px
    return int(h), int(w)


def square_side(config: BenchConfig, command: str) -> int:
    """The side of the square input grid a student of `command` is sized to."""
    h, w = input_hw(config)
    if h != w:
        raise UserError(
            f"[frontend] input_px = [{h}, {w}]: {command} sizes its student to a square input "
            "grid; give input_px = [n, n]"
        )
    return h


def grid_origin(design: Design, display_shape: tuple[int, ...], display: str) -> tuple[int, int]:
    """(x, y) of the input grid's top-left pixel on `display` (shape (H, W[, 3])): a user error
    naming the bench-file keys when the grid at its scale and origin does not fit it."""
    try:
        return design.origin_on(tuple(display_shape[:2]))
    except ValueError as e:
        raise UserError(f"{GRID_KEYS}: {e} ({display})") from None


def tile_layout(frontend: FrontendConfig, hw: tuple[int, int]) -> TileLayout:
    """The designed packed grid of tiles on the sensor (signed pairs side by side)."""
    tiles = frontend.kernels * (2 if frontend.signed else 1)
    return TileLayout.grid(tiles, hw, frontend.tile_gap_px, frontend.signed)


def random_psfs(frontend: FrontendConfig) -> torch.Tensor:
    """The seeded random design (P, C, k, k): what a bench without a design checkpoint has."""
    f = frontend
    optic = PSFFrontend(
        f.kernels, f.kernel_size, f.channels, f.signed, trainable=False, seed=f.design_seed
    )
    return optic.psfs


def design_from_student(frontend: FrontendConfig) -> torch.Tensor:
    """The PSFs of a trained student: what a lab sends to fabrication."""
    student = load_onn(frontend.design)
    s = student.spec
    have = (s.kernels, s.kernel_size, s.signed, s.channels)
    want = (frontend.kernels, frontend.kernel_size, frontend.signed, frontend.channels)
    if s.frontend != "psf" or have != want:
        raise UserError(
            f"[frontend] design = {frontend.design!r}: a {s.frontend} student with (kernels, "
            f"kernel_size, signed, channels) = {have}, but the section says {want}"
        )
    return student.frontend.psfs.detach()


def design_with(config: BenchConfig, psfs: torch.Tensor | np.ndarray) -> Design:
    """The bench's design with the given PSFs (P, C, k, k) on its designed tile grid."""
    f, hw = config.frontend, input_hw(config)
    return Design(
        kernels=f.kernels,
        kernel_size=f.kernel_size,
        signed=f.signed,
        channels=f.channels,
        tile_boxes=tuple(tile_layout(f, hw).boxes),
        psfs=torch.as_tensor(psfs).detach().cpu().numpy().astype(np.float64),
        hw=hw,
        display_scale=f.display_scale,
        display_origin=f.display_origin_px,
    )


def load_design(config: BenchConfig) -> Design:
    """The design the bench file describes: its checkpoint's PSFs, or the seeded random ones.

    On a simulated display, whose size the bench file gives, an input grid that does not fit it
    is refused here; a real display reports its size when opened (see `grid_origin`).
    """
    f = config.frontend
    design = design_with(config, design_from_student(f) if f.design else random_psfs(f))
    if config.devices.display.driver == "sim":
        d = config.sim.display
        grid_origin(design, (d.height, d.width), "[sim.display] height, width")
    return design
