"""No transfer vs Hinton KD vs NTKD in simulation, mean ± std test metric over seeds.

    .venv/bin/python benchmarks/ntkd_table.py --dataset digits --seeds 5
    .venv/bin/python benchmarks/ntkd_table.py --dataset shapes --seeds 5
    .venv/bin/python benchmarks/ntkd_table.py --dataset mnist --data-root DIR  # cifar10, carvana

Classification reports test accuracy, segmentation (shapes, carvana) test mIoU. The student is
the paper's shape for the dataset (MNIST/digits: 8 signed 7x7 PSF kernels + fc2; CIFAR-10: 16
signed 7x7x3 + fc3; Carvana and shapes: 56 signed 3x3 + the up-convolution decoder), trained
jointly in simulation; the teacher is the dataset's stored resnet18 (unet for segmentation),
trained here first when missing, as `hil teacher train` would. Its logits (KD) and projected
features (NTKD) of the training set are computed once, cached beside it, and read by every seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from hil.data.datasets import NEEDS_ROOT, load_dataset
from hil.device import add_device_argument
from hil.models.onn import StudentSpec
from hil.training.loop import Settings
from hil.training.student import train_student
from hil.training.teacher import load_teacher, save_teacher, teacher_path, train_teacher

STUDENTS = {
    "digits": {"kernels": 8, "kernel_size": 7, "backend": "fc2"},
    "mnist": {"kernels": 8, "kernel_size": 7, "backend": "fc2"},
    "cifar10": {"kernels": 16, "kernel_size": 7, "backend": "fc3"},
    "shapes": {"kernels": 56, "kernel_size": 3, "backend": "updecoder"},
    "carvana": {"kernels": 56, "kernel_size": 3, "backend": "updecoder"},
}


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=sorted(STUDENTS))
    ap.add_argument("--data-root", default=None, help="folder of mnist, cifar10 or carvana files")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=None, help="default 128; 8 for masks")
    ap.add_argument("--kernels", type=int, default=None, help="override the student's kernels")
    ap.add_argument("--image-size", type=int, default=32, help="display side in pixels")
    ap.add_argument("--projections", type=int, default=64)
    ap.add_argument("--pool", type=int, default=4, help="segmentation NTK: pooled logit grid")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    add_device_argument(ap)
    args = ap.parse_args()
    if args.dataset in NEEDS_ROOT and args.data_root is None:
        ap.error(f"--dataset {args.dataset} reads its files from --data-root")
    return args


def _teacher(args: argparse.Namespace, data, arch: str, metric: str, batch_size: int):
    """The dataset's stored teacher, trained first when missing: (model, info, path)."""
    path = teacher_path(arch, args.dataset)
    if not path.exists():
        print(f"training the {arch} teacher for {args.dataset} ...", flush=True)
        settings = Settings(
            epochs=args.teacher_epochs,
            lr=1e-3,
            batch_size=min(batch_size, 32),
            device=str(args.device),
        )
        model, record = train_teacher(arch, data, settings)
        save_teacher(model, record, path)
    teacher, info, path = load_teacher(arch, args.dataset)
    print(f"teacher: {arch}, test {metric} {info[f'test_{metric}']:.4f}", flush=True)
    return teacher, info, path


def _student(args: argparse.Namespace, data, seed: int) -> StudentSpec:
    student = STUDENTS[args.dataset] | ({"kernels": args.kernels} if args.kernels else {})
    return StudentSpec(
        channels=int(data.images.shape[1]),
        classes=data.classes,
        image_size=args.image_size,
        seed=seed,
        **student,
    )


def _print_table(args, label: str, results: dict, spec: StudentSpec, batch_size, t_start) -> None:
    """The run's settings, then one markdown row per method: mean ± std over the seeds."""
    print(
        f"\n{args.dataset}, {args.seeds} seeds, {args.epochs} epochs, batch {batch_size}, student "
        f"{spec.kernels} x {spec.kernel_size}x{spec.kernel_size} {spec.backend}; torch "
        f"{torch.__version__}, {platform.machine()}, device {args.device}, "
        f"{torch.get_num_threads()} threads; {time.perf_counter() - t_start:.0f} s"
    )
    print(f"| method | {label} (mean ± std) |\n| --- | --- |")
    for method, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {method} | {100 * statistics.mean(values):.2f} ± {100 * std:.2f} |")


def main() -> None:
    args = _arguments()
    data = load_dataset(args.dataset, args.data_root)
    segmentation = data.task == "segmentation"
    arch, metric = ("unet", "miou") if segmentation else ("resnet18", "accuracy")
    batch_size = args.batch_size or (8 if segmentation else 128)
    teacher, info, path = _teacher(args, data, arch, metric, batch_size)
    methods = {
        "none": {},
        "kd": {"temperature": 4.0},
        "ntkd": {"beta": 1.0, "norm": "diag", **({"pool": args.pool} if segmentation else {})},
    }
    results: dict[str, list[float]] = {m: [] for m in methods}
    t_start = time.perf_counter()
    for seed in range(args.seeds):
        for method, options in methods.items():
            t0 = time.perf_counter()
            spec = _student(args, data, seed)
            _, record = train_student(
                spec,
                data,
                method,
                Settings(
                    epochs=args.epochs,
                    lr=args.lr,
                    batch_size=batch_size,
                    seed=seed,
                    device=str(args.device),
                ),
                teacher=teacher,
                loss_options=options,
                projections=args.projections,
                teacher_cache=path,  # logits and features cached beside it, for every seed
            )
            results[method].append(record[f"test_{metric}"])
            print(
                f"seed {seed} {method:5s} test {metric} {record[f'test_{metric}']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    label = "test mIoU" if segmentation else "test accuracy"
    _print_table(args, label, results, spec, batch_size, t_start)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    f"teacher_test_{metric}": info[f"test_{metric}"],
                    "metric": metric,
                    "device": str(args.device),
                    "results": results,
                },  # fmt: skip
                f,
            )


if __name__ == "__main__":
    main()
