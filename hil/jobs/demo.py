"""`hil demo`: the whole story on real MNIST digits, on a simulated bench, in a few minutes.

Design → NTKD training in simulation → a fabricated frontend that misbehaves → calibration →
capture (10% of the train split; the val and test splits) → backend fine-tuning with CE and with
NTKD → evaluation of every variant, written as a report folder a person can open.

The step functions are what `benchmarks/finetune_table.py` repeats over seeds.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from hil.acquire.store import read
from hil.bench.config import BenchConfig
from hil.data.datasets import Dataset, load_dataset
from hil.jobs.calibrate import run_calibrate
from hil.jobs.capture import CaptureRequest, run_capture
from hil.jobs.evaluate import evaluate_store
from hil.jobs.finetune import FinetuneRequest, run_finetune
from hil.jobs.train import Teaching
from hil.models.checkpoint import load_onn, save_model
from hil.models.onn import StudentSpec
from hil.training.loop import Settings
from hil.training.student import train_student
from hil.training.teacher import save_teacher, train_teacher


@dataclass(frozen=True)
class DemoPlan:
    """Sizes that keep the demo within a few minutes on two CPU cores."""

    seed: int = 0
    dataset: str = "mnist5k"  # a dataset `load_dataset` reads without a data folder
    teacher: str = "lenet"  # the teacher's architecture (`hil.models.teachers`)
    teacher_epochs: int | None = None  # None: the teacher's own (TEACHER_TRAINING)
    teacher_lr: float | None = None
    student_epochs: int = 20
    student_lr: float = 1e-2
    projections: int = 32
    finetune_epochs: int = 30
    finetune_lr: float = 1e-3
    train_fraction: float = 0.1
    # The optic's shape errors, which calibration measures but cannot undo: a smooth 60% error
    # field per PSF (correlated over 3 px, the scale of a PSF's lobes) and a σ = 1 px blur (the
    # sensor slightly off the focal plane). On mnist5k they cost the simulated student 3 to 10
    # points, which fine-tuning can win back. None keeps the bench file's [sim.fabrication] value.
    kernel_error: float | None = 0.6
    kernel_error_corr_px: float | None = 3.0
    kernel_blur_px: float | None = 1.0
    device: str = "cpu"  # where the teacher, the student and the fine-tunes train

    @classmethod
    def of_bench_file(cls, config: BenchConfig, seed: int = 0, device: str = "cpu") -> DemoPlan:
        """The plan for a bench file: the kernel errors its `[sim.fabrication]` section sets,
        the plan's where it sets none (so a bench that only moves the glass, as the foreign
        benches in examples/ do, is compared with the built-in one like for like)."""
        given = config.sim.fabrication.model_fields_set
        errors = {k: None for k in KERNEL_ERRORS if k in given}
        return cls(seed=seed, device=device, **errors)

    def settings(self, epochs: int, lr: float) -> Settings:
        """The training settings of one of the demo's steps: its seed and device."""
        return Settings(epochs=epochs, lr=lr, seed=self.seed, device=self.device)

    def teacher_settings(self) -> Settings:
        epochs, lr = TEACHER_TRAINING.get(self.teacher, TEACHER_TRAINING["resnet18"])
        return self.settings(self.teacher_epochs or epochs, self.teacher_lr or lr)


KERNEL_ERRORS = ("kernel_error", "kernel_error_corr_px", "kernel_blur_px")  # the plan may set

# (epochs, lr) that bring each teacher near convergence on 3000 MNIST digits within the demo's
# minutes: LeNet 97.3% test in 7 s (2 CPU cores), resnet18 8 epochs in about 6 minutes
TEACHER_TRAINING = {"lenet": (40, 3e-3), "resnet18": (8, 1e-3)}


@contextmanager
def step(console: Console, what: str, timings: dict[str, float]):
    t0 = time.perf_counter()
    console.print(f"[bold]•[/] {what} ...", highlight=False)
    yield
    timings[what] = round(time.perf_counter() - t0, 2)
    console.print(f"  done in {timings[what]:.1f} s", style="dim")


def train_demo_teacher(data: Dataset, path: Path, plan: DemoPlan, console: Console) -> dict:
    model, record = train_teacher(plan.teacher, data, plan.teacher_settings())
    save_teacher(model, record, path)
    console.print(f"  {plan.teacher} teacher: test accuracy {record['test_accuracy']:.4f}")
    return record


def train_demo_student(
    data: Dataset, teacher_path: Path, out: Path, plan: DemoPlan, console: Console
) -> dict:
    from hil.training.teacher import load_teacher

    teacher, _, _ = load_teacher(str(teacher_path), data.name)
    model, record = train_student(
        StudentSpec(seed=plan.seed),
        data,
        "ntkd",
        plan.settings(plan.student_epochs, plan.student_lr),
        teacher=teacher,
        teacher_cache=teacher_path,
        projections=plan.projections,
    )
    save_model(out, "student", model, {k: v for k, v in record.items() if k != "history"})
    console.print(f"  NTKD student in simulation: test accuracy {record['test_accuracy']:.4f}")
    return record


def fabricated_bench(config: BenchConfig, student: Path, plan: DemoPlan) -> BenchConfig:
    """The bench whose optic was fabricated from `student`'s PSFs, with the plan's errors."""
    sim = config.sim
    chosen = {k: getattr(plan, k) for k in KERNEL_ERRORS}
    errors = {"seed": plan.seed} | {k: v for k, v in chosen.items() if v is not None}
    return config.model_copy(
        update={
            "frontend": config.frontend.model_copy(update={"design": str(student)}),
            "sim": sim.model_copy(
                update={"fabrication": sim.fabrication.model_copy(update=errors)}
            ),
        }
    )


