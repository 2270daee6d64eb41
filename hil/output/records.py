"""Run records: every command that does work leaves a folder a person can open later.

A run folder holds the resolved bench config, the command and its arguments, package versions and
git revision, a log file, and `result.json` (written atomically, also when the run fails or is
interrupted, so an aborted run says so instead of vanishing). A command that computes with torch
records the device it ran on (`"device": "cpu"`) in `command.json` and `result.json`.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import hil
from calibration.atomic import atomic_write_text
from hil.bench.config import BenchConfig, to_toml

PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "h5py",
    "opencv-python",
    "harvesters",
    "genicam",
    "pyvisa",
    "pyvisa-py",
    "pyserial",
    "pydantic",
    "typer",
)

log = logging.getLogger("hil")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def git_revision() -> str | None:
    """The checkout's revision (with -dirty), or None outside a git checkout."""
    root = Path(hil.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "hil": hil.__version__,
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
    }


class Run:
    """A run folder for one command: `with Run(...) as run: ...; run.finish(result)`."""

    def __init__(
        self,
        command: str,
        runs_dir: Path | str = "runs",
        config: BenchConfig | None = None,
        args: dict[str, Any] | None = None,
        *,
        device: Any = None,
    ) -> None:
        self.command, self.config, self.args = command, config, dict(args or {})
        self.device = None if device is None else str(device)  # what it computed on
        self.runs_dir = Path(runs_dir)
        self.result: dict[str, Any] | None = None

    def __enter__(self) -> Run:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        slug = self.command.replace(" ", "-")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            folder = self.runs_dir / (f"{stamp}-{slug}" + (f"-{n}" if n else ""))
            try:
                folder.mkdir()
                break
            except FileExistsError:
                continue
        self.dir = folder
        self.started = time.time()
        self._handler = logging.FileHandler(folder / "run.log", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._handler)
        log.setLevel(logging.INFO)
        if self.config is not None:
            atomic_write_text(folder / "config.toml", to_toml(self.config, comments=False))
        command = {"command": self.command, "argv": sys.argv, "args": self.args}
        if self.device is not None:
            command["device"] = self.device
        write_json(folder / "command.json", command)
        write_json(folder / "environment.json", environment())
        log.info("hil %s: run folder %s", self.command, folder)
        return self

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Record success; returns the result object with the run's bookkeeping added."""
        self.result = self._stamp(result, "ok")
        write_json(self.dir / "result.json", self.result)
        return self.result

    def _stamp(self, result: dict[str, Any], status: str) -> dict[str, Any]:
        return {
            "command": self.command,
            "status": status,
            "run_dir": str(self.dir),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - self.started, 3),
            **({"device": self.device} if self.device is not None else {}),
            **result,
        }

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and self.result is None:
                status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
                log.error("hil %s %s: %s", self.command, status, exc)
                error = {"error": f"{exc_type.__name__}: {exc}"}
                write_json(self.dir / "result.json", self._stamp(error, status))
        finally:
            log.removeHandler(self._handler)
            self._handler.close()
