"""Training: resume gives the run an uninterrupted one would, torchrun runs it data-parallel."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hil.data.datasets import digits
from hil.errors import UserError
from hil.models.checkpoint import load_model
from hil.models.onn import StudentSpec
from hil.output.torchfile import load_checkpoint
from hil.training.loop import Settings, resume_path
from hil.training.student import student_inputs, train_student

SMALL = StudentSpec(kernels=2, kernel_size=3, image_size=16, hidden=16)
HIL = [sys.executable, "-m", "hil"]
SMALL_ARGS = ["--kernels", "2", "--kernel-size", "3", "--method", "none", "--batch-size", "256"]


def test_resuming_reproduces_an_uninterrupted_run(tmp_path):
    data = digits()
    full, _ = train_student(SMALL, data, "ce", Settings(epochs=3), out=tmp_path / "a.pt")
    assert not resume_path(tmp_path / "a.pt").exists()  # a finished run leaves its model file only

    def stop_after_epoch_1(metrics):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(
            SMALL,
            data,
            "ce",
            Settings(epochs=3),
            out=tmp_path / "b.pt",
            on_epoch=stop_after_epoch_1,
        )
    assert (
        not (tmp_path / "b.pt").exists() and load_checkpoint(tmp_path / "b.resume.pt")["epoch"] == 1
    )
    seen = []
    resumed, record = train_student(
        SMALL,
        data,
        "ce",
        Settings(epochs=3),
        out=tmp_path / "b.pt",
        resume=True,
        on_epoch=lambda m: seen.append(m["epoch"]),
    )
    assert seen == [2] and [h["epoch"] for h in record["history"]] == [0, 1, 2]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    stored, kept = load_model(tmp_path / "b.pt", "student")
    for (name, a), b in zip(full.state_dict().items(), stored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert kept["test_accuracy"] == record["test_accuracy"] and "history" not in kept
    assert not resume_path(tmp_path / "b.pt").exists()


@pytest.mark.parametrize("damage", ["flipped", "another model"])
def test_a_damaged_or_foreign_resume_state_is_one_line_naming_it(tmp_path, damage):
    data, out = digits(), tmp_path / "b.pt"

    def stop(metrics):
        raise KeyboardInterrupt

    spec = SMALL if damage == "flipped" else StudentSpec(kernels=3, kernel_size=3, image_size=16)
    with pytest.raises(KeyboardInterrupt):
        train_student(spec, data, "ce", Settings(epochs=3), out=out, on_epoch=stop)
    state = resume_path(out)
    if damage == "flipped":
        stored = bytearray(state.read_bytes())
        weight = load_checkpoint(state)["model"]["backend.5.weight"].numpy().tobytes()
        stored[stored.find(weight) + 9] ^= 0x01
        state.write_bytes(bytes(stored))
    said = "damaged: its content no longer matches" if damage == "flipped" else "another model"
    with pytest.raises(UserError, match=f"^{state}: .*{said}") as e:
        train_student(SMALL, data, "ce", Settings(epochs=3), out=out, resume=True)
    assert len(str(e.value).splitlines()) == 1


def test_the_student_is_the_epoch_that_scored_best_on_val():
    """Small batches at a high learning rate: val accuracy falls in the last epoch, and the
    student that comes back scores on val what the best epoch scored (the record names it)."""
    data = digits()
    model, record = train_student(SMALL, data, "ce", Settings(epochs=6, lr=0.03, batch_size=32))
    scores = [h["val_accuracy"] for h in record["history"]]
    assert max(scores) > scores[-1]  # the last epoch is not the best
    assert record["best_epoch"] == scores.index(max(scores))
    assert record["val_accuracy"] == max(scores)


def test_under_torchrun_each_rank_trains_on_its_own_gpu():
    """`cuda` under torchrun means cuda:LOCAL_RANK (DDP with one GPU per process); an explicit
    cuda:N, the CPU and single-process runs keep what was asked."""
    from hil.training.loop import rank_device

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert rank_device(cuda, 4, 3) == torch.device("cuda", 3)
    assert rank_device(torch.device("cuda:1"), 4, 3) == torch.device("cuda", 1)
    assert rank_device(cuda, 1, 0) == cuda and rank_device(cpu, 4, 3) == cpu


def env(tmp_path) -> dict:
    return os.environ | {"HIL_TEACHERS": str(tmp_path / "teachers"), "OMP_NUM_THREADS": "1"}


def test_an_interrupted_train_continues_from_its_last_epoch(tmp_path):
    out = tmp_path / "onn.pt"
    args = [*HIL, "train", *SMALL_ARGS, "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        [*args, "--epochs", "200"],
        env=env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a shell's background job (CI's, perhaps) ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    resume = tmp_path / "onn.resume.pt"
    deadline = time.monotonic() + 120
    while not resume.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and resume.exists() and not out.exists(), err.decode()[-2000:]
    done = load_checkpoint(resume)["epoch"]
    assert done < 199
    result = subprocess.run(
        [*args, "--epochs", str(done + 3), "--resume", "--json"],
        env=env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    epochs = [m["epoch"] for m in json.loads((tmp_path / run_dir / "metrics.json").read_text())]
    assert epochs == list(range(done + 3))
    # the finished run wrote the model file, with no optimizer state, and removed its resume state
    stored = load_checkpoint(out)
    assert stored["format"] == "hil-model" and stored["kind"] == "student"
    assert "optimizer" not in stored and "epoch" not in stored and not resume.exists()
    assert stored["record"]["test_accuracy"] == json.loads(result.stdout)["test_accuracy"]
    interrupted = [
        json.loads((d / "result.json").read_text())["status"] for d in (tmp_path / "runs").iterdir()
    ]
    assert "interrupted" in interrupted


def test_torchrun_trains_data_parallel_and_writes_one_checkpoint(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "onn.pt"
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "hil",
            "train",
            *SMALL_ARGS,
            "--epochs",
            "2",
            "--out",
            str(out),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--json",
        ],
        env=env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert [p.name for p in tmp_path.glob("*.pt")] == ["onn.pt"]
    assert json.loads(result.stdout)["epochs_run"] == 2
    model, record = load_model(out, "student")
    assert (
        model.spec.kernels == 2
        and record["test_accuracy"] == json.loads(result.stdout)["test_accuracy"]
    )


def test_a_missing_teacher_says_how_to_train_one(tmp_path):
    result = subprocess.run(
        [*HIL, "train", "--method", "kd", "--teacher", "resnet18"],
        env=env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "hil teacher train --arch resnet18 --dataset digits" in result.stderr.decode()


@pytest.mark.parametrize(("method", "augment"), [("kd", False), ("ntkd", False), ("ntkd", True)])
def test_distillation_runs_with_a_small_teacher(tmp_path, method, augment):
    from hil.ntkd.augment import FabricationAugment
    from hil.training.teacher import train_teacher

    data = digits()
    teacher, _ = train_teacher("lenet", data, Settings(epochs=1))
    student, record = train_student(
        SMALL,
        data,
        method,
        Settings(epochs=1, batch_size=256),
        teacher=teacher,
        projections=8,
        augment=FabricationAugment() if augment else None,
    )
    terms = record["history"][0]
    test = student_inputs(data, "test", SMALL)
    with torch.no_grad():
        said = student.eval()(test["x"]).argmax(1)
    assert record["test_accuracy"] == pytest.approx((said == test["y"]).double().mean().item())
    assert ("kd" if method == "kd" else "ntk") in terms
    assert "val_accuracy" in terms and all(map(math.isfinite, terms.values()))


def test_cached_teacher_features_belong_to_one_teacher(tmp_path):
    """A retrained teacher under the same cache name gets its own features, not stale ones."""
    from hil.models.teachers import build_teacher
    from hil.ntkd.projected import ProjectedTeacher
    from hil.ntkd.teacher_cache import teacher_features

    raw = torch.rand(6, 1, 8, 8)
    cache = tmp_path / "features.pt"
    torch.manual_seed(0)
    first = build_teacher("lenet", 1, 10).eval()
    a = teacher_features(first, raw, cache, projections=3, seed=1)
    torch.testing.assert_close(teacher_features(first, raw, cache, 3, 1), a)
    torch.manual_seed(1)
    second = build_teacher("lenet", 1, 10).eval()
    b = teacher_features(second, raw, cache, projections=3, seed=1)
    expected = ProjectedTeacher(second, projections=3, seed=1).features_dataset(raw, batch_size=128)
    torch.testing.assert_close(b, expected)
    assert not torch.allclose(a, b)


def test_the_device_reaches_the_model_every_batch_and_the_teacher(monkeypatch):
    """Everything a step computes with passes `settings.device` on its way: the student, each
    batch with its cached teacher features (the NTK code's inputs), the validation batches, and
    the teacher whose features are cached."""
    import hil.ntkd.teacher_cache
    import hil.training.loop
    from hil.device import to_device
    from hil.models.teachers import build_teacher
    from hil.ntkd.factored import ntk_and_outputs

    device = torch.device("cpu")
    seen: list[tuple[str, object]] = []

    def spy(value, to):
        kind = sorted(value) if isinstance(value, dict) else type(value).__name__
        seen.append((str(kind), torch.device(to)))
        return to_device(value, to)

    kernels: list[torch.device] = []

    def watched_ntk(model, x, params=None, **pooled):
        kernels.append(x.device)
        return ntk_and_outputs(model, x, params, **pooled)

    monkeypatch.setattr(hil.training.loop, "to_device", spy)
    monkeypatch.setattr(hil.ntkd.teacher_cache, "to_device", spy)
    monkeypatch.setattr("hil.ntkd.losses.ntk_and_outputs", watched_ntk)
    data = digits()
    teacher = build_teacher("lenet", 1, 10)
    settings = Settings(epochs=1, batch_size=512, device=str(device))
    _, record = train_student(SMALL, data, "ntkd", settings, teacher=teacher, projections=2)
    batch = str(["teacher_features", "x", "y"])
    steps = -(-len(data.split("train")) // 512)
    assert seen.count(("LeNet", device)) == 1  # the teacher, for its features
    assert seen.count(("ONN", device)) == 1  # the student, once, before its first step
    assert seen.count((batch, device)) == steps
    assert seen.count(("Tensor", device)) >= 3  # validation and test batches
    assert {to for _, to in seen} == {device} and kernels == [device] * steps
    assert record["device"] == "cpu"


def test_hil_train_hands_the_device_it_resolved_to_the_loop(tmp_path, monkeypatch, capsys):
    """`--device cuda` on a machine that has it: the settings the job trains with name it."""
    from cli_run import run_hil

    import hil.jobs.train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    got = {}

    def stop(spec, data, method, settings, **kw):
        got["device"] = settings.device
        raise KeyboardInterrupt  # the job stops here: nothing is trained on a missing GPU

    monkeypatch.setattr(hil.jobs.train, "train_student", stop)
    args = [*SMALL_ARGS, "--device", "cuda", "--runs-dir", tmp_path / "runs"]
    code, _, _ = run_hil(monkeypatch, capsys, "train", *args, "--out", tmp_path / "onn.pt")
    assert code == 130 and got == {"device": "cuda"}
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "command.json").read_text())["device"] == "cuda"
    assert json.loads((run / "result.json").read_text())["device"] == "cuda"
