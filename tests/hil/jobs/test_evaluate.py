"""`hil evaluate`: scores equal what the backend gives on the store; pictures a person can open."""

import json

import cv2
import numpy as np
import pytest
import torch
from cli_run import run_hil
from identities import identity
from torch import nn

from hil.acquire.store import Captures, CaptureStore, Row, read
from hil.errors import UserError
from hil.jobs.evaluate import evaluate_captures, evaluate_store
from hil.models.checkpoint import save_model
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import build_teacher
from hil.output.figures import save_overlay_png


class Encoded(nn.Module):
    """A backend whose answer is written into its input: logits = one-hot of map 0's corner
    (classification), or the maps themselves (segmentation), so predictions are known."""

    def __init__(self, classes: int, per_pixel: bool) -> None:
        super().__init__()
        self.classes, self.per_pixel = classes, per_pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_pixel:
            return x
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), self.classes).float()


def write_store(path, features, labels):
    with CaptureStore.open_for_capture(
        path,
        plan=np.arange(len(features)),
        feature_shape=features.shape[1:],
        label_shape=labels.shape[1:],
        identity=identity(dataset="hand-made"),
    ) as store:
        for i, (f, y) in enumerate(zip(features, labels, strict=True)):
            store.append(Row(i, f, y, 0.0, 0.01, 0.0, "0" * 40, True))


def test_accuracy_and_confusion_equal_the_known_predictions(tmp_path):
    truth = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    said = np.array([0, 1, 1, 1, 2, 2, 2, 0, 2, 3])
    features = np.zeros((10, 8, 32, 32), np.float32)
    features[:, 0, 0, 0] = said
    write_store(tmp_path / "s.h5", features, truth)
    model = ONN(StudentSpec(classes=4))
    model.backend = Encoded(4, per_pixel=False)
    got = evaluate_store(model, tmp_path / "s.h5")
    assert got["task"] == "classification" and got["n"] == 10
    assert got["accuracy"] == pytest.approx(7 / 10)
    expected = np.zeros((4, 4), int)
    for t, s in zip(truth, said, strict=True):
        expected[t, s] += 1
    assert np.array_equal(got["confusion"], expected)
    assert got["per_class"] == {"support": [2, 3, 4, 1], "correct": [1, 2, 3, 1]}


def test_miou_of_a_hand_computed_example():
    """An 8x8 mask on a 32x32 display is scaled by 3 (75% fill) into rows and columns 4-27, the
    rest of the display is not scored; the mask's left half (display columns 4-15) is class 1.
    The prediction puts class 1 on rows 4-15, columns 10-21, and on row 0 (outside: ignored)."""
    mask = np.zeros((1, 8, 8), np.int64)
    mask[0, :, :4] = 1
    predicted = np.zeros((1, 32, 32), np.int64)
    predicted[0, 4:16, 10:22] = 1
    predicted[0, 0, :] = 1
    features = np.eye(3, dtype=np.float32)[predicted].transpose(0, 3, 1, 2)  # logits = one-hot
    model = ONN(StudentSpec(kernels=3, classes=3, backend="updecoder"))
    model.backend = Encoded(3, per_pixel=True)
    got = evaluate_captures(model, Captures(features, mask, np.arange(1), {}, {}), "hand-made")
    # class 1: truth 24x12 = 288 px, predicted 12x12 = 144 px, both 12x6 = 72 px
    iou1 = 72 / (288 + 144 - 72)
    # class 0: truth 288 px, predicted 576 - 144 = 432 px, both 288 - 12x6 = 216 px
    iou0 = 216 / (288 + 432 - 216)
    assert got["iou"] == [pytest.approx(iou0), pytest.approx(iou1), None]  # class 2: absent
    assert got["miou"] == pytest.approx((iou0 + iou1) / 2)
    assert got["pixel_accuracy"] == pytest.approx((72 + 216) / 576)
    assert np.array_equal(got["confusion"], [[216, 72, 0], [216, 72, 0], [0, 0, 0]])


def test_a_store_the_student_cannot_read_is_one_clear_error(tmp_path):
    write_store(tmp_path / "s.h5", np.zeros((2, 4, 32, 32), np.float32), np.array([0, 1]))
    with pytest.raises(
        UserError,
        match=r"s\.h5: feature maps of shape \(4, 32, 32\), but the student takes \(8, 32, 32\)",
    ):
        evaluate_store(ONN(StudentSpec()), tmp_path / "s.h5")
    write_store(tmp_path / "t.h5", np.zeros((2, 8, 32, 32), np.float32), np.array([0, 7]))
    with pytest.raises(UserError, match=r"t\.h5: labels span 0-7, but the student has 2"):
        evaluate_store(ONN(StudentSpec(classes=2)), tmp_path / "t.h5")


