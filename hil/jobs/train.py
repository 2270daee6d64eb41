"""`hil teacher train` and `hil train`: a teacher on the raw images, the student in simulation.

The student trains frontend and backend jointly, taught by a stored teacher with Hinton KD or NTK
distillation (`../shared/NTKD.md`, stage 1); under torchrun it runs as DistributedDataParallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from hil.bench.config import BenchConfig
from hil.bench.design import square_side
from hil.data.datasets import Dataset, load_dataset
from hil.models.onn import StudentSpec
from hil.ntkd.augment import FabricationAugment
from hil.ntkd.teacher_cache import PROJECTION_SEED
from hil.training.loop import Settings
from hil.training.student import train_student
from hil.training.teacher import load_teacher, save_teacher, teacher_path, train_teacher


@dataclass(frozen=True)
class Teaching:
    """How a student learns: the method, its loss's options, the teacher and its NTK sketch."""

    method: str = "ntkd"
    teacher: str = "resnet18"  # an architecture stored for the dataset, or a checkpoint
    loss_options: dict[str, Any] = field(default_factory=dict)
    projections: int = 64  # of the teacher's NTK
    projection_seed: int = PROJECTION_SEED  # of those projections; not the run's seed

    @property
    def needs_teacher(self) -> bool:
        return self.method in ("kd", "ntkd")


@dataclass(frozen=True)
class TeacherRequest:
    arch: str = "resnet18"
    dataset: str = "digits"
    settings: Settings = Settings()
    out: Path | None = None  # default: where `--teacher ARCH` finds it
    data_root: Path | None = None

    def args(self) -> dict[str, Any]:
        s = self.settings
        return {"arch": self.arch, "dataset": self.dataset} | {
            "epochs": s.epochs,
            "lr": s.lr,
            "seed": s.seed,
            "device": s.device,
        }


def run_teacher_train(request: TeacherRequest, on_epoch=None) -> dict[str, Any]:
    """Train and store a teacher; the record (with its `history`) and where it is stored."""
    data = load_dataset(request.dataset, request.data_root)
    path = request.out or teacher_path(request.arch, request.dataset)
    model, record = train_teacher(request.arch, data, request.settings, on_epoch=on_epoch)
    save_teacher(model, record, path)
    return record | {"checkpoint": str(path)}


@dataclass(frozen=True)
class StudentRequest:
    """What `hil train` was asked; `spec` without the sizes the bench and the dataset fix."""

    dataset: str = "digits"
    teaching: Teaching = Teaching()
    spec: StudentSpec = StudentSpec()
    settings: Settings = Settings()
    out: Path = Path("onn.pt")
    resume: bool = False
    augment_noise: float | None = None  # fabrication augmentation with this noise; None: none
    data_root: Path | None = None


@dataclass(frozen=True)
class StudentPlan:
    """A `StudentRequest` resolved against the bench and the dataset, ready to train."""

    request: StudentRequest
    spec: StudentSpec
    data: Dataset
    augment: FabricationAugment | None
    teacher: Any  # the teacher module, or None for `none`/`ce`
    teacher_cache: Path | None  # the teacher's checkpoint, beside which its caches are kept

    def args(self) -> dict[str, Any]:
        r = self.request
        return {
            "dataset": r.dataset,
            "data": self.data.provenance(),
            "method": r.teaching.method,
            "teacher": r.teaching.teacher,
            "spec": self.spec.to_dict(),
            "epochs": r.settings.epochs,
            "lr": r.settings.lr,
            "device": r.settings.device,
            "options": r.teaching.loss_options,
            "out": str(r.out),
            "augment": self.augment.to_dict() if self.augment else None,
        }


def plan_student(request: StudentRequest, config: BenchConfig, console: Console) -> StudentPlan:
    """Load the dataset and the teacher, size the student to the input grid."""
    r = request
    data = load_dataset(r.dataset, r.data_root)
    backend = r.spec.backend
    if data.task == "segmentation" and backend != "updecoder":
        console.print(f"{r.dataset} is a segmentation dataset: using --backend updecoder")
        backend = "updecoder"
    sim = config.sim  # the fabrication errors the augmentation draws around
    augment = None
    if r.augment_noise is not None:
        augment = FabricationAugment.from_fabrication(
            sim.fabrication, noise=r.augment_noise, seed=r.settings.seed
        )
    spec = replace(
        r.spec,
        backend=backend,
        image_size=square_side(config, "hil train"),
        channels=int(data.images.shape[1]),
        classes=data.classes,
    )
    teacher = t_path = None
    if r.teaching.needs_teacher:
        teacher, _, t_path = load_teacher(r.teaching.teacher, r.dataset)
    return StudentPlan(r, spec, data, augment, teacher, t_path)


def run_train(plan: StudentPlan, on_epoch=None) -> dict[str, Any]:
    """Train the student to `plan.request.out` (also the resume checkpoint); its record."""
    r = plan.request
    model, record = train_student(
        plan.spec,
        plan.data,
        r.teaching.method,
        r.settings,
        teacher=plan.teacher,
        teacher_cache=plan.teacher_cache,
        loss_options=r.teaching.loss_options,
        projections=r.teaching.projections,
        projection_seed=r.teaching.projection_seed,
        out=r.out,
        resume=r.resume,
        on_epoch=on_epoch,
        augment=plan.augment,
    )
    return record | {"checkpoint": str(r.out), "epochs_run": len(record["history"])}
