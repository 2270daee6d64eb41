"""The `hil` command line: one module per command group, each thin (parse, call a job, print).

Every command that touches the bench takes `--bench FILE` (default: the simulated bench); every
command that does work writes a run folder under `--runs-dir` and prints its result object on
stdout with `--json`. Heavy imports wait inside the commands, so `hil --help` stays quick.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Annotated

import typer

import hil
from calibration.errors import CalibrationError
from drivers.errors import DeviceError
from hil.cli import (
    bench,
    calibrate,
    capture,
    demo,
    estimate,
    evaluate,
    finetune,
    sim,
    teacher,
    train,
)
from hil.cli.common import ProseGroup, err, out
from hil.errors import Terminated, UserError
from hil.interrupts import arm, interrupt, stopping

# the order a lab uses them in, which `hil --help` lists them in
LAB_ORDER = (
    "bench",
    "devices",
    "estimate",
    "teacher",
    "train",
    "calibrate",
    "capture",
    "finetune",
    "evaluate",
    "demo",
    "sim",
)


class _LabOrder(ProseGroup):
    """Lists commands and groups together in LAB_ORDER (typer puts every group last)."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: LAB_ORDER.index(n) if n in LAB_ORDER else len(names))


app = typer.Typer(
    cls=_LabOrder,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(bench.app, name="bench")
app.command("devices")(bench.devices)
app.command("estimate")(estimate.estimate_cmd)
app.add_typer(teacher.app, name="teacher")
app.command("train")(train.train_cmd)
app.command("calibrate")(calibrate.calibrate_cmd)
app.command("capture")(capture.capture_cmd)
app.command("finetune")(finetune.finetune_cmd)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command("demo")(demo.demo)
app.add_typer(sim.app, name="sim")


def _version(value: bool) -> None:
    if value:
        out.print(f"hil {hil.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Bring hybrid optical neural networks from simulation onto a real bench.

    Calibrate a fabricated optical frontend, capture its feature maps, and fine-tune the digital
    backend against an electronic teacher (NTKD). The commands are listed in the order a lab
    uses them: write a bench file, check its devices, estimate how many kernels to make, train a
    teacher and the optical student, then, with the optic fabricated, calibrate the bench,
    capture feature maps, fine-tune the backend on them and evaluate it live. `hil demo` runs
    all of it on a simulated bench.

    Start with `hil bench init bench.toml`, then `hil devices --bench bench.toml`.
    """


class _WarningsToStderr(logging.Handler):
    """Warnings (a simulated fallback, a retry) reach the person; errors are printed by main."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            print(f"warning: {record.getMessage()}", file=sys.stderr)


def main() -> None:
    """Entry point: user and device errors end in one line on stderr, not a traceback.

    SIGTERM unwinds like Ctrl-C, so benches switch their light off when a job is killed politely.
    """
    arm()
    _terminated.clear()
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup, &)
        signal.signal(signal.SIGINT, lambda *_: interrupt(KeyboardInterrupt))
    hil_log = logging.getLogger("hil")
    if not any(isinstance(h, _WarningsToStderr) for h in hil_log.handlers):
        hil_log.addHandler(_WarningsToStderr())
    try:
        code = app(prog_name="hil", standalone_mode=False)  # usage errors: one line, as the rest
    except typer.TyperException as e:
        where = getattr(getattr(e, "ctx", None), "command_path", None)
        hint = f" (see `{where} --help`)" if where else ""
        if e.format_message():  # empty when the help was shown instead (`hil` alone)
            print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("error: aborted: an input ended early", file=sys.stderr)
        sys.exit(2)
    except (UserError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except DeviceError as e:
        print(f"device error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    except OSError as e:  # the machine, not hil: a full disk, a folder gone read-only
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("terminated" if _terminated else "interrupted")
        sys.exit(143 if _terminated else 130)
    if code == 130 and _terminated:  # typer turns a KeyboardInterrupt into exit code 130
        err.print("terminated")
        sys.exit(143)
    if isinstance(code, int) and code:
        sys.exit(code)


_terminated: list[bool] = []


def _terminate(*_) -> None:
    if not stopping():
        _terminated.append(True)
    interrupt(Terminated)


__all__ = ["app", "main"]
