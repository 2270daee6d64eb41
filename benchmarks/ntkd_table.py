"""No transfer vs Hinton KD vs NTKD in simulation, mean ± std test metric over seeds.

    .venv/bin/python benchmarks/ntkd_table.py --dataset digits --seeds 5
    .venv/bin/python benchmarks/ntkd_table.py --dataset shapes --seeds 5
    .venv/bin/python benchmarks/ntkd_table.py --dataset mnist5k --seeds 5 --teacher lenet
    .venv/bin/python benchmarks/ntkd_table.py --dataset mnist --data-root DIR  # cifar10, carvana

Classification reports test accuracy, segmentation (shapes, carvana) test mIoU. The student is
the paper's shape for the dataset (MNIST/digits: 8 signed 7x7 PSF kernels + fc2; CIFAR-10: 16
signed 7x7x3 + fc3; Carvana and shapes: 56 signed 3x3 + the up-convolution decoder), trained
jointly in simulation, and each seed's student is the epoch that scored best on val. The teacher
is the dataset's stored `--teacher` (resnet18 by default; unet for segmentation), trained here
first when missing or stored with other settings than `--teacher-epochs`/`--teacher-lr`, as `hil
teacher train` would. Its logits (KD) and projected features (NTKD) of the training set are
computed once, cached beside it, and read by every seed. `--beta`, `--norm`, `--variant`,
`--projections` and `--methods` are the ablation's knobs.
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
from hil.training.teacher import stored_teacher, teacher_path

STUDENTS = {
    "digits": {"kernels": 8, "kernel_size": 7, "backend": "fc2"},
    "mnist": {"kernels": 8, "kernel_size": 7, "backend": "fc2"},
    "mnist5k": {"kernels": 8, "kernel_size": 7, "backend": "fc2"},
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
    ap.add_argument("--teacher", default=None, help="classifier teacher: resnet18 (default), lenet")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=1.0, help="NTKD: weight of the NTK term")
    ap.add_argument("--norm", default="diag", help="NTKD: kernel normalisation")
    ap.add_argument("--variant", default="mse", help="NTKD: mse or cka")
    ap.add_argument("--kd-weight", type=float, default=0.0, help="NTKD: KD's mix instead of CE")
    ap.add_argument("--methods", default="none,kd,ntkd", help="columns, of none, kd, ntkd")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    add_device_argument(ap)
    args = ap.parse_args()
    if args.dataset in NEEDS_ROOT and args.data_root is None:
        ap.error(f"--dataset {args.dataset} reads its files from --data-root")
    return args


def _teacher(args: argparse.Namespace, data, arch: str, metric: str, batch_size: int):
    """The dataset's stored teacher, trained first when missing or trained with other settings
    than asked for: (model, info, path)."""
    path = teacher_path(arch, args.dataset)
    settings = Settings(
        epochs=args.teacher_epochs,
        lr=args.teacher_lr,
        batch_size=min(batch_size, 32),
        device=str(args.device),
    )
    print(f"{arch} teacher for {args.dataset}: {path}", flush=True)
    teacher, info = stored_teacher(arch, data, settings, path, on_epoch=_progress)
    print(f"teacher: {arch}, test {metric} {info[f'test_{metric}']:.4f}", flush=True)
    return teacher, info, path


def _progress(metrics: dict) -> None:
    shown = {k: round(v, 4) for k, v in metrics.items() if k != "epoch"}
    print(f"  teacher epoch {metrics['epoch']}: {shown}", flush=True)


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
    arch, metric = ("unet", "miou") if segmentation else (args.teacher or "resnet18", "accuracy")
    batch_size = args.batch_size or (8 if segmentation else 128)
    teacher, info, path = _teacher(args, data, arch, metric, batch_size)
    ntkd = {"beta": args.beta, "norm": args.norm, "variant": args.variant}
    ntkd |= {"kd_weight": args.kd_weight} if args.kd_weight else {}
    methods = {
        "none": {},
        "kd": {"temperature": 4.0},
        "ntkd": ntkd | ({"pool": args.pool} if segmentation else {}),
    }
    methods = {m: methods[m] for m in args.methods.split(",")}
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
                f"(best epoch {record['best_epoch']}, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    label = "test mIoU" if segmentation else "test accuracy"
    _print_table(args, label, results, spec, batch_size, t_start)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "teacher": arch,
                    "teacher_settings": info.get("settings"),
                    f"teacher_test_{metric}": info[f"test_{metric}"],
                    "ntkd": methods.get("ntkd"),
                    "projections": args.projections,
                    "metric": metric,
                    "device": str(args.device),
                    "results": results,
                },  # fmt: skip
                f,
            )


if __name__ == "__main__":
    main()
