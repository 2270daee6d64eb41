"""Fine-tuning after fabrication: only the backend moves, and it undoes what it can represent."""

import json
import shutil

import numpy as np
import pytest
import torch
from cli_run import run_hil
from identities import identity
from stores import rewrite_row

from hil.acquire.identity import as_shown, pattern_hash
from hil.acquire.store import CaptureStore, Row, read
from hil.data.datasets import digits
from hil.data.placement import to_display
from hil.errors import UserError
from hil.jobs.finetune import FinetuneRequest, rows_for_training, run_finetune
from hil.jobs.train import Teaching
from hil.models.checkpoint import load_model, load_onn, save_model
from hil.models.onn import ONN, StudentSpec
from hil.training.loop import Settings, accuracy
from hil.training.student import train_student
from hil.training.teacher import save_teacher, train_teacher

# a fabricated frontend that the backend's per-map gain and offset can undo exactly
GAIN = torch.tensor([0.45, 1.6, 0.7, 1.3, 0.55, 1.2, 0.8, 1.5]).reshape(8, 1, 1)
OFFSET = torch.tensor([0.3, -0.2, 0.1, 0.25, -0.3, 0.15, -0.1, 0.2]).reshape(8, 1, 1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A student trained in simulation, and stores of what a miscalibrated frontend gives it."""
    root = tmp_path_factory.mktemp("finetune")
    data = digits()
    spec = StudentSpec(kernels=8, image_size=16, hidden=32)
    model, record = train_student(spec, data, "none", Settings(epochs=15, lr=1e-2))
    save_model(root / "onn.pt", "student", model)
    for split in ("train", "test"):
        idx = data.split(split)
        with torch.no_grad():
            x = torch.as_tensor(to_display(data.images[idx], (16, 16)))
            maps = (model.features(x) * GAIN + OFFSET).numpy()
        store = CaptureStore.open_for_capture(
            root / f"{split}.h5",
            plan=idx,
            feature_shape=maps.shape[1:],
            label_shape=(),
            identity=identity(split=split, input_shape=(16, 16), display_shape=(16, 16)),
        )
        with store:
            shown = as_shown(data.images[idx], (16, 16))
            for i, (k, f) in enumerate(zip(idx, maps, strict=True)):
                h = pattern_hash(shown[i])
                store.append(Row(int(k), f, int(data.labels[k]), float(i), 0.01, 0.0, h, True))
    teacher, t_record = train_teacher("lenet", data, Settings(epochs=2, lr=3e-3))
    save_teacher(teacher, t_record, root / "lenet.pt")
    return root, record["test_accuracy"]


def test_default_rows_are_ten_percent_of_the_split_stratified(bench):
    root, _ = bench
    caps = read(root / "train.h5")
    train, held, used = rows_for_training(caps, None, seed=0)
    assert used == pytest.approx(0.1)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(caps.index)
    counts = np.bincount(caps.labels[train], minlength=10)
    expected = np.round(0.1 * np.bincount(caps.labels, minlength=10))
    np.testing.assert_array_equal(counts, expected)
    # a store that already holds 10% of the split trains on all of it
    half = type(caps)(caps.features, caps.labels, caps.index, caps.meta, identity(fraction=0.1))
    assert rows_for_training(half, None, seed=0)[2] == 1.0


def test_ce_finetune_undoes_a_gain_and_offset_and_leaves_the_frontend_alone(bench, tmp_path):
    root, simulated = bench
    before = load_onn(root / "onn.pt")
    request = FinetuneRequest(
        root / "train.h5",
        root / "onn.pt",
        tmp_path / "ft.pt",
        Teaching("ce", "unused"),
        test_captures=root / "test.h5",
    )
    record = run_finetune(request, Settings(epochs=150, lr=1e-2, batch_size=64))
    tuned = load_onn(tmp_path / "ft.pt")
    assert torch.equal(tuned.frontend.raw, before.frontend.raw)
    # the miscalibration costs accuracy, and 10% of the train split buys it back
    assert record["before"]["test_accuracy"] < simulated - 0.1
    assert record["after"]["test_accuracy"] >= simulated - 0.03
    caps = read(root / "test.h5")
    direct = accuracy(tuned.backend, torch.as_tensor(caps.features), torch.as_tensor(caps.labels))
    assert record["after"]["test_accuracy"] == direct
    assert not (tmp_path / "ft.resume.pt").exists()


def test_cli_ntkd_finetune_with_a_teacher_checkpoint(bench, tmp_path, monkeypatch, capsys):
    root, _ = bench
    out = tmp_path / "ntkd.pt"
    args = ["finetune", "--captures", str(root / "train.h5"), "--checkpoint", str(root / "onn.pt")]
    args += ["--teacher", str(root / "lenet.pt"), "--method", "ntkd", "--epochs", "3"]
    args += ["--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--json", "--device", "auto"]
    code, out_text, _ = run_hil(monkeypatch, capsys, *args)
    assert code == 0
    result = json.loads(out_text)
    n = len(read(root / "train.h5").index)
    assert result["method"] == "ntkd" and abs(result["train_samples"] - 0.1 * n) <= 5
    assert result["train_samples"] + result["held_out_samples"] == n
    assert load_model(out, "student").record["method"] == "ntkd"
    if not torch.cuda.is_available():
        assert result["device"] == "cpu"
    assert list(root.glob("lenet.ntk-R64-p0-*.pt"))  # the teacher's features, beside it


def test_kd_finetune_reads_the_teachers_logits_from_its_cache(bench, tmp_path, monkeypatch):
    """The teacher's logits of the training rows, cached beside it: a rerun never calls it."""
    import hil.jobs.finetune
    from hil.training.teacher import load_teacher

    root, _ = bench
    calls = []

    def counted(*args):
        teacher, info, path = load_teacher(*args)
        teacher.register_forward_hook(lambda *_: calls.append(1))
        return teacher, info, path

    monkeypatch.setattr(hil.jobs.finetune, "load_teacher", counted)
    request = FinetuneRequest(
        root / "train.h5",
        root / "onn.pt",
        tmp_path / "kd.pt",
        Teaching("kd", str(root / "lenet.pt")),
    )
    first = run_finetune(request, Settings(epochs=2, batch_size=16))
    assert len(calls) == 1  # one batched pass over the ~108 rows, not one per step
    (cache,) = root.glob("lenet.logits-*.pt")
    teacher = load_teacher(str(root / "lenet.pt"), "digits")[0]
    caps = read(root / "train.h5")
    rows, _, _ = rows_for_training(caps, None, seed=0)
    raw = torch.as_tensor(digits().images[caps.index[rows]])
    with torch.no_grad():
        expected = teacher(raw)
    torch.testing.assert_close(torch.load(cache, weights_only=True)["value"], expected)
    again = run_finetune(request, Settings(epochs=2, batch_size=16))
    assert len(calls) == 1 and again["after"] == first["after"]


def test_a_store_captured_from_other_images_is_refused_naming_store_and_dataset(
    bench, tmp_path, monkeypatch, capsys
):
    root, _ = bench
    caps = read(root / "train.h5")
    moved = tmp_path / "moved.h5"  # every row claims the dataset index before the one it showed
    with CaptureStore.open_for_capture(
        moved,
        plan=np.maximum(caps.index - 1, 0),
        feature_shape=caps.features.shape[1:],
        label_shape=(),
        identity=caps.identity,
    ) as store:
        for i, k in enumerate(caps.index):
            h = str(caps.meta["pattern_hash"][i].decode())
            store.append(
                Row(max(int(k) - 1, 0), caps.features[i], int(caps.labels[i]), 0, 0.01, 0, h, True)
            )
    args = ["finetune", "--captures", moved, "--checkpoint", root / "onn.pt", "--epochs", "1"]
    args += ["--teacher", root / "lenet.pt", "--out", tmp_path / "x.pt"]
    code, _, err = run_hil(monkeypatch, capsys, *args, "--runs-dir", tmp_path / "runs")
    assert code == 2 and err.count("\n") == 1
    assert str(moved) in err and "'digits'" in err and f"{len(caps.index)} of" in err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("method", "label", "said"),
    [
        ("ce", 99, "labels span 0-99, but the student has 10 classes"),
        ("kd", "another", "1 rows carry other labels than dataset 'digits' gives"),
    ],
)
def test_labels_rewritten_with_their_checksums_are_refused_before_training(
    bench, tmp_path, monkeypatch, capsys, method, label, said
):
    root, _ = bench
    edited = tmp_path / "edited.h5"
    shutil.copy(root / "train.h5", edited)
    caps = read(edited)
    rewrite_row(edited, 3, labels=(caps.labels[3] + 1) % 10 if label == "another" else label)
    args = ["finetune", "--captures", edited, "--checkpoint", root / "onn.pt", "--epochs", "1"]
    args += ["--method", method, "--teacher", root / "lenet.pt", "--out", tmp_path / "x.pt"]
    code, _, err = run_hil(monkeypatch, capsys, *args, "--runs-dir", tmp_path / "runs")
    assert code == 2 and err.count("\n") == 1 and f"{edited}: " in err and said in err, err
    assert not (tmp_path / "x.pt").exists()


