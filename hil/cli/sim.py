"""`hil sim render`: what the camera of the simulated bench would record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import BenchOpt, JsonOpt, RunsOpt, emit, group, recorded

app = group("The simulated bench: see what the camera would see.")

ImageArg = Annotated[Path, typer.Argument(help="Input picture (PNG, JPEG, TIFF, .npy).")]
FrameOpt = Annotated[Path, typer.Option("--out", help="Frame PNG to write (16-bit).")]
TilesOpt = Annotated[
    Path | None, typer.Option("--tiles", help="Also write the cropped tiles as a PNG sheet.")
]
FillOpt = Annotated[
    float, typer.Option(min=0.05, max=1.0, help="Fraction of the input grid the image fills.")
]


@app.command("render")
def sim_render(
    image: ImageArg,
    out_path: FrameOpt,
    bench: BenchOpt = None,
    tiles: TilesOpt = None,
    fill: FillOpt = 0.75,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Show IMAGE on the simulated display and save the frame the camera records.

    The frame is a 16-bit PNG whose values are the camera's DN shifted to the top bits.
    """
    from hil.bench.config import load_bench
    from hil.jobs.render import render_image
    from hil.output.guard import check_output

    check_output(out_path, "image", {"IMAGE": image, "--bench": bench})
    config = load_bench(bench)
    args = {"image": str(image), "out": str(out_path), "tiles": str(tiles) if tiles else None}
    result = recorded(
        "sim render",
        runs_dir,
        config,
        args,
        lambda _: render_image(config, image, out_path, tiles, fill),
    )
    h, w = result["frame_shape"]
    summary = f"wrote {out_path} ({h}x{w}, max {result['max_dn']} DN); run {result['run_dir']}"
    emit(result, as_json, summary)