def test_overlay_png_shows_the_masks(tmp_path):
    images = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    masks = np.zeros((2, 32, 32), np.int64)
    masks[:, 8:24, 8:24] = 1
    path = save_overlay_png(images, masks, masks, tmp_path / "o.png", "two samples")
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape[0] > picture.shape[1] * 0.5


def test_evaluate_on_the_simulated_bench_reports_what_the_backend_gives(
    calibration, tmp_path, monkeypatch, capsys
):
    model = ONN(StudentSpec(seed=5))
    checkpoint = tmp_path / "onn.pt"
    save_model(checkpoint, "student", model)
    common = ("--checkpoint", checkpoint, "--calibration", calibration, "--fraction", "0.05")
    args = (*common, "--runs-dir", tmp_path / "runs", "--json")
    code, out, err = run_hil(monkeypatch, capsys, "evaluate", *args, "--out", tmp_path / "e")
    assert code == 0, err
    result = json.loads(out)
    captures = read(tmp_path / "e" / "captures.h5")
    with torch.no_grad():
        said = model.eval().backend(torch.as_tensor(captures.features)).numpy().argmax(1)
    assert result["n"] == len(captures.index) == result["capture"]["planned"] == 20
    assert result["accuracy"] == pytest.approx(np.mean(said == captures.labels))
    assert np.trace(result["confusion"]) == np.sum(said == captures.labels)
    picture = cv2.imread(result["figure"])
    assert picture is not None and min(picture.shape[:2]) > 200
    # the same store again, named: nothing is recaptured and the scores are the same
    code, out, err = run_hil(
        monkeypatch, capsys, "evaluate", *args, "--captures", tmp_path / "e" / "captures.h5"
    )
    assert code == 0, err
    again = json.loads(out)
    assert again["capture"]["resumed_from"] == 20 and again["accuracy"] == result["accuracy"]
    # a store from another capture is refused in one line
    code, out, err = run_hil(
        monkeypatch,
        capsys,
        "evaluate",
        *args,
        "--seed",
        "1",
        "--captures",
        tmp_path / "e" / "captures.h5",
    )
    assert code == 2 and err.count("\n") == 1 and "differs in indices_digest, seed" in err


def test_a_missing_or_foreign_checkpoint_is_one_line(calibration, tmp_path, monkeypatch, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    teacher = tmp_path / "teacher.pt"
    arch = {"arch": "lenet", "in_channels": 1, "classes": 10}
    save_model(teacher, "teacher", build_teacher("lenet", 1, 10), arch=arch)
    small = tmp_path / "small.pt"
    student = ONN(StudentSpec(kernels=4))
    save_model(small, "student", student)
    cases = [
        (tmp_path / "none.pt", "not found"),
        (junk, "not a hil model file"),
        (teacher, "a teacher checkpoint, not a student"),
        (small, "but the student takes (4, 32, 32)"),
    ]
    for checkpoint, message in cases:
        code, out, err = run_hil(
            monkeypatch,
            capsys,
            "evaluate",
            *("--checkpoint", checkpoint, "--calibration", calibration),
            *("--runs-dir", tmp_path / "runs"),
        )
        assert code == 2 and err.count("\n") == 1, err
        assert str(checkpoint) in err and message in err, err


def test_evaluate_a_segmentation_student_reports_miou_and_overlays(
    calibration, tmp_path, monkeypatch, capsys
):
    from hil.data.placement import place_masks

    model = ONN(StudentSpec(backend="updecoder", classes=2, seed=2))
    checkpoint = tmp_path / "seg.pt"
    save_model(checkpoint, "student", model)
    code, out, err = run_hil(
        monkeypatch,
        capsys,
        "evaluate",
        *("--checkpoint", checkpoint, "--calibration", calibration, "--dataset", "shapes"),
        *("--fraction", "0.05", "--out", tmp_path / "e", "--runs-dir", tmp_path / "runs"),
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    captures = read(tmp_path / "e" / "captures.h5")
    with torch.no_grad():
        said = model.eval().backend(torch.as_tensor(captures.features)).numpy().argmax(1)
    truth = place_masks(captures.labels, (32, 32))
    scored = truth >= 0
    ious = [
        ((said == c) & (truth == c)).sum() / (((said == c) | (truth == c)) & scored).sum()
        for c in (0, 1)
        if (((said == c) | (truth == c)) & scored).any()
    ]
    assert result["task"] == "segmentation" and result["n"] == len(captures.index) == 10
    assert result["miou"] == pytest.approx(np.mean(ious))
    assert result["figure"].endswith("overlays.png")
    picture = cv2.imread(result["figure"])  # 6 rows of shown/true/predicted at 110 dpi
    assert picture.shape == (round(110 * (2.0 * 6 + 0.4)), round(110 * 6.0), 3)
