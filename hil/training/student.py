"""`hil train`: the optical student trained in simulation, without transfer, with KD or with NTKD.

The student sees each image as the display shows it; the teacher sees the raw image. NTKD's
teacher kernel comes from fixed random projections of the teacher's Jacobian, computed once per
training set and cached beside the teacher checkpoint, so a step only multiplies cached features.

Segmentation: the student's logit map covers the whole display, so its target is the mask placed
exactly where `to_display` puts the image (nearest neighbour), with the display around it labelled
IGNORE; KD's teacher logits are placed the same way, and the NTK is traced over the logits of the
image's region pooled to a small grid, for the teacher over its whole (raw) output.

Fabrication-error augmentation (`FabricationAugment`) trains the student through a freshly
"fabricated" optic every batch, so the design tolerates the glass it will become.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from hil.data.datasets import Dataset, to_display
from hil.errors import UserError
from hil.models.onn import ONN, StudentSpec
from hil.ntkd import kernels as ntk
from hil.ntkd.losses import PooledLogits, Region, SharedView, build_loss
from hil.training.loop import IGNORE, Settings, accuracy, fit, save_checkpoint, task_metric
from sim.fabrication import perturb_psfs, warp_image
from sim.fftconv import conv2d_direct, conv2d_fft
from sim.params import FabricationParams
from sim.psf_frontend import DIRECT_MAX_KERNEL, PSFFrontend, signed_combine

FILL = 0.75  # to_display's default, which `hil capture` shows images with too

# --------------------------------------------------------------------------- display geometry


def display_region(
    image_hw: tuple[int, int], display_hw: tuple[int, int], fill: float = FILL
) -> Region:
    """(top, left, height, width) of an image on the display: `render.place_on_display`'s
    arithmetic, so masks and teacher logits land on the pixels the image does."""
    (h, w), (dh, dw) = image_hw, display_hw
    scale = fill * min(dh / h, dw / w)
    if scale >= 1:
        scale = int(scale)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (dh - nh) // 2, (dw - nw) // 2, nh, nw


def place_masks(masks: np.ndarray, display_hw: tuple[int, int], fill: float = FILL) -> np.ndarray:
    """Masks (N, h, w) → (N, H, W) as the display places their images (nearest neighbour), the
    display around them IGNORE: there the student sees black, not the scene."""
    top, left, nh, nw = display_region(masks.shape[-2:], display_hw, fill)
    if masks.size and (masks.min() < 0 or masks.max() >= 2**16):
        raise ValueError("mask labels must lie in 0..65535")
    out = np.full((len(masks), *display_hw), IGNORE, np.int64)
    for i, m in enumerate(masks):
        small = cv2.resize(m.astype(np.uint16), (nw, nh), interpolation=cv2.INTER_NEAREST)
        out[i, top : top + nh, left : left + nw] = small
    return out


def place_maps(maps: torch.Tensor, display_hw: tuple[int, int], fill: float = FILL) -> torch.Tensor:
    """Maps (N, C, h, w), e.g. teacher logits, → (N, C, H, W) where the display puts the image:
    repeated pixels when enlarged, area means when shrunk (as for the image), zeros around."""
    top, left, nh, nw = display_region(maps.shape[-2:], display_hw, fill)
    mode = "nearest" if nh >= maps.shape[-2] else "area"
    out = maps.new_zeros((*maps.shape[:-2], *display_hw))
    out[..., top : top + nh, left : left + nw] = F.interpolate(maps, size=(nh, nw), mode=mode)
    return out


def student_inputs(data: Dataset, split: str, spec: StudentSpec) -> dict[str, torch.Tensor]:
    """Display images "x", targets "y" (labels, or masks placed on the display) and raw images."""
    idx = data.split(split)
    hw = (spec.image_size, spec.image_size)
    shown = to_display(data.images[idx], hw, FILL)
    labels = data.labels[idx]
    if data.task == "segmentation":
        labels = place_masks(labels, hw)
    return {
        "x": torch.as_tensor(shown),
        "y": torch.as_tensor(labels),
        "raw": torch.as_tensor(data.images[idx]),
    }


def teacher_key(teacher: torch.nn.Module, seed: int) -> str:
    """A digest of the teacher's weights and the projections' seed: cached features are only
    reused for the same teacher (a retrained one, even with the same name, is another)."""
    h = hashlib.sha256(str(seed).encode())
    for name, value in teacher.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_features(
    teacher: torch.nn.Module,
    raw: torch.Tensor,
    cache: Path | None,
    projections: int,
    seed: int,
    *,
    pool: int | None = None,
) -> torch.Tensor:
    """φ(x) = J(x)·v_r for every training image, (N, C, R); computed once and cached.

    With `pool` (segmentation) the outputs are the teacher's logit map pooled to pool x pool
    (`losses.pool_logits`), C = classes · pool², as the NTKD loss pools the student's.
    """
    key = teacher_key(teacher, seed)
    if cache is not None and cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        same = state["n"] == len(raw) and torch.equal(state["checksum"], raw.sum().reshape(1))
        same = same and state.get("teacher") == key
        if same and state.get("pool") == pool and state["features"].shape[-1] == projections:
            return state["features"]
    net = teacher if pool is None else PooledLogits(teacher.eval(), pool)
    projected = ntk.ProjectedTeacher(net, projections=projections, seed=seed)
    features = projected.features_dataset(raw, batch_size=128)
    if cache is not None:
        save_checkpoint(
            cache,
            {
                "features": features,
                "n": len(raw),
                "checksum": raw.sum().reshape(1),
                "pool": pool,
                "teacher": key,
            },
        )
    return features


# --------------------------------------------------------------------------- fabrication errors


@dataclass(frozen=True)
class FabricationAugment:
    """Sizes of the fabrication errors drawn afresh for every training batch, in the paper's
    model y = α·(a shifted by β) ⊛ (k + δ) + ε:

    - α = 1 + gain·z (one gain per batch, floored at 0: light is not negative);
    - β ~ N(0, shift_px²) pixels along x and y, and a rotation ~ N(0, rotation_deg²) degrees, both
      applied with `sim.fabrication.warp_image` (bilinear, zeros outside) to the displayed image;
    - δ: every PSF pixel times max(0, 1 + kernel_error·z), `sim.fabrication.perturb_psfs`;
    - ε: Gaussian per feature-map pixel, std = noise x the RMS of that sample's clean maps.

    α, β and δ are one "fabricated optic" per batch (the whole batch passes through one piece
    of glass); ε is drawn per sample. Draws are seeded by `seed` and the batch's sample indices,
    so a resumed run sees the same optics as an uninterrupted one.
    """

    gain: float = 0.1
    shift_px: float = 0.5
    rotation_deg: float = 0.0
    kernel_error: float = 0.1
    noise: float = 0.01
    seed: int = 0

    @classmethod
    def from_fabrication(cls, params: FabricationParams, noise: float = 0.01, seed: int = 0):
        """Errors the size of a simulated bench's (`[sim.fabrication]`): the gain's distance
        from 1, the RMS of its shift per axis, its rotation and its kernel error."""
        return cls(
            gain=abs(1 - params.gain),
            shift_px=float(np.sqrt(np.mean(np.square(params.shift_px)))),
            rotation_deg=abs(params.rotation_deg),
            kernel_error=params.kernel_error,
            noise=noise,
            seed=seed,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OpticDraw:
    """One fabricated optic: gain α, shift β (x, y), rotation, PSF factor 1 + δ/k (or None)."""

    gain: float
    shift_px: tuple[float, float]
    rotation_deg: float
    psf_factor: torch.Tensor | None


def draw_optic(
    augment: FabricationAugment, psf_shape: tuple[int, ...] | None, generator: torch.Generator
) -> OpticDraw:
    """A random optic. A zero size leaves its part exactly as designed (gain 1.0, shift 0.0, no
    PSF factor), so an all-zero augmentation trains bit for bit as none."""
    z = torch.randn(4, generator=generator, dtype=torch.float64).tolist()
    factor = None
    if augment.kernel_error > 0 and psf_shape is not None:
        factor = perturb_psfs(torch.ones(psf_shape), augment.kernel_error, generator)
    return OpticDraw(
        gain=max(0.0, 1 + augment.gain * z[0]),
        shift_px=(augment.shift_px * z[1], augment.shift_px * z[2]),
        rotation_deg=augment.rotation_deg * z[3],
        psf_factor=factor,
    )


class FabricatedStudent(SharedView):
    """The ONN seen through a fabricated optic (`draw`) in training mode; the plain ONN in eval
    mode or with no draw. Same parameter names as the ONN, so checkpoints and `params` lists
    carry over, and gradients reach the designed PSFs through the perturbed ones.

    With noise, the training input carries each sample's ε draws (standard normal, one per
    feature-map pixel) as extra channels after the image's: the kernel of NTKD is taken one
    sample at a time inside vmap, where nothing random may be drawn, and this way every sample
    sees the same noise in the kernel as in the loss.
    """

    def __init__(self, onn: ONN, augment: FabricationAugment) -> None:
        super().__init__(onn)
        psf = isinstance(onn.frontend, PSFFrontend)
        if augment.kernel_error > 0 and not psf:
            raise UserError("kernel-error augmentation needs a PSF frontend (sim has no 4f δ)")
        self.augment = augment
        self.psf_shape = tuple(onn.frontend.psfs.shape) if psf else None
        self.draw: OpticDraw | None = None

    def redraw(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Draw the optic for the batch `idx` (its images `x`); returns the input to train on."""
        entropy = [self.augment.seed, *(int(i) for i in idx)]
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        self.draw = draw_optic(self.augment, self.psf_shape, gen)
        if self.augment.noise == 0:
            return x
        m, (h, w) = self.inner.spec.kernels, x.shape[-2:]
        z = torch.randn((len(x), m, h, w), generator=gen, dtype=x.dtype).to(x.device)
        return torch.cat([x, z], dim=1)

    def fabricated_features(self, x: torch.Tensor) -> torch.Tensor:
        """α·(x shifted by β) ⊛ (k + δ) + ε for a training input (image channels, then ε's)."""
        d, frontend, c = self.draw, self.inner.frontend, self.inner.spec.channels
        assert d is not None
        x, z = x[:, :c], x[:, c:]
        if d.shift_px != (0.0, 0.0) or d.rotation_deg != 0.0:
            x = warp_image(x, d.shift_px, d.rotation_deg)
        if d.psf_factor is None:
            y = frontend(x)
        else:
            psfs = frontend.psfs * d.psf_factor.to(frontend.psfs.device)
            kernels = signed_combine(psfs, dim=0) if frontend.signed else psfs
            conv = conv2d_direct if frontend.kernel_size <= DIRECT_MAX_KERNEL else conv2d_fft
            y = conv(x, kernels.to(x.dtype), "same")
        if d.gain != 1.0:
            y = y * d.gain
        if self.augment.noise > 0:
            rms = y.detach().square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
            y = y + self.augment.noise * rms * z
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.draw is None:
            return self.inner(x)
        return self.inner.backend(self.fabricated_features(x))


