"""Bench files: TOML validated by pydantic, with one line naming the key when something is wrong.

A bench file gives only the sections and keys it changes; the rest keep their defaults. With no
bench file the bench is the simulated one.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hil.errors import UserError
from sim.params import SimParams


class DeviceChoice(BaseModel):
    """The driver that runs this device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["sim"] = Field("sim", description="driver backend")


class DevicesConfig(BaseModel):
    """Which driver runs each device of the bench."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    display: DeviceChoice = Field(DeviceChoice(), description="display or SLM showing the inputs")
    camera: DeviceChoice = Field(DeviceChoice(), description="camera behind the frontend")
    light: DeviceChoice = Field(DeviceChoice(), description="light source of the display")


class BenchConfig(BaseModel):
    """A bench: its devices, and the simulated world used when they are simulated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("simulated bench", description="a name for run records")
    devices: DevicesConfig = DevicesConfig()
    sim: SimParams = SimParams()


def _one_line(path: str, err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section = _section_of(first["loc"][:-1])
        allowed = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
        msg = f"unknown key{hint}"
    else:
        msg = f"{first['msg'][0].lower()}{first['msg'][1:]} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{path}: {loc}: {msg}{more}"


def _section_of(loc: tuple) -> type[BaseModel] | None:
    model: Any = BenchConfig
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not isinstance(field.annotation, type):
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def parse_bench(data: dict, source: str = "bench") -> BenchConfig:
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(source, e)) from None


def load_bench(path: Path | str | None) -> BenchConfig:
    """The bench in `path`, or the default simulated bench when path is None."""
    if path is None:
        return BenchConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: bench file not found (write one with `hil bench init`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read bench file: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    return parse_bench(data, str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: BaseModel, comments: bool = True) -> str:
    """TOML for a config; with comments, each key carries its meaning."""
    lines: list[str] = []

    def section(model: BaseModel, name: str) -> None:
        scalars = {
            k: f
            for k, f in type(model).model_fields.items()
            if not isinstance(getattr(model, k), BaseModel)
        }
        if scalars:
            if name:
                doc = (type(model).__doc__ or "").strip().splitlines()
                lines.extend(["", *([f"# {doc[0]}"] if comments and doc else []), f"[{name}]"])
            for key, info in scalars.items():
                if comments and info.description:
                    lines.append(f"# {info.description}")
                lines.append(f"{key} = {_toml_value(getattr(model, key))}")
        for key in type(model).model_fields:
            child = getattr(model, key)
            if isinstance(child, BaseModel):
                section(child, f"{name}.{key}" if name else key)

    section(config, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def default_bench_toml() -> str:
    head = (
        "# hil bench file. Every key is optional: remove what you do not change.\n"
        "# The [sim.*] sections describe the simulated bench (the digital twin of a real one).\n"
    )
    return head + to_toml(BenchConfig())
