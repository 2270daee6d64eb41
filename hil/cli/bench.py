"""`hil bench init` and `hil devices`: the bench file, and what of it opens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from hil.cli.common import BenchOpt, JsonOpt, emit, group, out
from hil.errors import UserError

app = group("Bench files: the devices and the simulated world.")


@app.command("init")
def bench_init(
    path: Annotated[Path, typer.Argument(help="Where to write the bench file.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented bench file with every key at its default."""
    from calibration.atomic import atomic_write_text
    from hil.bench.config import default_bench_toml

    if path.exists() and not force:
        raise UserError(f"{path}: exists already (use --force to overwrite)")
    atomic_write_text(path, default_bench_toml())
    out.print(f"wrote {path}")


def devices(bench: BenchOpt = None, as_json: JsonOpt = False) -> None:
    """List the installed driver backends, then open each device of the bench file once.

    A backend that fails to import is listed with the reason; a device that cannot open is
    reported, and the others are still tried.
    """
    from drivers import registry
    from hil.bench.assembly import Bench
    from hil.bench.config import load_bench

    config = load_bench(bench)
    backends = [vars(info) for info in registry.available()]
    rows = Bench(config).probe()
    result = {"bench": str(bench) if bench else None, "backends": backends, "devices": rows}
    if as_json:
        return emit(result, True)
    out.print(_backends_table(backends))
    out.print(_devices_table(rows, f"{config.name} ({bench or 'built-in default bench'})"))


def _backends_table(backends: list[dict[str, Any]]) -> Table:
    table = Table(title="installed driver backends (entry points: hil.drivers)")
    for col in ("kind", "backend", "from", "import"):
        table.add_column(col)
    for b in backends:
        status = "[green]ok[/]" if b["error"] is None else f"[red]failed[/]: {escape(b['error'])}"
        table.add_row(b["kind"], b["backend"], b["target"], status)
    return table


def _devices_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("device", "backend", "simulated", "state", "settings / error"):
        table.add_column(col)
    colours = {"ok": "green", "fallback": "yellow", "failed": "red"}
    hidden = ("name", "kind", "simulated", "backend")
    for r in rows:
        detail = ", ".join(f"{k}={v}" for k, v in r["detail"].items() if k not in hidden)
        simulated = {True: "yes", False: "no", None: "?"}[r["simulated"]]
        state = f"[{colours[r['state']]}]{r['state']}[/]"
        table.add_row(r["role"], r["backend"], simulated, state, escape(detail))
    return table
