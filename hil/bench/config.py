"""Bench files: TOML validated by pydantic, with one line naming the key when something is wrong.

A bench file gives only the sections and keys it changes; the rest keep their defaults. With no
bench file the bench is the simulated one.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers import registry
from drivers.protocols import FaultInjection
from hil.errors import UserError
from sim.params import Section, SimParams

log = logging.getLogger("hil")


_Side = Annotated[int, Field(ge=1, le=4096)]
_Offset = Annotated[int, Field(ge=0, le=65535)]


class FrontendConfig(Section):
    """The optic as designed and fabricated: which kernels sit on the sensor, and how."""

    kernels: int = Field(8, ge=1, le=1024, description="number of kernels (feature maps)")
    kernel_size: int = Field(7, ge=1, le=256, description="kernel (PSF) side in input-grid pixels")
    signed: bool = Field(True, description="signed kernels as a positive/negative PSF pair")
    channels: Literal[1, 3] = Field(1, description="input colour channels (1 or 3)")
    tile_gap_px: int = Field(4, ge=0, le=1024, description="dark gap between tiles on the sensor")
    input_px: tuple[_Side, _Side] = Field(
        (32, 32), description="[h, w] of the input grid the student was trained on"
    )
    display_scale: int = Field(
        1, ge=1, le=64, description="physical display pixels per input pixel (whole pixels)"
    )
    display_origin_px: tuple[_Offset, _Offset] | None = Field(
        None, description="[x, y] display pixel of the input grid's top-left; default: centred"
    )
    design_seed: int = Field(
        0, ge=0, le=2**32 - 1, description="seed of the random design used without `design`"
    )
    design: str | None = Field(
        None,
        description="student checkpoint (`hil train`) whose PSFs went to fabrication; "
        "default: random, from design_seed",
    )


class DeviceConfig(BaseModel):
    """A device: its driver backend, then that backend's own keys (see `hil devices`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    backend: str = Field("sim", description="driver backend, or auto: `real`, else simulated")
    real: str | None = Field(None, description="with backend = auto, the backend to try first")
    # a camera's: how it rides out transient faults (drivers.protocols.RetryPolicy) and the
    # faults to rehearse them with, on any backend
    retries: int | None = Field(
        None, ge=0, le=100, description="camera: retries of a failed frame (default 5)"
    )
    retry_backoff_s: float | None = Field(
        None, ge=0, le=10, description="camera: pause before the first retry, doubled each time"
    )
    inject: FaultInjection | None = Field(
        None, description="camera: faults to rehearse, e.g. {timeouts = 2, after_frames = 50}"
    )

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def driver(self) -> str:
        """The backend whose keys this section holds."""
        return self.real if self.backend == "auto" and self.real else self.backend


class DevicesConfig(BaseModel):
    """Which driver runs each device of the bench."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    display: DeviceConfig = Field(DeviceConfig(), description="display or SLM showing the inputs")
    camera: DeviceConfig = Field(DeviceConfig(), description="camera behind the frontend")
    light: DeviceConfig = Field(DeviceConfig(), description="light source of the display")
    shutter: DeviceConfig | None = Field(None, description="shutter in the light path")
    power_meter: DeviceConfig | None = Field(None, description="optical power meter")

    def configured(self) -> dict[str, DeviceConfig]:
        """Role → config of every device the bench has, in opening order."""
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}


# bench role → device kind (a shutter is a light source that only switches)
ROLES = {
    "display": "display",
    "camera": "camera",
    "light": "light",
    "shutter": "light",
    "power_meter": "power_meter",
}


class BenchConfig(BaseModel):
    """A bench: the optic as designed, its devices, and the simulated world used when they are
    simulated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("simulated bench", description="a name for run records")
    frontend: FrontendConfig = FrontendConfig()
    devices: DevicesConfig = DevicesConfig()
    sim: SimParams = SimParams()

    @model_validator(mode="after")
    def _simulation_fits_the_machine(self) -> BenchConfig:
        camera = self.devices.camera
        if camera.driver == "sim" or camera.backend == "auto":
            seconds = sim_build_s(self.frontend, self.sim.optics.magnification)
            if seconds > SIM_BUILD_BUDGET_S:
                raise ValueError(
                    f"frontend and sim.optics: {self.frontend.kernels} kernels of "
                    f"{self.frontend.kernel_size} px at magnification "
                    f"{self.sim.optics.magnification:g} would take the simulated camera about "
                    f"{seconds:.0f} s to build (limit {SIM_BUILD_BUDGET_S:.0f} s); use fewer or "
                    "smaller kernels, a smaller magnification, or a real camera"
                )
        return self


# the simulated camera's render matrix: about 20 ms per tile plus 5 µs per sensor pixel of a
# tile, as measured on the 2-core CI machine under load (sim.bench_geometry builds it tile by
# tile; 20x magnification took 27 s, this estimates 46 s)
SIM_BUILD_BUDGET_S = 6.0


