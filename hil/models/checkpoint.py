"""The one model file format of students and teachers, read back with one-line errors.

A model file is what a finished run produced, nothing to continue training from:

    {"format": "hil-model", "schema_version": 1, "kind": "student" | "teacher",
     <architecture>, "weights": state_dict, "record": what produced it (metrics, settings)}

where <architecture> is `spec` (a `StudentSpec` as a dict) for a student and `arch`,
`in_channels`, `classes` for a teacher. The optimizer and the epoch a run stopped at are the resume
state, a separate file (`hil.training.loop.resume_path`). Bench assembly (a design checkpoint),
fine-tuning, evaluation and distillation all load models here, so none imports another's job.
Files are written atomically and sealed with a digest (`hil.output.torchfile`), and read with
`torch.load(weights_only=True)`: a model file is data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

from torch import nn

from hil.errors import UserError
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import build_teacher
from hil.output.torchfile import load_checkpoint, save_checkpoint

FORMAT = "hil-model"
SCHEMA_VERSION = 1
Kind = Literal["student", "teacher"]
TEACHER_ARCH = ("arch", "in_channels", "classes")


class ModelFile(NamedTuple):
    model: nn.Module  # in eval mode
    record: dict[str, Any]


def save_model(
    path: Path | str,
    kind: Kind,
    model: nn.Module,
    record: dict[str, Any] | None = None,
    *,
    arch: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a model file of `kind`, atomically.

    A student's architecture is its `spec`; a teacher's (which does not know its own) is `arch`,
    {"arch", "in_channels", "classes"}. `record` must hold only plain values (no numpy scalars):
    it is read back with weights_only.
    """
    if kind == "student":
        facts = {"spec": model.spec.to_dict()}
    elif kind == "teacher":
        if arch is None or set(arch) != set(TEACHER_ARCH):
            raise ValueError(f"a teacher's model file needs arch={{{', '.join(TEACHER_ARCH)}}}")
        facts = {k: arch[k] for k in TEACHER_ARCH}
    else:
        raise ValueError(f"kind {kind!r}: a model file holds a student or a teacher")
    state = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": kind, **facts}
    state |= {"weights": model.state_dict(), "record": dict(record or {})}
    path = Path(path)
    save_checkpoint(path, state)
    return path


def load_model(path: Path | str, kind: Kind) -> ModelFile:
    """The model of kind `kind` in the model file `path`, in eval mode; any file that is not one
    (missing, empty, foreign, the other kind, a resume state, damaged) is one UserError line."""
    path = Path(path)
    if not path.is_file():
        hint = "`hil train`" if kind == "student" else "`hil teacher train`"
        raise UserError(f"{path}: {kind} checkpoint not found (write one with {hint})")
    state = load_checkpoint(path, "hil model file")
    _check(path, state, kind)
    try:
        if kind == "student":
            model = ONN(StudentSpec(**state["spec"]))
        else:
            model = build_teacher(*(state[k] for k in TEACHER_ARCH))
        model.load_state_dict(state["weights"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: a damaged {kind} checkpoint ({_first_sentence(e)})") from None
    return ModelFile(model.eval(), dict(state.get("record") or {}))


def _check(path: Path, state: Any, kind: Kind) -> None:
    """Format, schema version and kind, each refused in one line that says what the file is."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a hil model file ({_what(state)})")
    version = state.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: hil model file schema {version}, this hil reads schema {SCHEMA_VERSION}"
        )
    if state.get("kind") != kind:
        raise UserError(f"{path}: a {state.get('kind')} checkpoint, not a {kind}")


def _what(state: Any) -> str:
    """What a foreign PyTorch file looks like, so the user knows which file they gave."""
    if not isinstance(state, dict):
        return f"a PyTorch file holding a {type(state).__name__}"
    if state.get("format") == "hil-resume" or "optimizer" in state:
        return "a resume state of an unfinished run; its model file is written when it finishes"
    if {"spec", "model"} <= state.keys() or {"teacher", "state_dict"} <= state.keys():
        return "a hil checkpoint of the format before schema 1; train it again"
    return "a PyTorch file of another program"


def _first_sentence(e: Exception) -> str:
    """torch's own messages run to many lines; the first sentence names the problem."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def load_onn(path: Path | str) -> ONN:
    """The student of a `hil train` / `hil finetune` model file, in eval mode; one-line errors."""
    return load_model(path, "student").model


def check_maps(model: ONN, shape: tuple[int, ...], source: Path | str) -> None:
    """Feature maps (m, H, W) must be what the student's backend takes."""
    s = model.spec
    takes = (s.kernels, s.image_size, s.image_size)
    if tuple(shape) != takes:
        raise UserError(
            f"{source}: feature maps of shape {tuple(shape)}, but the student takes {takes} "
            "(captured with another design or display?)"
        )


def check_labels(model: ONN, labels, source: Path | str) -> None:
    """Labels must name one of the student's classes (a loss would index past its logits)."""
    classes = model.spec.classes
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise UserError(
            f"{source}: labels span {int(labels.min())}-{int(labels.max())}, but the student "
            f"has {classes} classes (a store of another dataset?)"
        )
