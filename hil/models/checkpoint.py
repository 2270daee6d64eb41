"""Student checkpoints of `hil train` / `hil finetune`, read back as models, with one-line errors.

Bench assembly (a design checkpoint), fine-tuning and evaluation all load students here, so none
of them imports another's job module.
"""

from __future__ import annotations

from pathlib import Path

from hil.errors import UserError
from hil.models.onn import ONN, StudentSpec
from hil.training.loop import load_checkpoint


def load_onn(path: Path | str) -> ONN:
    """The student of a `hil train` / `hil finetune` checkpoint, in eval mode; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: student checkpoint not found (write one with `hil train`)")
    try:
        state = load_checkpoint(path)
    except Exception as e:  # torch.load fails in many ways on a foreign file
        raise UserError(f"{path}: not a PyTorch checkpoint ({_first_sentence(e)})") from None
    if not (isinstance(state, dict) and {"spec", "model"} <= state.keys()):
        raise UserError(
            f"{path}: not a hil student checkpoint (no student spec and weights; "
            "a teacher's, or another program's?)"
        )
    try:
        model = ONN(StudentSpec(**state["spec"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: a damaged student checkpoint ({_first_sentence(e)})") from None
    return model.eval()


def _first_sentence(e: Exception) -> str:
    """torch's own messages run to many lines; the first sentence names the problem."""
    text = "" if isinstance(e, KeyError) else str(e).strip()  # torch.load: a bare magic number
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else "unrecognised contents"


def check_maps(model: ONN, shape: tuple[int, ...], source: Path | str) -> None:
    """Feature maps (m, H, W) must be what the student's backend takes."""
    s = model.spec
    takes = (s.kernels, s.image_size, s.image_size)
    if tuple(shape) != takes:
        raise UserError(
            f"{source}: feature maps of shape {tuple(shape)}, but the student takes {takes} "
            "(captured with another design or display?)"
        )
