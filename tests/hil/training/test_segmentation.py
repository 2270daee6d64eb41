"""Segmentation in simulation: mIoU against hand counts, masks placed where the display puts the
image, per-pixel KD against its formula, the pooled-logit NTK against a per-sample Jacobian loop,
and a tiny training run that beats the all-background predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hil.data.datasets import shapes
from hil.data.placement import display_region, place_maps, place_masks, to_display
from hil.models.onn import ONN, StudentSpec
from hil.ntkd.losses import KD, pool_logits, pooled_ntk
from hil.training.loop import IGNORE, Settings, accuracy, iou_counts, mean_iou, miou
from hil.training.student import student_inputs, train_student
from hil.training.teacher import train_teacher

F64 = torch.float64
NA = IGNORE  # short, for the hand-written masks
PRED_A = [[0, 0, 1], [1, 1, 0]]
TRUE_A = [[0, 1, 1], [1, NA, 2]]


class Lookup(nn.Module):
    """Returns stored logits: sample i is an image filled with the value i."""

    def __init__(self, preds: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.logits = nn.functional.one_hot(preds, classes).permute(0, 3, 1, 2).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]


def test_iou_of_a_hand_counted_example():
    # class 0: I 1, U 3; class 1: I 2, U 3 (the IGNORE pixel predicted 1 is not counted);
    # class 2: I 0, U 1; class 3 appears nowhere and has no IoU
    counts = iou_counts(torch.tensor(PRED_A), torch.tensor(TRUE_A), classes=4)
    assert counts.tolist() == [[1, 3], [2, 3], [0, 1], [0, 0]]
    assert mean_iou(counts) == (1 / 3 + 2 / 3 + 0) / 3


def test_miou_sums_counts_over_the_split_before_dividing():
    preds = torch.tensor([PRED_A, [[2] * 3] * 2])
    truth = torch.tensor([TRUE_A, [[2] * 3] * 2])
    model, x = Lookup(preds, 3), torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 3)
    # class 2 over both images: I 6, U 7 (a per-image mean would give (0 + 1) / 2 instead)
    assert abs(miou(model, x, truth, classes=3, batch_size=1) - (1 / 3 + 2 / 3 + 6 / 7) / 3) < 1e-12
    assert accuracy(model, x, truth, batch_size=1) == 9 / 11  # pixels, IGNORE left out


def test_masks_land_on_the_pixels_the_display_gives_their_image():
    labels = np.arange(64).reshape(1, 8, 8)
    shown = to_display((labels / 63).astype(np.float32)[:, None], (32, 32))[:, 0]
    placed = place_masks(labels, (32, 32))
    top, left, h, w = display_region((8, 8), (32, 32))
    assert (top, left, h, w) == (4, 4, 24, 24)  # 0.75 · 32 / 8 = 3 display pixels per pixel
    inside = placed != IGNORE
    assert inside.sum() == h * w and inside[0, top : top + h, left : left + w].all()
    assert np.array_equal(np.rint(shown[inside] * 63), placed[inside])  # nearest, same place
    logits = torch.as_tensor(labels, dtype=torch.float32)[:, None]
    on_display = place_maps(logits, (32, 32))[0, 0][torch.as_tensor(inside[0])]
    assert torch.equal(on_display, torch.as_tensor(placed[inside], dtype=torch.float32))
    # shrinking (32 px onto 24): the mask covers exactly the image's support on the display
    big = np.ones((1, 1, 32, 32), np.float32)
    support = to_display(big, (32, 32))[0, 0] > 0
    assert np.array_equal(place_masks(np.zeros((1, 32, 32), np.int64), (32, 32))[0] == 0, support)


def test_kd_per_pixel_is_the_mean_kl_over_labelled_pixels():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2, generator=g, dtype=F64), torch.randn(2, 3, 2, 2, dtype=F64)
    y = torch.tensor([[[0, 1], [NA, 2]], [[NA, NA], [1, 1]]])
    temp, weight = 3.0, 0.7
    terms = KD(temperature=temp, weight=weight)(lambda x: x, {"x": s, "y": y, "teacher_logits": t})
    kls, ces = [], []
    for n, i, j in zip(*torch.nonzero(y != NA, as_tuple=True), strict=True):
        p = torch.softmax(t[n, :, i, j] / temp, 0)
        kls.append((p * (p.log() - torch.log_softmax(s[n, :, i, j] / temp, 0))).sum())
        ces.append(-torch.log_softmax(s[n, :, i, j], 0)[y[n, i, j]])
    kd, ce = temp**2 * torch.stack(kls).mean(), torch.stack(ces).mean()
    assert torch.allclose(terms["kd"], kd) and torch.allclose(terms["ce"], ce)
    assert torch.allclose(terms["total"], (1 - weight) * ce + weight * kd)


def test_pooled_logit_ntk_equals_a_per_sample_jacobian_loop():
    spec = StudentSpec(kernels=2, kernel_size=3, image_size=8, backend="updecoder", classes=2)
    model = ONN(spec).double()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    region, pool = (1, 1, 6, 6), 2
    params = [p for p in model.parameters()]
    rows, outs = [], []
    for i in range(len(x)):
        logits = model(x[i : i + 1])[0, :, 1:7, 1:7]  # the region, pooled by hand: 3x3 blocks
        out = logits.reshape(2, 2, 3, 2, 3).mean(dim=(2, 4)).reshape(-1)
        grads = [torch.autograd.grad(o, params, retain_graph=True) for o in out]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]))
        outs.append(out.detach())
    jac = torch.stack(rows)
    expected = torch.einsum("ncp,mcp->nm", jac, jac)
    kernel = pooled_ntk(model, x, pool, region)
    assert ((kernel - expected).norm() / expected.norm()).item() < 1e-5
    assert torch.allclose(pool_logits(model(x), pool, region), torch.stack(outs))
    backend = [n for n, _ in model.named_parameters() if n.startswith("backend.")]
    sub = pooled_ntk(model, x, pool, region, backend)  # parameter names survive the view
    n_front = sum(p.numel() for n, p in model.named_parameters() if n.startswith("frontend."))
    expected_sub = torch.einsum("ncp,mcp->nm", jac[..., n_front:], jac[..., n_front:])
    assert ((sub - expected_sub).norm() / expected_sub.norm()).item() < 1e-5


def test_a_tiny_segmentation_run_beats_the_all_background_predictor():
    data = shapes(n=120, size=16, seed=1)
    spec = StudentSpec(kernels=4, kernel_size=3, image_size=16, backend="updecoder", classes=2)
    _, record = train_student(spec, data, "none", Settings(epochs=5, batch_size=16, lr=1e-2))
    y = student_inputs(data, "test", spec)["y"]
    background = ((y == 0).sum() / (y != IGNORE).sum()).item()
    trivial = background / 2  # background IoU = its pixel share; foreground IoU = 0
    assert [h["epoch"] for h in record["history"]] == list(range(5))
    assert "val_miou" in record["history"][-1] and "val_accuracy" not in record["history"][-1]
    assert record["test_miou"] > trivial + 0.2, (record["test_miou"], trivial)


def hand_miou(said: np.ndarray, truth: np.ndarray) -> float:
    """Mean over present classes of |said ∩ truth| / |said ∪ truth|, ignored pixels left out."""
    scored = truth != IGNORE
    ious = []
    for c in np.union1d(said[scored], truth[scored]):
        union = ((said == c) | (truth == c)) & scored
        ious.append(((said == c) & (truth == c) & scored).sum() / union.sum())
    return float(np.mean(ious))


def test_unet_teacher_and_distillation_run_on_masks(tmp_path):
    data = shapes(n=60, size=16, seed=2)
    teacher, info = train_teacher("unet", data, Settings(epochs=1, batch_size=12))
    test = data.split("test")
    with torch.no_grad():
        said = teacher.eval()(torch.as_tensor(data.images[test])).argmax(1).numpy()
    assert info["test_miou"] == pytest.approx(hand_miou(said, data.labels[test]), abs=1e-9)
    assert "val_miou" in info["history"][0]
    spec = StudentSpec(kernels=2, kernel_size=3, image_size=16, backend="updecoder", classes=2)
    settings = Settings(epochs=1, batch_size=12)
    cache = tmp_path / "unet.pt"  # the caches are written beside it
    test = student_inputs(data, "test", spec)
    for method, options in (("kd", {}), ("ntkd", {"pool": 2})):
        student, record = train_student(
            spec,
            data,
            method,
            settings,
            teacher=teacher,
            loss_options=options,
            projections=4,
            teacher_cache=cache,
        )
        with torch.no_grad():
            said = student.eval()(test["x"]).argmax(1).numpy()
        assert record["test_miou"] == pytest.approx(hand_miou(said, test["y"].numpy()), abs=1e-9)
        assert np.isfinite(record["history"][0]["total"])
    n = len(data.split("train"))
    (features,) = tmp_path.glob("unet.ntk-R4-p0-pool2-*.pt")
    state = torch.load(features, weights_only=True)  # the teacher's pooled logits: 2 x 2x2
    assert state["pool"] == 2 and state["value"].shape == (n, 8, 4)
    (logits,) = tmp_path.glob("unet.logits-*.pt")  # KD's: the teacher's logit maps of raw images
    raw = torch.as_tensor(data.images[data.split("train")])
    with torch.no_grad():
        torch.testing.assert_close(torch.load(logits, weights_only=True)["value"], teacher(raw))