# --------------------------------------------------------------------------- training


def train_student(
    spec: StudentSpec,
    data: Dataset,
    method: str,
    settings: Settings,
    *,
    teacher: torch.nn.Module | None = None,
    teacher_cache: Path | None = None,
    loss_options: dict[str, Any] | None = None,
    projections: int = 64,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_epoch=None,
    augment: FabricationAugment | None = None,
) -> tuple[ONN, dict[str, Any]]:
    """Train frontend and backend jointly; returns the student after the last epoch, a record.

    Segmentation datasets need the `updecoder` backend and are judged by mIoU (`test_miou`,
    `val_miou`, history `val_miou`; `test_accuracy` is then the pixel accuracy). `augment` trains
    through random fabrication errors; validation and test see the designed optic.
    """
    segmentation = data.task == "segmentation"
    if segmentation != (spec.backend == "updecoder"):
        need = "the updecoder backend" if segmentation else "a classification backend"
        raise UserError(f"{data.name} is a {data.task} dataset: it needs {need}")
    model = ONN(spec)
    options = dict(loss_options or {})
    train, val, test = (student_inputs(data, s, spec) for s in ("train", "val", "test"))
    hw = (spec.image_size, spec.image_size)
    if segmentation and method == "ntkd":
        options.setdefault("region", display_region(data.images.shape[-2:], hw))
    loss = build_loss(method, **options)
    needs = getattr(loss, "needs", frozenset())
    if needs and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    teacher_extras = None
    if "teacher_logits" in needs:
        teacher.eval()

        def teacher_extras(idx):
            with torch.no_grad():
                logits = teacher(train["raw"][idx])
            return {"teacher_logits": place_maps(logits, hw) if segmentation else logits}

    elif "teacher_features" in needs:
        pool = loss.pool if segmentation else None
        feats = teacher_features(
            teacher, train["raw"], teacher_cache, projections, settings.seed, pool=pool
        )

        def teacher_extras(idx):
            return {"teacher_features": feats[idx]}

    net = model if augment is None else FabricatedStudent(model, augment)
    extras = teacher_extras
    if augment is not None:

        def extras(idx):
            out = teacher_extras(idx) if teacher_extras is not None else {}
            return out | {"x": net.redraw(idx, train["x"][idx])}

    name, metric = task_metric(data.task, data.classes)
    history = fit(
        net,
        loss,
        {"x": train["x"], "y": train["y"]},
        val,
        settings,
        batch_extras=extras,
        checkpoint=checkpoint,
        resume=resume,
        extra_state={"spec": spec.to_dict()},
        on_epoch=on_epoch,
        metric=metric,
        metric_name=name,
    )
    record = {
        "method": method,
        "dataset": data.name,
        "spec": spec.to_dict(),
        f"test_{name}": metric(model, test["x"], test["y"]),
        f"val_{name}": metric(model, val["x"], val["y"]),
        "history": history,
    }
    if name != "accuracy":
        record["test_accuracy"] = accuracy(model, test["x"], test["y"])
    if augment is not None:
        record["augment"] = augment.to_dict()
    return model, record