def test_user_errors_are_one_line(bench, tmp_path, monkeypatch, capsys):
    root, _ = bench
    other = tmp_path / "other.pt"
    save_model(other, "student", ONN(StudentSpec(kernels=4, image_size=16)))
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "student checkpoint not found"),
        (["--checkpoint", str(other)], "feature maps of shape (8, 16, 16)"),
        (["--checkpoint", str(root / "onn.pt"), "--method", "sgd"], "choose ce, kd or ntkd"),
    ]
    for extra, message in cases:
        code, _, err = run_hil(
            monkeypatch, capsys, "finetune", "--captures", root / "train.h5", *extra
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_bench_can_be_designed_from_a_trained_student(bench):
    from hil.bench.assembly import Bench
    from hil.bench.config import parse_bench

    root, _ = bench
    student = load_onn(root / "onn.pt")
    design = str(root / "onn.pt")
    config = parse_bench({"frontend": {"design": design}})
    world = Bench(config).world
    torch.testing.assert_close(world.designed.psfs, student.frontend.psfs.detach())
    bad = parse_bench({"frontend": {"design": design, "kernels": 4}})
    with pytest.raises(UserError, match=r"\(kernels, kernel_size, signed, channels\)"):
        Bench(bad)


def test_val_captures_keep_the_best_epoch_even_the_untouched_backend(bench, tmp_path):
    """A learning rate that wrecks the backend: with validation captures nothing is kept."""
    root, _ = bench
    wild = Settings(epochs=5, lr=10.0)
    ce = Teaching("ce", "unused")
    common = dict(fraction=0.05, test_captures=root / "test.h5")
    train, student = root / "train.h5", root / "onn.pt"
    kept = run_finetune(
        FinetuneRequest(
            train, student, tmp_path / "a.pt", ce, val_captures=root / "test.h5", **common
        ),
        wild,
    )
    assert kept["kept_epoch"] == -1
    assert kept["after"]["test_accuracy"] == kept["before"]["test_accuracy"]
    last = run_finetune(FinetuneRequest(train, student, tmp_path / "b.pt", ce, **common), wild)
    assert last["kept_epoch"] == 4
    assert last["after"]["test_accuracy"] < last["before"]["test_accuracy"] - 0.2
