"""The fabricated-bench table (the shape of the paper's Table 4): no compensation / CE fine-tune /
NTKD fine-tune, mean ± std over seeds, on simulated benches with the demo's fabrication errors.

    .venv/bin/python benchmarks/finetune_table.py --seeds 5 [--dataset mnist5k] [--teacher
        resnet18] [--student-teacher lenet] [--fraction 0.1] [--out DIR] [--json FILE]

Per seed: the NTKD student trained in simulation (that seed, distilled from `--student-teacher`),
a bench fabricated from it with that seed's errors (the demo's [sim.fabrication]), calibration,
capture of `--fraction` of the train split, the val split and the test split, backend fine-tunes
with CE and NTKD (teacher `--teacher`) on the captured train rows (keeping the epoch that scores
best on the captured val split), test accuracy on the captured test split. The teachers (per
dataset, kept in --out, retrained when asked for other settings) serve every seed. Exactly what
`hil demo` does, with a second teacher where the two differ: resnet18's features at 28x28 cost
0.4 s per sample on two CPU cores, affordable for the captured 10% but not for the whole train
split the simulated student sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from hil.bench.config import load_bench
from hil.data.datasets import LOADERS, NEEDS_ROOT, load_dataset
from hil.device import add_device_argument
from hil.jobs.calibrate import run_calibrate
from hil.jobs.demo import (
    DemoPlan,
    capture_splits,
    compensate,
    fabricated_bench,
    recovered,
    train_demo_student,
)
from hil.jobs.evaluate import evaluate_store
from hil.models.checkpoint import load_onn
from hil.training.teacher import stored_teacher

# classification sets that need no --data-root (the demo's captures read none)
DATASETS = sorted(set(LOADERS) - NEEDS_ROOT - {"shapes"})
COLUMNS = ("ONN in simulation", "no compensation", "CE fine-tune", "NTKD fine-tune")


def one_seed(plan: DemoPlan, teachers: tuple[Path, Path], out: Path, console: Console) -> dict:
    """One seed's row; `teachers`: (the simulated student's, the fine-tunes')."""
    data = load_dataset(plan.dataset)
    out.mkdir(parents=True, exist_ok=True)
    student = out / "onn.pt"
    record = train_demo_student(data, teachers[0], student, plan, console)
    bench = fabricated_bench(load_bench(None), student, plan)
    cal = run_calibrate(bench, out / "calibration", console)
    calibration = Path(cal["calibration_file"])
    stores = capture_splits(bench, calibration, out / "captures", plan, console, data.name)
    compensate(student, teachers[1], stores, out, plan)
    row = {"ONN in simulation": record["test_accuracy"]}
    for name, path in zip(
        COLUMNS[1:], (student, out / "onn-ce.pt", out / "onn-ntkd.pt"), strict=True
    ):
        row[name] = evaluate_store(load_onn(path), stores["test"])["accuracy"]
    return row


def teacher(plan: DemoPlan, arch: str, epochs: int | None, out: Path, console: Console) -> Path:
    """The stored `arch` teacher for the plan's dataset, trained first if missing or stale."""
    plan = dataclasses.replace(plan, teacher=arch, teacher_epochs=epochs)
    path = out / f"teacher-{plan.dataset}-{arch}.pt"
    console.print(f"{arch} teacher: {path} ({plan.teacher_settings()})")
    settings = plan.teacher_settings()
    _, info = stored_teacher(arch, load_dataset(plan.dataset), settings, path)
    console.print(f"  test accuracy {info['test_accuracy']:.4f}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--dataset", default="mnist5k", choices=DATASETS, help="default: mnist5k")
    ap.add_argument("--teacher", default="resnet18", help="the fine-tunes' teacher")
    ap.add_argument("--teacher-epochs", type=int, default=10, help="of --teacher")
    ap.add_argument("--student-teacher", default="lenet", help="the simulated student's teacher")
    ap.add_argument("--fraction", type=float, default=0.1, help="of the train split captured")
    ap.add_argument("--out", type=Path, default=Path("bench-runs/finetune_table"))
    ap.add_argument("--json", type=Path, help="also write the rows and summary here")
    add_device_argument(ap)
    args = ap.parse_args()
    device = str(args.device)
    console = Console(stderr=True)
    t0 = time.perf_counter()
    base = DemoPlan(dataset=args.dataset, device=device, train_fraction=args.fraction)
    teachers = (
        teacher(base, args.student_teacher, None, args.out, console),
        teacher(base, args.teacher, args.teacher_epochs, args.out, console),
    )
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        console.print(f"[bold]seed {seed}[/]")
        plan = dataclasses.replace(base, seed=seed, teacher=args.student_teacher)
        rows.append(one_seed(plan, teachers, args.out / f"seed{seed}", console))
        console.print(rows[-1])
    stats = {c: (statistics.mean(r[c] for r in rows), _std([r[c] for r in rows])) for c in COLUMNS}
    means = {c: m for c, (m, _) in stats.items()}
    rec = {c: recovered(means[COLUMNS[0]], means[COLUMNS[1]], means[c]) for c in COLUMNS[2:]}
    print(
        f"{args.dataset}, teachers {args.student_teacher} (simulation) and {args.teacher} "
        f"(fine-tunes), fraction {args.fraction}, torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads, {args.seeds} seeds, {time.perf_counter() - t0:.0f} s"
    )
    print("| " + " | ".join(COLUMNS) + " | CE recovers | NTKD recovers |")
    print("| " + " | ".join("---:" for _ in range(len(COLUMNS) + 2)) + " |")
    cells = [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in stats.values()]
    cells += [f"{100 * r:.0f}%" for r in rec.values()]
    print("| " + " | ".join(cells) + " |")
    for seed, r in enumerate(rows, args.first_seed):
        print(f"| seed {seed} | " + " | ".join(f"{100 * r[c]:.2f}" for c in COLUMNS) + " |")
    if args.json:
        summary = {"rows": rows, "recovered": rec, "fraction": args.fraction}
        args.json.write_text(json.dumps(summary | {"teachers": [str(t) for t in teachers]}))


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
