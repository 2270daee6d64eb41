"""The robustness audit, rerun as one script: bad inputs, kills, a full disk, injected faults.

    .venv/bin/python benchmarks/robustness_audit.py [--only inputs,kills,disk,faults]
        [--kills-per-signal 9] [--json audit.json]

Everything a careful lab user could get wrong or suffer, run through the real command line in a
scratch folder of small real files (a LeNet teacher, a student, a calibration and stores of the
default simulated bench):

- **bad inputs**: every numeric bench key with non-finite, boolean and absurd values; bench files
  with wrong types, unknown keys, missing or foreign designs; every file the tool reads (student,
  teacher, resume state, teacher cache, store, calibration, bench, MNIST IDX, CIFAR pickles)
  missing, empty, truncated, garbled, bit-flipped, hostile or of another kind; stores edited with
  recomputed checksums; outputs that would destroy an input or cannot be written; bad options.
  A case is clean when it exits 2 or 3 with one `error:` line naming the file or key, no
  traceback, within its time limit (10 s for `hil devices`). The teacher cache is the exception
  by design: damaged, it is recomputed with one warning naming it. The largest bench each sizing
  key accepts is clean when `hil devices` lists it within 10 s.
- **kills**: `hil capture` killed (SIGKILL, SIGINT, SIGTERM) around the moment the store is
  created and through the capture, and reruns killed while they recover what a SIGKILL left;
  resumed when the last rerun completes and its rows equal an uninterrupted capture's, feature
  for feature.
- **disk full**: capture, calibrate and train on a 3 MiB tmpfs (root only): one line, exit 2,
  the committed rows intact and counted truly, then the capture resumed once space is freed.
- **faults**: captures with camera timeouts and disconnects injected from the bench file, which
  must finish with every row and list the retries; a camera that never answers, which must
  end in a device error naming the camera and the attempts.

Bad inputs run in forked children of this process (hil is imported once), the rest as real
processes. Prints one table per part and the totals; --json writes every case's outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

HIL = [sys.executable, "-m", "hil"]
DEVICES_LIMIT_S = 10.0
CASE_LIMIT_S = 120.0


@dataclass
class Case:
    group: str
    name: str
    argv: list[str]
    names: str  # what the one error line must name
    limit_s: float = CASE_LIMIT_S
    warns: bool = False  # clean means exit 0 with one warning naming it (a cache is recomputed)
    must: str = ""  # and what that line must say
    accepted: bool = False  # a valid input: clean means exit 0, no error


@dataclass
class Outcome:
    group: str
    name: str
    verdict: str  # clean, traceback, wrong exit, unclear, hang, accepted
    code: int | None
    seconds: float
    said: str = ""
    detail: dict = field(default_factory=dict)


# -- running hil ---------------------------------------------------------------------------------


def forked(argv: list[str], limit_s: float) -> tuple[int | None, str, str, float]:
    """`hil ARGV` in a forked child: (exit code or None if it hung, stdout, stderr, seconds)."""
    from hil.cli import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code, seconds = _fork_and_wait(main, argv, limit_s, out, err)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return code, texts[0], texts[1], seconds


def _fork_and_wait(main, argv, limit_s, out, err) -> tuple[int | None, float]:
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: behave as the console script would
        os.setsid()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["hil", *argv]
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    code = None
    while time.monotonic() - t0 < limit_s:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.02)
    else:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return code, time.monotonic() - t0


def judge(case: Case, code, err: str, seconds: float) -> Outcome:
    lines = [line for line in err.splitlines() if line.startswith(("error:", "device error:"))]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    said = (lines or warnings or [err.strip()[-300:]])[0]
    if code is None:
        verdict = "hang"
    elif "Traceback" in err:
        verdict = "traceback"
    elif case.accepted:
        verdict = "clean" if code == 0 and not lines else "unclear"
    elif case.warns:
        named = len(warnings) == 1 and case.names in warnings[0]
        verdict = "clean" if code == 0 and named and not lines else "unclear"
    elif code == 0:
        verdict = "accepted"
    elif code not in (2, 3):
        verdict = "wrong exit"
    elif len(lines) != 1 or case.names not in lines[0]:
        verdict = "unclear"
    else:
        verdict = "clean"
    return Outcome(case.group, case.name, verdict, code, round(seconds, 2), said)


def words(text: str) -> list[str]:
    """A command line or a list of names, written as the shell would take it."""
    return text.split()


def hil(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([*HIL, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and done.returncode != 0:
        raise SystemExit(f"fixture `hil {' '.join(map(str, args))}` failed:\n{done.stderr}")
    return done


# -- the scratch folder ---------------------------------------------------------------------------


def fixtures(w: Path) -> None:
    """Small real files: a teacher, a student, a calibration, stores, a resume state, datasets."""
    hil(*words("teacher train --arch lenet --dataset digits --epochs 1 --out teacher.pt"), cwd=w)
    hil(*words("train --dataset digits --method none --epochs 1 --out onn.pt"), cwd=w)
    hil("calibrate", "--out", "cal", "--patterns", "8", cwd=w)
    for split, fraction in (("train", "0.2"), ("test", "0.1")):
        hil(
            *words("capture --calibration cal/calibration.h5 --out"),
            f"{split}.h5",
            "--split",
            split,
            "--fraction",
            fraction,
            cwd=w,
        )
    hil(
        *words("finetune --captures train.h5 --checkpoint onn.pt --teacher teacher.pt"),
        *words("--method kd --epochs 1 --out kd.pt"),
        cwd=w,
    )
    resume = (
        "from hil.data.datasets import digits\n"
        "from hil.models.onn import StudentSpec\n"
        "from hil.training.loop import Settings\n"
        "from hil.training.student import train_student\n"
        "def stop(m): raise KeyboardInterrupt\n"
        "try: train_student(StudentSpec(), digits(), 'ce', Settings(epochs=3), out='r.pt', "
        "on_epoch=stop)\n"
        "except KeyboardInterrupt: pass\n"
    )
    subprocess.run([sys.executable, "-c", resume], cwd=w, check=True)
    rng = np.random.default_rng(0)
    np.save(w / "img.npy", rng.random((8, 8), dtype=np.float32))
    mnist = w / "mnist"
    mnist.mkdir()
    for prefix, n in (("train", 300), ("t10k", 100)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        (mnist / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(x))
        (mnist / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(y))
    cifar = w / "cifar"
    cifar.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"labels": (np.arange(40) % 10).tolist(),
            b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
        }
        (cifar / name).write_bytes(pickle.dumps(batch, 2))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (cifar / "batches.meta").write_bytes(pickle.dumps(meta, 2))


def _idx(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _nested(levels: int) -> bytes:
    inner: list = [np.arange(3, dtype=np.uint8)]
    for _ in range(levels):
        inner = [inner, inner]
    return pickle.dumps({b"data": inner, b"labels": [0]}, 2)


def damaged(w: Path, source: str, how: str, name: str) -> Path:
    """A copy of `source` (in `w`), damaged `how`, written as `name`."""
    path = w / "bad" / name
    path.parent.mkdir(exist_ok=True)
    data = (w / source).read_bytes() if source else b""
    if how == "empty":
        data = b""
    elif how == "garbage":
        data = np.random.default_rng(7).bytes(4096)
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "bitflip":
        data = bytearray(data)
        data[int(len(data) * 0.6)] ^= 0x10
        data = bytes(data)
    elif how == "payload":
        data = pickle.dumps(_Payload())
    elif how == "list":
        import torch

        torch.save([1, 2, 3], path)
        return path
    elif how == "folder":
        path.mkdir(exist_ok=True)
        return path
    path.write_bytes(data)
    return path


def edited_store(w: Path, name: str, **rows) -> Path:
    """train.h5 with rows rewritten and their checksums recomputed, as a program would."""
    from hil.acquire.store import digest

    path = w / "bad" / name
    path.parent.mkdir(exist_ok=True)
    shutil.copy(w / "train.h5", path)
    with h5py.File(path, "a", libver="latest") as f:
        for key, (row, value) in rows.items():
            if key.startswith("attr:"):
                f.attrs[key[5:]] = value
                continue
            f[key][row] = value
            f["checksum"][row] = digest(f["features"][row], f["labels"][row], f["index"][row])
    return path


def bench_file(w: Path, name: str, text: str) -> Path:
    path = w / "bad" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


# -- the cases -----------------------------------------------------------------------------------


def bench_key_cases(w: Path) -> list[Case]:
    from hil.bench.config import numeric_keys, toml_value

    bad = {
        "inf": float("inf"),
        "nan": float("nan"),
        "true": True,
        "1e300": 1e300,
        "-1e300": -1e300,
        "text": "x",
    }
    cases = []
    for key, default in numeric_keys():
        for label, value in bad.items():
            v = [value, *default[1:]] if isinstance(default, tuple) else value
            text = f"[{'.'.join(key[:-1])}]\n{key[-1]} = {toml_value(v)}\n"
            path = bench_file(w, f"{'.'.join(key)}={label}.toml", text)
            cases.append(
                Case(
                    "bench keys",
                    f"{'.'.join(key)} = {label}",
                    ["devices", "--bench", str(path)],
                    key[-1],
                    DEVICES_LIMIT_S,
                )
            )
    return cases


LARGEST = {  # the biggest bench each sizing key accepts: `hil devices` must list it in 10 s
    "kernel_size 101": "[frontend]\nkernel_size = 101\n",
    "kernels 64": "[frontend]\nkernels = 64\n",
    "magnification 4": "[sim.optics]\nmagnification = 4\n",
    "sensor 8192 x 4096": "[sim.sensor]\nwidth = 8192\nheight = 4096\n",
    "display_scale 4 on 128 px": (
        "[frontend]\ndisplay_scale = 4\n[sim.display]\nwidth = 128\nheight = 128\n"
    ),
    "display 8192 x 8192": "[sim.display]\nwidth = 8192\nheight = 8192\n",
    "exposure 60 s, flux 1e15, full well 1e7": (
        "[sim.sensor]\nexposure_s = 60\nflux_e_per_s = 1e15\nfull_well_e = 1e7\n"
    ),
    "shift 1000 px, blur 20 px": (
        "[sim.fabrication]\nshift_px = [1000, -1000]\nkernel_blur_px = 20\n"
    ),
}


def largest_cases(w: Path) -> list[Case]:
    """Accepted values: clean means `hil devices` lists the bench (exit 0) within 10 s."""
    return [
        Case(
            "largest accepted benches",
            name,
            ["devices", "--bench", str(bench_file(w, f"largest-{k}.toml", text))],
            "",
            DEVICES_LIMIT_S,
            accepted=True,
        )
        for k, (name, text) in enumerate(LARGEST.items())
    ]


def bench_file_cases(w: Path) -> list[Case]:
    design = w / "bad" / "payload-design.pt"
    files = {
        "unknown key": ("[sim.sensor]\nbit_dept = 12\n", "bit_dept"),
        "unknown section": ("[sim.sensorr]\nbit_depth = 12\n", "sensorr"),
        "number as text": ('[sim.sensor]\nbit_depth = "twelve"\n', "bit_depth"),
        "design_seed too big": ("[frontend]\ndesign_seed = 99999999999999999999\n", "design_seed"),
        "kernel_size 256": ("[frontend]\nkernel_size = 256\n", "kernel_size"),
        "kernels 1024": ("[frontend]\nkernels = 1024\n", "kernels"),
        "display 8192x8192 at scale 8": (
            "[frontend]\ndisplay_scale = 8\n[sim.display]\nwidth = 8192\nheight = 8192\n",
            "display",
        ),
        "design missing": ('[frontend]\ndesign = "/nonexistent/onn.pt"\n', "/nonexistent/onn.pt"),
        "design pickle payload": (f'[frontend]\ndesign = "{design}"\n', str(design)),
        "design is a calibration": (
            f'[frontend]\ndesign = "{w / "cal/calibration.h5"}"\n',
            str(w / "cal/calibration.h5"),
        ),
        "unknown camera backend": ('[devices.camera]\nbackend = "nikon9000"\n', "nikon9000"),
        "retries -1": ("[devices.camera]\nretries = -1\n", "retries"),
        "retry_backoff_s inf": ("[devices.camera]\nretry_backoff_s = inf\n", "retry_backoff_s"),
        "inject unknown key": ("[devices.camera]\ninject = { timeoutz = 2 }\n", "timeoutz"),
        "inject on the display": ("[devices.display]\ninject = { timeouts = 2 }\n", "inject"),
        "not TOML": ("[sim.sensor\nbit_depth = 12\n", "bench"),
        "exposure_s = true": ("[sim.sensor]\nexposure_s = true\n", "exposure_s"),
        "fps_limit = inf": ("[sim.sensor]\nfps_limit = inf\n", "fps_limit"),
        "shift_px = [nan, 0]": ("[sim.fabrication]\nshift_px = [nan, 0]\n", "shift_px"),
    }
    (w / "bad").mkdir(exist_ok=True)
    design.write_bytes(pickle.dumps(_Payload()))
    cases = []
    for name, (text, names) in files.items():
        path = bench_file(w, f"{name.replace(' ', '_').replace('/', '_')}.toml", text)
        names = str(path) if names == "bench" else names
        cases.append(
            Case("bench files", name, ["devices", "--bench", str(path)], names, DEVICES_LIMIT_S)
        )
    missing = w / "bad" / "no-such-bench.toml"
    cases.append(Case("bench files", "missing", ["devices", "--bench", str(missing)], str(missing)))
    cases.append(
        Case(
            "bench files",
            "a store as bench",
            ["devices", "--bench", str(w / "train.h5")],
            str(w / "train.h5"),
        )
    )
    return cases


def file_cases(w: Path) -> list[Case]:
    """Every file the tool reads, damaged every way."""
    ft = ["finetune", "--epochs", "1", "--out", str(w / "out" / "ft.pt")]
    readers = {  # reader → (source file, damages, argv with {} for the damaged path)
        "student": (
            "onn.pt",
            [*words("empty garbage truncated bitflip payload list folder"), "other kind"],
            [*ft, "--captures", "train.h5", "--method", "ce", "--checkpoint", "{}"],
        ),
        "teacher": (
            "teacher.pt",
            [*words("empty garbage truncated bitflip payload list folder"), "other kind"],
            [*ft, *words("--captures train.h5 --checkpoint onn.pt --method kd --teacher {}")],
        ),
        "store": (
            "train.h5",
            ["empty", "garbage", "truncated", "bitflip", "folder", "other kind"],
            [*ft, "--checkpoint", "onn.pt", "--method", "ce", "--captures", "{}"],
        ),
        "test store": (
            "test.h5",
            ["empty", "garbage", "truncated", "bitflip", "other kind"],
            [
                *ft,
                *words("--captures train.h5 --checkpoint onn.pt --method ce --test-captures {}"),
            ],
        ),
        "calibration": (
            "cal/calibration.h5",
            ["empty", "garbage", "truncated", "bitflip", "folder", "other kind"],
            ["capture", "--out", str(w / "out" / "c.h5"), "--calibration", "{}"],
        ),
    }
    other = {
        "student": "teacher.pt",
        "teacher": "onn.pt",
        "store": "cal/calibration.h5",
        "test store": "onn.pt",
        "calibration": "train.h5",
    }
    cases = []
    for reader, (source, damages, argv) in readers.items():
        for how in damages:
            if how == "other kind":
                path = w / other[reader]
            else:
                suffix = Path(source).suffix
                path = damaged(w, source, how, f"{reader.replace(' ', '-')}-{how}{suffix}")
            args = [a.replace("{}", str(path)) for a in argv]
            cases.append(Case("files", f"{reader}: {how}", args, str(path)))
        missing = w / "bad" / f"missing-{reader.replace(' ', '-')}{Path(source).suffix}"
        cases.append(
            Case(
                "files",
                f"{reader}: missing",
                [a.replace("{}", str(missing)) for a in argv],
                str(missing),
            )
        )
    for how in ("empty", "garbage", "truncated", "bitflip", "other kind"):  # train --resume
        state = w / "out" / f"resume-{how.replace(' ', '-')}.resume.pt"
        state.parent.mkdir(exist_ok=True)
        src = w / ("kd.pt" if how == "other kind" else "r.resume.pt")
        if how == "other kind":
            shutil.copy(src, state)
        else:
            shutil.copy(damaged(w, "r.resume.pt", how, state.name), state)
        out = state.with_name(state.name.replace(".resume.pt", ".pt"))
        cases.append(
            Case(
                "files",
                f"train resume state: {how}",
                [
                    *words("train --dataset digits --method none --epochs 3 --resume --out"),
                    str(out),
                ],
                str(state),
            )
        )
    for how in ("garbage", "truncated", "bitflip"):  # the teacher cache: recomputed, warned
        cache = next(w.glob("teacher.logits-*.pt"))
        folder = w / "out" / f"cache-{how}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(w / "teacher.pt", folder / "teacher.pt")
        shutil.copy(damaged(w, cache.name, how, f"cache-{how}.pt"), folder / cache.name)
        cases.append(
            Case(
                "files",
                f"teacher cache: {how}",
                [
                    *ft,
                    *words("--captures train.h5 --checkpoint onn.pt --method kd --teacher"),
                    str(folder / "teacher.pt"),
                ],
                str(folder / cache.name),
                warns=True,
            )
        )
    teach = ["teacher", "train", "--arch", "lenet", "--epochs", "1", "--out"]
    for how in ("missing", "empty", "garbage", "truncated"):  # MNIST IDX files
        root = w / "out" / f"mnist-{how}"
        shutil.copytree(w / "mnist", root, dirs_exist_ok=True)
        target = root / "train-images-idx3-ubyte"
        if how == "missing":
            target.unlink()
        else:
            target.write_bytes(damaged(w, "mnist/train-images-idx3-ubyte", how, "idx").read_bytes())
        cases.append(
            Case(
                "files",
                f"MNIST images: {how}",
                [*teach, str(root / "t.pt"), "--dataset", "mnist", "--data-root", str(root)],
                str(root) if how == "missing" else str(target),
            )
        )
    for how, data in (
        ("payload", pickle.dumps(_Payload(), 2)),
        ("shared refs 40 deep", _nested(40)),
        ("garbage", None),
        ("truncated", None),
    ):
        root = w / "out" / f"cifar-{how.replace(' ', '-')}"
        shutil.copytree(w / "cifar", root, dirs_exist_ok=True)
        target = root / "data_batch_1"
        if data is None:
            data = damaged(w, "cifar/data_batch_1", how, "batch").read_bytes()
        target.write_bytes(data)
        cases.append(
            Case(
                "files",
                f"CIFAR batch: {how}",
                [*teach, str(root / "t.pt"), "--dataset", "cifar10", "--data-root", str(root)],
                str(target),
            )
        )
    return cases


def store_edit_cases(w: Path) -> list[Case]:
    base = [
        *words("finetune --epochs 1 --out"),
        str(w / "out" / "ft.pt"),
        "--checkpoint",
        "onn.pt",
    ]
    ce = [*base, "--method", "ce", "--captures"]
    kd = [*base, "--method", "kd", "--teacher", "teacher.pt", "--captures"]
    with h5py.File(w / "train.h5", "r") as f:
        label0, index1 = int(f["labels"][0]), int(f["index"][1])
        nan = np.full(f["features"].shape[1:], np.nan, np.float32)
    edits = {
        "label 99": ({"labels": (0, 99)}, ce, "labels span"),
        "label changed (kd)": ({"labels": (0, (label0 + 1) % 10)}, kd, "other labels"),
        "all labels 0 in row 0 (kd)": ({"labels": (0, 0 if label0 else 1)}, kd, "other labels"),
        "index 1e9": ({"index": (2, 10**9)}, ce, "dataset index 1000000000"),
        "index duplicated": ({"index": (2, index1)}, ce, f"dataset index {index1}"),
        "NaN features": ({"features": (3, nan)}, ce, "non-finite"),
        "flipped label, old checksum": (None, ce, "checksum mismatch"),
        "schema 3": ({"attr:schema_version": (0, 3)}, ce, "older hil"),
        "identity garbage": ({"attr:identity": (0, "{not json")}, ce, "identity"),
    }
    cases = []
    for name, (rows, argv, said) in edits.items():
        fname = name.replace(" ", "-").replace("(", "").replace(")", "") + ".h5"
        if rows is None:
            path = w / "bad" / fname
            shutil.copy(w / "train.h5", path)
            with h5py.File(path, "a", libver="latest") as f:
                f["labels"][4] = (int(f["labels"][4]) + 1) % 10
        else:
            path = edited_store(w, fname, **rows)
        cases.append(Case("store edits", name, [*argv, str(path)], f"{path}: ", must=said))
    return cases


def read_only_folder(w: Path) -> Path:
    """A folder nobody may write: a read-only mount for root (whom permissions do not stop)."""
    ro = w / "out" / "read-only"
    ro.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    else:
        os.chmod(ro, 0o555)
    return ro


def output_cases(w: Path, ro: Path) -> list[Case]:
    train = ["train", "--dataset", "digits", "--method", "none", "--epochs", "1", "--out"]
    cap = ["capture", "--calibration", "cal/calibration.h5", "--out"]
    ft = words("finetune --captures train.h5 --checkpoint onn.pt --method ce --epochs 1 --out")
    long = "x" * 300 + ".h5"
    cases = [
        ("finetune --out its own --captures", [*ft, "train.h5"], "train.h5"),
        ("finetune --out its --checkpoint", [*ft, "onn.pt"], "onn.pt"),
        ("train --out a calibration", [*train, "cal/calibration.h5"], "cal/calibration.h5"),
        ("train --out a store", [*train, "train.h5"], "train.h5"),
        ("capture --out a checkpoint", [*cap, "onn.pt"], "onn.pt"),
        ("capture --out its --calibration", [*cap, "cal/calibration.h5"], "calibration.h5"),
        ('capture --out ""', [*cap, ""], "--out"),
        ("capture --out .", [*cap, "."], "--out"),
        ("capture --out /dev/null", [*cap, "/dev/null"], "/dev/null"),
        ("capture --out a 300-character name", [*cap, long], long[:40]),
        ("capture --out in a read-only folder", [*cap, str(ro / "c.h5")], str(ro)),
        ("train --out in a read-only folder", [*train, str(ro / "o.pt")], str(ro)),
        ("calibrate --out an existing file", ["calibrate", "--out", "onn.pt"], "onn.pt"),
        ("calibrate --out a read-only folder", ["calibrate", "--out", str(ro)], str(ro)),
        (
            "teacher train --out a store",
            words("teacher train --arch lenet --dataset digits --epochs 1 --out test.h5"),
            "test.h5",
        ),
        ("sim render --out a store", ["sim", "render", "img.npy", "--out", "train.h5"], "train.h5"),
    ]
    return [Case("outputs", name, argv, names) for name, argv, names in cases]


def option_cases(w: Path) -> list[Case]:
    ft = [
        *words("finetune --captures train.h5 --checkpoint onn.pt --epochs 1 --out"),
        str(w / "out" / "o.pt"),
    ]
    tr = ["train", "--dataset", "digits", "--epochs", "1", "--out", str(w / "out" / "o.pt")]
    cases = [
        ("finetune --fraction 0", [*ft, "--method", "ce", "--fraction", "0"], "--fraction"),
        ("finetune --fraction 1.5", [*ft, "--method", "ce", "--fraction", "1.5"], "--fraction"),
        ("finetune --method sgd", [*ft, "--method", "sgd"], "sgd"),
        ("finetune --device tpu", [*ft, "--method", "ce", "--device", "tpu"], "tpu"),
        (
            "finetune --device cuda (none here)",
            [*ft, "--method", "ce", "--device", "cuda"],
            "cuda",
        ),
        (
            "finetune --teacher an unknown arch",
            [*ft, "--method", "kd", "--teacher", "vgg99"],
            "vgg99",
        ),
        ("train --epochs 0", [*tr, "--epochs", "0"], "--epochs"),
        ("train --batch-size 1", [*tr, "--batch-size", "1"], "--batch-size"),
        ("train --kernels 0", [*tr, "--kernels", "0"], "--kernels"),
        ("train --norm bad", [*tr, "--norm", "bad"], "bad"),
        ("train --variant bad", [*tr, "--variant", "bad"], "bad"),
        ("train --projections 0", [*tr, "--projections", "0"], "--projections"),
        ("train --dataset nope", [*tr, "--dataset", "nope"], "nope"),
        ("train --dataset mnist without --data-root", [*tr, "--dataset", "mnist"], "--data-root"),
        ("train --frontend 5f", [*tr, "--frontend", "5f"], "5f"),
        ("train --backend fc9", [*tr, "--backend", "fc9"], "fc9"),
        (
            "capture --split nope",
            [
                *words("capture --calibration cal/calibration.h5 --out"),
                str(w / "out" / "s.h5"),
                "--split",
                "nope",
            ],
            "nope",
        ),
        ("calibrate --patterns 2", ["calibrate", "--patterns", "2"], "--patterns"),
    ]
    return [Case("options", name, argv, names) for name, argv, names in cases]


def run_inputs(w: Path) -> list[Outcome]:
    ro = read_only_folder(w)
    try:
        return _run_cases(w, ro)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)


def _run_cases(w: Path, ro: Path) -> list[Outcome]:
    cases = [
        *largest_cases(w),
        *bench_key_cases(w),
        *bench_file_cases(w),
        *file_cases(w),
        *store_edit_cases(w),
        *output_cases(w, ro),
        *option_cases(w),
    ]
    outcomes = []
    for i, case in enumerate(cases):
        code, _, err, seconds = forked(case.argv, case.limit_s)
        outcome = judge(case, code, err, seconds)
        if outcome.verdict == "clean" and case.must not in outcome.said:
            outcome.verdict = "unclear"
        outcomes.append(outcome)
        mark = "" if outcome.verdict == "clean" else f"  <-- {outcome.verdict}: {outcome.said}"
        print(
            f"[{i + 1}/{len(cases)}] {case.group}: {case.name} ({seconds:.1f} s){mark}", flush=True
        )
    if (w / "PWNED").exists():
        raise SystemExit("a pickle payload ran: PWNED exists")
    return outcomes


# -- kills ---------------------------------------------------------------------------------------

KILL_CAPTURE = words("capture --calibration cal/calibration.h5 --split test --fraction 0.15")


def _rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        n = int(f["committed"][0])
        return {k: f[k][:n] for k in ("features", "labels", "index")}


def _same_rows(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def run_kills(w: Path, per_signal: int) -> list[Outcome]:
    """Kill captures around the store's creation and through the capture, rerun, compare."""
    ref = w / "kills" / "ref.h5"
    ref.parent.mkdir(exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*HIL, *KILL_CAPTURE, "--out", str(ref)],
        cwd=w,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    created = None
    while proc.poll() is None:
        if created is None and any(ref.parent.glob("*ref.h5*")):
            created = time.monotonic() - t0
        time.sleep(0.005)
    total = time.monotonic() - t0
    created = created or total / 2
    expected = _rows(ref)
    near = [created + d for d in (-0.05, 0.0, 0.02, 0.05)]
    spread = list(np.linspace(0.3, total * 0.95, max(per_signal - len(near), 1)))
    delays = sorted([*near, *spread])[:per_signal]
    print(
        f"reference capture: {len(expected['index'])} rows in {total:.1f} s, store created "
        f"at {created:.2f} s; kills at {', '.join(f'{d:.2f}' for d in delays)} s"
    )
    plan = [(sig, [d]) for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM) for d in delays]
    # and reruns killed while they recover the store a SIGKILL left mid-capture
    mid = (created + total) / 2
    plan += [(signal.SIGKILL, [mid, created + d]) for d in (-0.05, 0.0, 0.05)]
    outcomes = []
    for k, (sig, kills) in enumerate(plan):
        out = w / "kills" / f"{sig.name}-{k}.h5"
        codes = [_killed(w, out, sig, delay) for delay in kills]
        rerun = hil(*KILL_CAPTURE, "--out", out, check=False, cwd=w, timeout=300)
        ok = rerun.returncode == 0 and out.exists() and _same_rows(_rows(out), expected)
        verdict = "resumed" if ok else "lost"
        said = rerun.stderr.strip().splitlines()[-1] if rerun.stderr.strip() and not ok else ""
        name = f"{sig.name} at {' s, then the rerun at '.join(f'{d:.2f}' for d in kills)} s"
        outcomes.append(Outcome("kills", name, verdict, codes[-1], kills[-1], said))
        print(f"  {name}: exit {codes}, rerun {rerun.returncode}, {verdict}", flush=True)
    return outcomes