def sim_build_s(frontend: FrontendConfig, magnification: float = 1.0) -> float:
    """Seconds the simulated world takes to lay out `frontend`'s tiles on the sensor, each
    (input + kernel - 1) input pixels wide, display_scale display pixels each, magnified."""
    tiles = frontend.kernels * (2 if frontend.signed else 1) * frontend.channels
    scale = frontend.display_scale * abs(magnification)
    h, w = ((side + frontend.kernel_size - 1) * scale for side in frontend.input_px)
    return tiles * (0.02 + 5e-6 * h * w)


def _one_line(path: str, err: ValidationError, moved: bool = False) -> str:
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    if moved and first["loc"][0] == "frontend":
        loc = f"sim.{loc}"  # name the key where the (deprecated) file has it
    if first["type"] == "extra_forbidden":
        section = _section_of(first["loc"][:-1])
        allowed = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
        msg = f"unknown key{hint}"
    else:
        text = first["msg"].removeprefix("Value error, ")
        msg = f"{text[0].lower()}{text[1:]}"
        if loc:  # a whole-file check names its keys itself
            msg += f" (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{path}: {loc}: {msg}{more}" if loc else f"{path}: {msg}{more}"


def _section_of(loc: tuple) -> type[BaseModel] | None:
    model: Any = BenchConfig
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not isinstance(field.annotation, type):
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _moved_frontend(data: dict, source: str) -> tuple[dict, bool]:
    """A bench file of before `[frontend]` existed: its `[sim.frontend]` moved there, loudly."""
    sim = data.get("sim")
    if not (isinstance(sim, dict) and "frontend" in sim):
        return data, False
    if "frontend" in data:
        raise UserError(
            f"{source}: both [frontend] and the deprecated [sim.frontend]: "
            "keep only [frontend] (the same keys)"
        )
    log.warning(
        "%s: [sim.frontend] is deprecated: rename the section to [frontend] (the same keys)",
        source,
    )
    rest = {k: v for k, v in sim.items() if k != "frontend"}
    return {**data, "frontend": sim["frontend"], "sim": rest}, True


def parse_bench(data: dict, source: str = "bench") -> BenchConfig:
    data, moved = _moved_frontend(data, source)
    try:
        config = BenchConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(source, e, moved)) from None
    for role, device in config.devices.configured().items():
        _check_device(source, role, device)
    return config


def _check_device(source: str, role: str, device: DeviceConfig) -> None:
    """Validate a device section against its backend's own keys, naming the key that is wrong."""
    where = f"{source}: devices.{role}"
    if device.backend == "auto" and not device.real:
        raise UserError(f'{where}.real: backend = "auto" needs the real backend to try first')
    try:
        cls = registry.load(ROLES[role], device.driver)
    except registry.UnknownBackend as e:
        raise UserError(f"{where}.backend: {e}") from None
    except Exception:
        return  # installed but broken: `hil devices` reports it, opening it fails loudly
    try:
        cls.Options.model_validate(device.options)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            allowed = ["backend", "real", *cls.Options.model_fields]
            close = difflib.get_close_matches(key, allowed, n=1)
            msg = f"unknown key for the {device.driver} backend" + (
                f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
            )
        else:
            msg = f"{first['msg'][0].lower()}{first['msg'][1:]} (got {first['input']!r})"
        raise UserError(f"{where}.{key}: {msg}") from None


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


def toml_value(value: Any) -> str:
    """A value as TOML writes it (inf and nan included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def numeric_keys(model: BaseModel | None = None, prefix: tuple[str, ...] = ()):
    """(dotted path, default) of every number or pair of numbers a bench file can set: what
    the bounds tests and `benchmarks/robustness_audit.py` try bad values on."""
    model = BenchConfig() if model is None else model
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from numeric_keys(value, (*prefix, name))
        elif _numeric(value) or (isinstance(value, tuple) and all(map(_numeric, value))):
            yield (*prefix, name), value


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def to_toml(config: BaseModel, comments: bool = True) -> str:
    """TOML for a config; with comments, each key carries its meaning."""
    lines: list[str] = []

    def section(model: BaseModel, name: str) -> None:
        fields = type(model).model_fields
        values = {k: getattr(model, k) for k in fields} | (model.model_extra or {})
        scalars = {k: v for k, v in values.items() if not isinstance(v, BaseModel)}
        if scalars and name:
            doc = (type(model).__doc__ or "").strip().splitlines()
            lines.extend(["", *([f"# {doc[0]}"] if comments and doc else []), f"[{name}]"])
        for key, value in scalars.items():
            info = fields.get(key)
            if comments and info is not None and info.description:
                lines.append(f"# {info.description}")
            if value is not None:
                lines.append(f"{key} = {toml_value(value)}")
            elif comments:
                lines.append(f"# {key} = (unset)")
        for key, child in values.items():
            if isinstance(child, BaseModel):
                section(child, f"{name}.{key}" if name else key)

    section(config, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def default_bench_toml() -> str:
    head = (
        "# hil bench file. Every key is optional: remove what you do not change.\n"
        "# [frontend] is the optic as designed, shared by real and simulated benches; the [sim.*]\n"
        "# sections describe the simulated bench (the digital twin of a real one).\n"
    )
    return head + to_toml(BenchConfig())