def capture_splits(
    config: BenchConfig,
    cal: Path,
    out_dir: Path,
    plan: DemoPlan,
    console: Console,
    dataset: str = "digits",
) -> dict[str, Path]:
    """Fresh stores every run: a rerun calibrates anew, and a store belongs to one calibration.
    `dataset` is a name `load_dataset` knows without a data folder."""
    shutil.rmtree(out_dir, ignore_errors=True)
    stores = {}
    for split, fraction in (("train", plan.train_fraction), ("val", 1.0), ("test", 1.0)):
        stores[split] = out_dir / f"{split}.h5"
        request = CaptureRequest(cal, dataset, split, stores[split], fraction, plan.seed)
        run_capture(config, request, console)
    return stores


def compensate(
    student: Path,
    teacher: Path,
    stores: dict[str, Path],
    out_dir: Path,
    plan: DemoPlan,
    methods: tuple[str, ...] = ("ce", "ntkd"),
) -> dict[str, dict]:
    """Fine-tune the backend with each method on all of the captured train rows, keeping the
    epoch that scores best on the captured val split."""
    settings = plan.settings(plan.finetune_epochs, plan.finetune_lr)
    return {
        method: run_finetune(
            FinetuneRequest(
                stores["train"],
                student,
                out_dir / f"onn-{method}.pt",
                Teaching(method, str(teacher), projections=plan.projections),
                test_captures=stores["test"],
                val_captures=stores["val"],
                fraction=1.0,
            ),
            settings,
        )
        for method in methods
    }


def recovered(simulated: float, uncompensated: float, compensated: float) -> float:
    """Fraction of the accuracy the fabrication lost that compensation brought back."""
    lost = simulated - uncompensated
    return (compensated - uncompensated) / lost if lost > 0 else float("nan")


def run_demo(
    config: BenchConfig, out_dir: Path, console: Console, plan: DemoPlan = DemoPlan()
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data = load_dataset(plan.dataset)
    teacher, student = out_dir / f"teacher-{plan.teacher}.pt", out_dir / "onn.pt"
    epochs = plan.teacher_settings().epochs
    with step(console, f"train the {plan.teacher} teacher ({epochs} epochs)", timings):
        teacher_record = train_demo_teacher(data, teacher, plan, console)
    with step(console, "train the optical student with NTKD in simulation", timings):
        student_record = train_demo_student(data, teacher, student, plan, console)
    bench = fabricated_bench(config, student, plan)
    with step(console, "fabricate it (a simulated bench with errors) and calibrate", timings):
        cal = run_calibrate(bench, out_dir / "calibration", console)
    with step(console, "capture 10% of the train split, the val and the test split", timings):
        stores = capture_splits(
            bench, Path(cal["calibration_file"]), out_dir / "captures", plan, console, data.name
        )
    with step(console, "fine-tune the backend on the captures with CE and with NTKD", timings):
        tuned = compensate(student, teacher, stores, out_dir, plan)
    with step(console, "evaluate every variant and write the report", timings):
        done = DemoSteps(teacher_record, student_record, cal, stores, tuned)
        result = report_demo(out_dir, bench, data, done, plan, timings)
    return result


@dataclass(frozen=True)
class DemoSteps:
    """What the demo's steps produced, for its report."""

    teacher: dict[str, Any]  # the teacher's training record
    student: dict[str, Any]  # the student's, in simulation
    calibration: dict[str, Any]  # `run_calibrate`'s result
    stores: dict[str, Path]  # capture store per split
    tuned: dict[str, dict]  # fine-tune record per method


def report_demo(
    out_dir: Path,
    bench: BenchConfig,
    data: Dataset,
    done: DemoSteps,
    plan: DemoPlan,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Score every variant on the test captures, write OUT/REPORT.md and its pictures."""
    from hil.output import report

    tuned, stores, cal = done.tuned, done.stores, done.calibration
    variants = {"no compensation": out_dir / "onn.pt"} | {
        f"{m.upper()} fine-tune": out_dir / f"onn-{m}.pt" for m in tuned
    }
    evaluated = {
        name: evaluate_store(load_onn(path), stores["test"]) for name, path in variants.items()
    }
    accuracy = {
        f"{plan.teacher} teacher (raw images)": done.teacher["test_accuracy"],
        "ONN in simulation (as designed)": done.student["test_accuracy"],
    } | {name: e["accuracy"] for name, e in evaluated.items()}
    sim, none = accuracy["ONN in simulation (as designed)"], accuracy["no compensation"]
    pictures = report.write_pictures(
        out_dir,
        student=load_onn(variants["no compensation"]),
        test_store=stores["test"],
        data=data,
        histories={"NTKD in simulation": done.student["history"]}
        | {f"{m.upper()} fine-tune": r["history"] for m, r in tuned.items()},
        confusions={name: np.asarray(e["confusion"]) for name, e in evaluated.items()},
    )
    calibration = ("psf_rel_error", "registration_rms_px", "prediction_excess_rel_error")
    result = {
        "out_dir": str(out_dir),
        "accuracy": accuracy,
        "recovered_fraction": {
            name: recovered(sim, none, accuracy[name])
            for name in variants
            if name in accuracy and name != "no compensation"
        },
        "calibration": {k: cal[k] for k in calibration if k in cal},
        "captured": {split: len(read(path).index) for split, path in stores.items()},
        "pictures": {k: str(v) for k, v in pictures.items()}
        | {f"calibration {k}": v for k, v in cal["pictures"].items()},
        "fabrication": bench.sim.fabrication.model_dump(),
        "plan": plan.__dict__,
        "timings_s": timings,
    }
    report.write_summary(out_dir / "REPORT.md", result)
    return result