def _killed(w: Path, out: Path, sig: signal.Signals, delay: float) -> int:
    """Start the capture into `out`, send `sig` after `delay` s; its exit code. The child gets
    SIGINT's default handling back: started in the background, a shell would have ignored it."""
    proc = subprocess.Popen(
        [*HIL, *KILL_CAPTURE, "--out", str(out)],
        cwd=w,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- disk full -------------------------------------------------------------------------------------


def run_disk(w: Path) -> list[Outcome]:
    if os.geteuid() != 0:
        print("disk full: skipped (mounting a tmpfs needs root)")
        return []
    disk = w / "disk"
    disk.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    outcomes = []
    try:
        capture = words("capture --calibration cal/calibration.h5 --split train --fraction 0.25")
        ref = hil(*capture, "--out", w / "disk-ref.h5", cwd=w)
        assert ref.returncode == 0
        expected = _rows(w / "disk-ref.h5")
        full = hil(*capture, "--out", disk / "s.h5", check=False, cwd=w, timeout=300)
        kept = _rows(disk / "s.h5")
        n = len(kept["index"])
        prefix = {k: v[:n] for k, v in expected.items()}
        lines = full.stderr.strip().splitlines()
        clean = full.returncode == 2 and "Traceback" not in full.stderr and "disk full" in lines[-1]
        intact = 0 < n < len(expected["index"]) and _same_rows(kept, prefix)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = hil(*capture, "--out", disk / "s.h5", check=False, cwd=w, timeout=300)
        resumed = again.returncode == 0 and _same_rows(_rows(disk / "s.h5"), expected)
        verdict = "clean" if clean and intact and resumed else "lost"
        outcomes.append(
            Outcome(
                "disk full",
                "capture",
                verdict,
                full.returncode,
                0,
                lines[-1],
                {
                    "committed_on_full_disk": n,
                    "planned": len(expected["index"]),
                    "rows_intact": intact,
                    "resumed_after_freeing": resumed,
                },
            )
        )
        for name, argv in (
            ("calibrate", ["calibrate", "--patterns", "8", "--out", str(disk / "cal")]),
            (
                "train",
                [
                    *words("train --dataset digits --method none --epochs 2 --out"),
                    str(disk / "onn.pt"),
                ],
            ),
        ):
            for p in disk.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            subprocess.run(["mount", "-o", "remount,size=3m", str(disk)], check=True)
            free = os.statvfs(disk)
            (disk / "filler").write_bytes(bytes(free.f_bavail * free.f_frsize - 64 * 1024))
            done = hil(*argv, check=False, cwd=w, timeout=300)
            lines = [x for x in done.stderr.splitlines() if x.startswith("error:")]
            left = sorted(p.name for p in disk.rglob("*") if ".tmp" in p.name)
            ok = done.returncode == 2 and len(lines) == 1 and "disk full" in lines[0] and not left
            ok = ok and "Traceback" not in done.stderr
            outcomes.append(
                Outcome(
                    "disk full",
                    name,
                    "clean" if ok else "unclear",
                    done.returncode,
                    0,
                    lines[0] if lines else done.stderr[-200:],
                    {"temporaries_left": left},
                )
            )
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    for o in outcomes:
        print(f"  {o.name}: {o.verdict}, exit {o.code}: {o.said} {o.detail}")
    return outcomes


# -- injected faults -------------------------------------------------------------------------------


def run_faults(w: Path) -> list[Outcome]:
    plans = {
        "2 timeouts after 50 frames": "{ timeouts = 2, after_frames = 50 }",
        "examples/rehearsal.toml: 2 timeouts, 1 disconnect": (
            "{ timeouts = 2, disconnects = 1, after_frames = 50, wait_s = 0.2 }"
        ),
        "3 disconnects after 10 frames": "{ disconnects = 3, after_frames = 10 }",
        "a camera that never answers": "{ timeouts = 1000, after_frames = 20, wait_s = 0.05 }",
    }
    outcomes = []
    for name, inject in plans.items():
        bench = bench_file(
            w,
            f"fault-{len(outcomes)}.toml",
            f"[devices.camera]\nretries = 5\nretry_backoff_s = 0.02\ninject = {inject}\n",
        )
        out = w / "out" / f"fault-{len(outcomes)}.h5"
        done = hil(
            "capture",
            "--bench",
            bench,
            "--calibration",
            "cal/calibration.h5",
            "--split",
            "train",
            "--fraction",
            "0.2",
            "--out",
            out,
            "--json",
            check=False,
            cwd=w,
            timeout=600,
        )
        if "never" in name:
            line = (done.stderr.strip().splitlines() or [""])[-1]
            ok = done.returncode == 3 and "camera" in line and "gave up after 6 attempts" in line
            outcomes.append(
                Outcome("faults", name, "clean" if ok else "unclear", done.returncode, 0, line)
            )
            continue
        result = json.loads(done.stdout) if done.returncode == 0 else {}
        retried = result.get("bench", {}).get("devices", {}).get("camera", {}).get("retried", [])
        rows = _rows(out)["index"] if out.exists() else []
        ok = done.returncode == 0 and len(rows) == result.get("planned") and retried
        outcomes.append(
            Outcome(
                "faults",
                name,
                "survived" if ok else "lost",
                done.returncode,
                0,
                done.stderr.strip()[-200:] if not ok else "",
                {"rows": len(rows), "planned": result.get("planned"), "retries": len(retried)},
            )
        )
    for o in outcomes:
        print(f"  {o.name}: {o.verdict} {o.detail or o.said}")
    return outcomes


# -- the report ----------------------------------------------------------------------------------


def report(outcomes: list[Outcome]) -> None:
    groups: dict[str, dict[str, int]] = {}
    for o in outcomes:
        groups.setdefault(o.group, {}).setdefault(o.verdict, 0)
        groups[o.group][o.verdict] += 1
    print("\n| part | cases | outcome |\n| --- | ---: | --- |")
    for group, verdicts in groups.items():
        text = ", ".join(f"{v} {k}" for k, v in sorted(verdicts.items(), key=lambda x: -x[1]))
        print(f"| {group} | {sum(verdicts.values())} | {text} |")
    bad = [o for o in outcomes if o.verdict not in ("clean", "resumed", "survived")]
    inputs = [o for o in outcomes if o.group not in ("kills", "disk full", "faults")]
    benches = [o for o in inputs if o.group.startswith(("bench", "largest"))]
    print(f"\ninputs: {sum(o.verdict == 'clean' for o in inputs)} of {len(inputs)} clean")
    if benches:
        slowest = max(benches, key=lambda o: o.seconds)
        print(f"slowest `hil devices`: {slowest.seconds:.1f} s ({slowest.group}: {slowest.name})")
    for o in bad:
        print(f"  {o.group}: {o.name}: {o.verdict} (exit {o.code}): {o.said}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="inputs,kills,disk,faults")
    parser.add_argument("--kills-per-signal", type=int, default=9)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it.")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    w = args.keep or Path(tempfile.mkdtemp(prefix="hil-audit-"))
    w.mkdir(parents=True, exist_ok=True)
    os.chdir(w)
    t0 = time.monotonic()
    if not (w / "train.h5").exists():
        print(f"fixtures in {w} ...", flush=True)
        fixtures(w)
    outcomes: list[Outcome] = []
    if "inputs" in parts:
        outcomes += run_inputs(w)
    if "kills" in parts:
        outcomes += run_kills(w, args.kills_per_signal)
    if "disk" in parts:
        outcomes += run_disk(w)
    if "faults" in parts:
        outcomes += run_faults(w)
    report(outcomes)
    print(f"\naudit took {time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    if args.keep is None:
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
