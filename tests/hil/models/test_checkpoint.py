"""Model files: one format for students and teachers, read back exactly, anything else one line."""

import pytest
import torch

from hil.data.datasets import digits
from hil.errors import UserError
from hil.models.checkpoint import load_model, load_onn, save_model
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import build_teacher
from hil.output.torchfile import load_checkpoint, save_checkpoint
from hil.training.loop import Settings
from hil.training.teacher import load_teacher, save_teacher, train_teacher

SPEC = StudentSpec(kernels=2, kernel_size=3, image_size=16, hidden=16, seed=3)
LENET = {"arch": "lenet", "in_channels": 1, "classes": 10}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_a_student_round_trips_exactly(tmp_path):
    model = ONN(SPEC)
    with torch.no_grad():  # weights no seed gives, so nothing is rebuilt from the spec alone
        model.frontend.raw.add_(0.25)
    record = {"method": "ce", "test_accuracy": 0.5}
    save_model(tmp_path / "onn.pt", "student", model, record)
    back, kept = load_model(tmp_path / "onn.pt", "student")
    _same_weights(model, back)
    assert back.spec == SPEC and kept == record and not back.training
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), back(x))
    assert isinstance(load_onn(tmp_path / "onn.pt"), ONN)


def test_a_trained_teacher_round_trips_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("HIL_TEACHERS", str(tmp_path))
    data = digits()
    model, record = train_teacher("lenet", data, Settings(epochs=1, seed=0))
    save_teacher(model, record, tmp_path / "digits-lenet.pt")
    back, info, path = load_teacher("lenet", "digits")
    assert path == tmp_path / "digits-lenet.pt"
    _same_weights(model, back)
    assert info == {k: v for k, v in record.items() if k != "history"}
    x = torch.as_tensor(data.images[:16])
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    stored = torch.load(path, weights_only=True)
    assert (stored["format"], stored["schema_version"], stored["kind"]) == (
        "hil-model",
        1,
        "teacher",
    )
    assert {k: stored[k] for k in LENET} == LENET


def _one_line(match: str, load, *args) -> None:
    with pytest.raises(UserError) as e:
        load(*args)
    assert len(str(e.value).splitlines()) == 1 and match in str(e.value), str(e.value)


def test_the_other_kind_is_refused_in_one_line(tmp_path):
    save_model(tmp_path / "t.pt", "teacher", build_teacher("lenet", 1, 10), arch=LENET)
    save_model(tmp_path / "s.pt", "student", ONN(SPEC))
    _one_line(
        f"{tmp_path / 't.pt'}: a teacher checkpoint, not a student", load_onn, tmp_path / "t.pt"
    )
    _one_line(
        f"{tmp_path / 's.pt'}: a student checkpoint, not a teacher",
        load_teacher,
        str(tmp_path / "s.pt"),
        "digits",
    )


def test_foreign_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    save_checkpoint(tmp_path / "dict.pt", {"weights": torch.zeros(2)})
    save_checkpoint(tmp_path / "resume.pt", {"format": "hil-resume", "optimizer": {}})
    model = ONN(SPEC)
    save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "spec": SPEC.to_dict()})
    save_model(tmp_path / "new.pt", "student", model)
    newer = load_checkpoint(tmp_path / "new.pt") | {"schema_version": 2}
    save_checkpoint(tmp_path / "new.pt", newer)
    damaged = newer | {"schema_version": 1, "spec": SPEC.to_dict() | {"kernels": 4}}
    save_checkpoint(tmp_path / "damaged.pt", damaged)
    cases = {
        "missing.pt": "student checkpoint not found",
        "empty.pt": "an empty file, not a hil model file",
        "junk.pt": "not a hil model file (not readable as a PyTorch file)",
        "dict.pt": "not a hil model file (a PyTorch file of another program)",
        "resume.pt": "not a hil model file (a resume state of an unfinished run",
        "old.pt": "not a hil model file (a hil checkpoint of the format before schema 1",
        "new.pt": "hil model file schema 2, this hil reads schema 1",
        "damaged.pt": "a damaged student checkpoint (Error(s) in loading state_dict for ONN",
    }
    for name, message in cases.items():
        _one_line(f"{tmp_path / name}: {message}", load_onn, tmp_path / name)
    _one_line("not a hil model file", load_teacher, str(tmp_path / "junk.pt"), "digits")


def test_a_flipped_bit_in_a_weight_is_refused_naming_the_file(tmp_path):
    model = ONN(SPEC)
    save_model(tmp_path / "s.pt", "student", model)
    data = bytearray((tmp_path / "s.pt").read_bytes())
    weight = model.backend[-1].weight.detach().numpy().tobytes()  # stored uncompressed in the zip
    at = data.find(weight)
    assert at > 0
    data[at + 5] ^= 0x10
    (tmp_path / "s.pt").write_bytes(bytes(data))
    _one_line(
        f"{tmp_path / 's.pt'}: damaged: its content no longer matches the digest",
        load_onn,
        tmp_path / "s.pt",
    )


def test_a_teacher_of_another_dataset_is_refused(tmp_path):
    model = build_teacher("lenet", 1, 10)
    save_model(tmp_path / "t.pt", "teacher", model, {"dataset": "shapes"}, arch=LENET)
    _one_line(
        "t.pt: a teacher for shapes, not digits", load_teacher, str(tmp_path / "t.pt"), "digits"
    )


def test_save_model_needs_a_teachers_architecture(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        save_model(tmp_path / "t.pt", "teacher", build_teacher("lenet", 1, 10))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
