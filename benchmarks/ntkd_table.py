"""No transfer vs Hinton KD vs NTKD in simulation, mean ± std test accuracy over seeds.

    .venv/bin/python benchmarks/ntkd_table.py --dataset digits --seeds 5

The student is the paper's MNIST shape: 8 signed 7x7 PSF kernels and an fc2 backend, trained
jointly in simulation; the teacher is the dataset's stored resnet18 (trained here first when
missing, as `hil teacher train` would).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from hil.datasets import load_dataset
from hil.models.onn import StudentSpec
from hil.simtrain import train_student
from hil.teachers import load_teacher, save_teacher, teacher_path, train_teacher
from hil.training import Settings

METHODS = {"none": {}, "kd": {"temperature": 4.0}, "ntkd": {"beta": 1.0, "norm": "diag"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--projections", type=int, default=64)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    data = load_dataset(args.dataset)
    path = teacher_path("resnet18", args.dataset)
    if not path.exists():
        print(f"training the resnet18 teacher for {args.dataset} ...", flush=True)
        model, record = train_teacher("resnet18", data, Settings(epochs=15, lr=1e-3))
        save_teacher(model, record, path)
    teacher, info, path = load_teacher("resnet18", args.dataset)
    print(f"teacher: resnet18, test accuracy {info['test_accuracy']:.4f}", flush=True)
    results: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for method, options in METHODS.items():
            t0 = time.perf_counter()
            spec = StudentSpec(channels=int(data.images.shape[1]), classes=data.classes, seed=seed)
            _, record = train_student(
                spec,
                data,
                method,
                Settings(epochs=args.epochs, lr=args.lr, seed=seed),
                teacher=teacher,
                loss_options=options,
                projections=args.projections,
                teacher_cache=path.with_name(f"{path.stem}.ntk-R{args.projections}-s{seed}.pt"),
            )
            results[method].append(record["test_accuracy"])
            print(
                f"seed {seed} {method:5s} test accuracy {record['test_accuracy']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    print(
        f"\n{args.dataset}, {args.seeds} seeds, {args.epochs} epochs; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    print("| method | test accuracy (mean ± std) |\n| --- | --- |")
    for method, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {method} | {100 * statistics.mean(accs):.2f} ± {100 * std:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"teacher_test_accuracy": info["test_accuracy"], "results": results}, f)


if __name__ == "__main__":
    main()
