"""The fabricated-bench table (the shape of the paper's Table 4): no compensation / CE fine-tune /
NTKD fine-tune, mean ± std over seeds, on simulated benches with the demo's fabrication errors.

    .venv/bin/python benchmarks/finetune_table.py --seeds 5 [--dataset mnist5k] [--out DIR]
        [--json FILE]

Per seed: the NTKD student trained in simulation (that seed), a bench fabricated from it with that
seed's errors (the demo's [sim.fabrication]), calibration, capture of 10% of the train split, the
val split and the test split, backend fine-tunes with CE and NTKD on the 10% (keeping the epoch
that scores best on the captured val split), test accuracy on the captured test split. One
resnet18 teacher (per dataset, kept in --out) serves every seed. Exactly what `hil demo` does,
on `--dataset` (default digits, the demo's).
"""

from __future__ import annotations

import argparse
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
    train_demo_teacher,
)
from hil.jobs.evaluate import evaluate_store
from hil.models.checkpoint import load_onn

# classification sets that need no --data-root (the demo's captures read none)
DATASETS = sorted(set(LOADERS) - NEEDS_ROOT - {"shapes"})
COLUMNS = ("ONN in simulation", "no compensation", "CE fine-tune", "NTKD fine-tune")


def one_seed(
    dataset: str, seed: int, teacher: Path, out: Path, console: Console, device: str = "cpu"
) -> dict[str, float]:
    plan = DemoPlan(seed=seed, device=device)
    data = load_dataset(dataset)
    out.mkdir(parents=True, exist_ok=True)
    student = out / "onn.pt"
    record = train_demo_student(data, teacher, student, plan, console)
    bench = fabricated_bench(load_bench(None), student, plan)
    cal = run_calibrate(bench, out / "calibration", console)
    captures = out / "captures"
    stores = capture_splits(bench, Path(cal["calibration_file"]), captures, plan, console, dataset)
    compensate(student, teacher, stores, out, plan)
    row = {"ONN in simulation": record["test_accuracy"]}
    for name, path in zip(
        COLUMNS[1:], (student, out / "onn-ce.pt", out / "onn-ntkd.pt"), strict=True
    ):
        row[name] = evaluate_store(load_onn(path), stores["test"])["accuracy"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--dataset", default="digits", choices=DATASETS, help="default: digits")
    ap.add_argument("--out", type=Path, default=Path("bench-runs/finetune_table"))
    ap.add_argument("--json", type=Path, help="also write the rows and summary here")
    add_device_argument(ap)
    args = ap.parse_args()
    device = str(args.device)
    console = Console(stderr=True)
    t0 = time.perf_counter()
    teacher = args.out / f"teacher-{args.dataset}-resnet18.pt"
    if not teacher.exists():
        train_demo_teacher(load_dataset(args.dataset), teacher, DemoPlan(device=device), console)
    rows = []
    for seed in range(args.seeds):
        console.print(f"[bold]seed {seed}[/]")
        out = args.out / f"seed{seed}"
        rows.append(one_seed(args.dataset, seed, teacher, out, console, device))
        console.print(rows[-1])
    stats = {c: (statistics.mean(r[c] for r in rows), _std([r[c] for r in rows])) for c in COLUMNS}
    means = {c: m for c, (m, _) in stats.items()}
    rec = recovered(means[COLUMNS[0]], means[COLUMNS[1]], means[COLUMNS[3]])
    print(
        f"{args.dataset}, torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads, {args.seeds} seeds, {time.perf_counter() - t0:.0f} s"
    )
    print("| " + " | ".join(COLUMNS) + " | NTKD recovers (of the mean loss) |")
    print("| " + " | ".join("---:" for _ in range(len(COLUMNS) + 1)) + " |")
    cells = [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in stats.values()]
    print("| " + " | ".join(cells) + f" | {100 * rec:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "recovered": rec}, indent=2))


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
