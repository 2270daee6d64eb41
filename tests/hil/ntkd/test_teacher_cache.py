"""The teacher's cached logits and features: equal to the teacher's own outputs, computed once per
training set whatever the seed, keyed by the teacher's weights and the images."""

import logging

import pytest
import torch

from hil.data.datasets import digits
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import build_teacher
from hil.ntkd.losses import KD
from hil.ntkd.projected import ProjectedTeacher
from hil.ntkd.teacher_cache import (
    cache_file,
    data_digest,
    teacher_features,
    teacher_logits,
    weights_digest,
)
from hil.training.loop import Settings
from hil.training.student import student_inputs, train_student

SMALL = StudentSpec(kernels=2, kernel_size=3, image_size=16, hidden=16)


def counted(teacher: torch.nn.Module) -> list[int]:
    """A list whose length is the number of forward calls of `teacher` from now on."""
    calls: list[int] = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    return calls


def resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_teacher("resnet18", 1, 10)


def test_cached_logits_are_the_teachers_own_outputs_in_eval_mode(tmp_path):
    """Batched (16 at a time, the last batch partial) in eval mode, whatever mode it was in:
    each row is what the teacher says of that image alone."""
    teacher = resnet()
    raw = torch.as_tensor(digits().images[:40])
    path = tmp_path / "logits.pt"
    teacher.train()  # BatchNorm on batch statistics would make a row depend on its batch
    logits = teacher_logits(teacher, raw, path, batch_size=16)
    with torch.no_grad():
        alone = torch.cat([teacher.eval()(raw[i : i + 1]) for i in range(len(raw))])
    assert logits.shape == (40, 10) and logits.device.type == "cpu"
    torch.testing.assert_close(logits, alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(teacher_logits(teacher, raw, path), logits, atol=0, rtol=0)
    state = torch.load(path, weights_only=True)
    assert state["teacher"] == weights_digest(teacher) and state["data"] == data_digest(raw)


def test_a_kd_step_on_cached_logits_is_the_step_on_the_teachers_pass(tmp_path):
    """Loss and every gradient of one KD step from the cache's rows of a batch (by dataset index)
    equal those from a teacher pass on the batch's raw images."""
    data, teacher = digits(), resnet()
    train = student_inputs(data, "train", SMALL)
    cached = teacher_logits(teacher, train["raw"], tmp_path / "logits.pt")
    idx = torch.randperm(len(train["y"]), generator=torch.Generator().manual_seed(3))[:128]
    with torch.no_grad():
        passed = teacher.eval()(train["raw"][idx])
    terms, grads = [], []
    for logits in (cached[idx], passed):
        student = ONN(SMALL)
        t = KD()(student, {"x": train["x"][idx], "y": train["y"][idx], "teacher_logits": logits})
        t["total"].backward()
        terms.append(t)
        grads.append({n: p.grad for n, p in student.named_parameters()})
    for k in ("ce", "kd", "total"):
        torch.testing.assert_close(terms[0][k], terms[1][k], atol=1e-6, rtol=1e-6)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["kd", "ntkd"])
