"""`hil estimate`: the NTK estimate per kernel count, each candidate's layout, and the files.

The estimate itself is `hil.design.estimate`; the layouts are `hil.design.layout`. This job checks
the fabrication constraints before any computation, runs the estimate, lays out each candidate
and writes the table, the curve, the JSON record and one bench-file section per candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil.design.estimate import EstimateSettings, estimate, format_table, kernel_list, load
from hil.design.layout import design_layout, layout_for_kernels, pair, positive
from hil.errors import UserError
from hil.output.records import atomic_write_text, write_json

__all__ = ["LayoutConstraints", "run_estimate"]


@dataclass(frozen=True)
class LayoutConstraints:
    """The fabrication constraints a layout needs, validated: metasurface (h, w) µm, the spacing
    between sub-optics, the sensor's pixel pitch and size, the magnification onto it, and the
    sub-optic side (None: the largest that holds each candidate, `layout_for_kernels`)."""

    metasurface_um: tuple[float, float]
    spacing_um: float
    pixel_um: float
    sensor_px: tuple[int, int]
    magnification: float = 1.0
    kernel_um: float | None = None

    @classmethod
    def from_options(
        cls,
        metasurface_um: tuple[float, float] | None = None,
        spacing_um: float | None = None,
        pixel_um: float | None = None,
        sensor_px: tuple[int, int] | None = None,
        magnification: float = 1.0,
        kernel_um: float | None = None,
    ) -> LayoutConstraints | None:
        """The constraints from command-line options; None when none is given, and one line
        naming the missing options when only some are."""
        given = {
            "--metasurface-um": metasurface_um,
            "--spacing-um": spacing_um,
            "--pixel-um": pixel_um,
            "--sensor-px": sensor_px,
        }
        if all(v is None for v in given.values()) and kernel_um is None:
            return None
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"the layout needs {', '.join(missing)} as well")
        sensor = pair("sensor", sensor_px, "px")
        if any(v != int(v) for v in sensor):
            raise UserError(f"sensor size must be whole pixels (got {sensor_px!r})")
        if kernel_um is not None:
            positive("kernel side", kernel_um)
        return cls(
            metasurface_um=pair("metasurface", metasurface_um, "µm"),
            spacing_um=positive("spacing", spacing_um, allow_zero=True),
            pixel_um=positive("pixel pitch", pixel_um),
            sensor_px=(int(sensor[0]), int(sensor[1])),
            magnification=positive("magnification", magnification, unit=""),
            kernel_um=kernel_um,
        )

    def physical(self) -> dict[str, Any]:
        """The constraints as the result records them."""
        return {
            "metasurface_um": self.metasurface_um,
            "spacing_um": self.spacing_um,
            "magnification": self.magnification,
            "pixel_um": self.pixel_um,
            "sensor_px": self.sensor_px,
        }

    def layout(self, kernels: int, kernel_size: int, signed: bool, channels: int) -> dict:
        """``fits`` and the layout of ``kernels`` (`Layout.to_dict`), or the ``reason`` it
        does not fit."""
        sensor = {
            "magnification": self.magnification,
            "pixel_um": self.pixel_um,
            "sensor_px": self.sensor_px,
            "signed": signed,
            "kernel_size_px": kernel_size,
            "channels": channels,
        }
        try:
            if self.kernel_um is None:
                found = layout_for_kernels(kernels, self.metasurface_um, self.spacing_um, **sensor)
            else:
                found = design_layout(
                    self.metasurface_um, self.kernel_um, self.spacing_um, kernels=kernels, **sensor
                )
        except UserError as e:
            return {"fits": False, "reason": str(e)}
        return {"fits": True, **found.to_dict()}


def run_estimate(
    dataset: str,
    settings: EstimateSettings,
    out: Path | str = Path("estimate-output"),
    layout: LayoutConstraints | None = None,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    data_root: Path | str | None = None,
) -> dict[str, Any]:
    """`hil estimate`: the estimate per kernel count (`settings`), each candidate's layout under
    the constraints (`layout`), and the curve.

    With constraints each row gets ``layout``: ``fits`` and either the layout (grid, tile boxes,
    ``frontend_toml``) or the ``reason`` it does not fit. Bad input, or constraints no candidate
    fits (the smallest one's binding constraint is named), raise `UserError` before any
    computation. Writes into ``out`` ``estimate.md`` (the table), ``estimate.png``,
    ``estimate.json`` and, with a layout, ``layouts.json`` and ``frontend-M.toml`` per candidate
    that fits; the result has ``table`` (text) and ``files``. ``data_root``: where datasets that
    read files (mnist, cifar10) find them.
    """
    counts = kernel_list(settings.kernels)
    data = load(dataset, data_root)
    layouts: dict[int, dict[str, Any]] = {}
    if layout is not None:
        channels = int(data.images.shape[1])
        layouts = {
            m: layout.layout(m, settings.kernel_size, settings.signed, channels) for m in counts
        }
        if not any(lay["fits"] for lay in layouts.values()):
            raise UserError(
                f"no candidate fits ({', '.join(map(str, counts))} kernels); "
                f"{counts[0]} kernels: {layouts[counts[0]]['reason']}"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = estimate(data, settings, progress)
    if layout is not None:
        result["constraints"] = layout.physical() | {
            "kernel_size_px": settings.kernel_size,
            "kernel_um": layout.kernel_um,
        }
        for row in result["rows"]:
            row["layout"] = layouts[row["kernels"]]
    result["table"] = format_table(result)
    result["files"] = {k: str(v) for k, v in _write(result, out, layout is not None).items()}
    write_json(Path(result["files"]["result"]), result)
    return result


def _write(result: dict[str, Any], out: Path, with_layout: bool) -> dict[str, Path]:
    """The table, the curve and, with layouts, layouts.json and each fitting candidate's bench
    section; returns every file by name, with ``result`` (estimate.json) still to be written."""
    from hil.design.estimate import save_curve_png

    files = {k: out / n for k, n in (("table", "estimate.md"), ("curve", "estimate.png"))}
    atomic_write_text(files["table"], result["table"] + "\n")
    save_curve_png(result, files["curve"])
    if with_layout:
        files["layouts"] = out / "layouts.json"
        write_json(files["layouts"], {str(r["kernels"]): r["layout"] for r in result["rows"]})
        for row in result["rows"]:
            if row["layout"]["fits"]:
                key, name = f"frontend_{row['kernels']}", f"frontend-{row['kernels']}.toml"
                files[key] = out / name
                atomic_write_text(files[key], row["layout"]["frontend_toml"])
    files["result"] = out / "estimate.json"
    return files