def test_the_cache_serves_every_seed_without_the_teacher(tmp_path, method):
    """The first run computes the teacher's logits (features) once, batched, not per step; a
    run with another seed reads them and never calls the teacher."""
    data = digits()
    teacher = build_teacher("lenet", 1, 10)
    calls = counted(teacher)
    beside = tmp_path / "lenet.pt"
    n = len(data.split("train"))
    settings = Settings(epochs=3, batch_size=128)  # 27 steps
    train_student(
        SMALL, data, method, settings, teacher=teacher, teacher_cache=beside, projections=4
    )
    first = len(calls)
    if method == "kd":
        assert first == -(-n // 256)  # one pass per batch of the set
    else:  # batches as large as fit (`plan_batch`), never one per training step
        assert 0 < first <= -(-n // 128)
    other = Settings(epochs=1, batch_size=256, seed=1)
    spec = StudentSpec(**(SMALL.to_dict() | {"seed": 1}))
    train_student(spec, data, method, other, teacher=teacher, teacher_cache=beside, projections=4)
    assert len(calls) == first
    (file,) = tmp_path.glob("lenet.*.pt")
    raw = student_inputs(data, "train", SMALL)["raw"]
    tags = {"R": 4, "p": 0, "pool": None} if method == "ntkd" else {}
    assert file == cache_file(beside, "ntk" if method == "ntkd" else "logits", raw, **tags)


def test_the_features_do_not_depend_on_the_run_seed(tmp_path):
    """The projections are seeded by the projection seed (0), so seeds 0 and 1 share one file
    and both equal ProjectedTeacher(seed=0)."""
    data = digits()
    teacher = build_teacher("lenet", 1, 10)
    raw = student_inputs(data, "train", SMALL)["raw"]
    beside = tmp_path / "lenet.pt"
    for seed in (0, 1):
        train_student(
            StudentSpec(**(SMALL.to_dict() | {"seed": seed})),
            data,
            "ntkd",
            Settings(epochs=1, batch_size=512, seed=seed),
            teacher=teacher,
            teacher_cache=beside,
            projections=3,
        )
    (file,) = tmp_path.glob("lenet.ntk-*.pt")
    expected = ProjectedTeacher(teacher, projections=3, seed=0).features_dataset(raw)
    torch.testing.assert_close(torch.load(file, weights_only=True)["value"], expected)


def test_another_teacher_or_other_images_are_computed_again(tmp_path):
    raw = torch.rand(6, 1, 8, 8)
    path = tmp_path / "logits.pt"
    first, second = resnet(0), resnet(1)
    a = teacher_logits(first, raw, path)
    calls = counted(second)
    b = teacher_logits(second, raw, path)  # same file, retrained teacher
    assert calls and not torch.allclose(a, b)
    with torch.no_grad():
        torch.testing.assert_close(b, second.eval()(raw), atol=1e-6, rtol=1e-6)
    other = raw.clone()
    other[0, 0, 0, 0] += 1e-3
    calls.clear()
    teacher_logits(second, other, path)  # same teacher, one pixel changed
    assert calls
    assert cache_file(path, "logits", raw) != cache_file(path, "logits", other)


@pytest.mark.parametrize("content", [b"\x00not a torch file", "foreign", "flipped"])
def test_a_damaged_cache_is_computed_again_with_a_warning(tmp_path, caplog, content):
    """A cache holds only what can be computed again: an unreadable or foreign file is replaced
    (one warning naming it), and the value is the teacher's."""
    raw = torch.rand(5, 1, 8, 8)
    teacher = resnet()
    path = tmp_path / "logits.pt"
    if content == "foreign":
        torch.save({"features": torch.zeros(5, 10, 4)}, path)  # e.g. the old feature cache
    elif content == "flipped":  # one bit of one cached logit, which torch.load does not notice
        value = teacher_logits(teacher, raw, path)
        data = bytearray(path.read_bytes())
        data[data.find(value.numpy().tobytes()) + 2] ^= 0x04
        path.write_bytes(bytes(data))
    else:
        teacher_logits(teacher, raw, path)
        path.write_bytes(path.read_bytes()[:100] + content)  # truncated mid-file
    calls = counted(teacher)
    with caplog.at_level(logging.WARNING, logger="hil"):
        logits = teacher_logits(teacher, raw, path)
    assert calls
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in warning.getMessage() and "computing it again" in warning.getMessage()
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher.eval()(raw), atol=1e-6, rtol=1e-6)
    calls.clear()
    torch.testing.assert_close(teacher_logits(teacher, raw, path), logits, atol=0, rtol=0)
    assert not calls  # the replaced file serves the next call


def test_features_keep_the_projected_teachers_values(tmp_path):
    """The feature cache holds ProjectedTeacher's features for the projection seed asked."""
    torch.manual_seed(0)
    teacher = build_teacher("lenet", 1, 10)
    raw = torch.rand(6, 1, 8, 8)
    path = tmp_path / "f.pt"
    got = teacher_features(teacher, raw, path, projections=3, seed=5)
    expected = ProjectedTeacher(teacher, projections=3, seed=5).features_dataset(raw)
    torch.testing.assert_close(got, expected)
    calls = counted(teacher)
    torch.testing.assert_close(teacher_features(teacher, raw, path, 3, 5), got, atol=0, rtol=0)
    assert not calls
    teacher_features(teacher, raw, path, 3, 6)  # another sketch of the teacher
    assert calls
