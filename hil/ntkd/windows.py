"""δ of a pooled logit map carried in windows: the per-sample gradients of a segmentation
decoder's NTK without full-map backward passes.

A segmentation NTK is traced over the logit map averaged over a grid of cells
(`hil.ntkd.losses.pool_logits`). The δ of one (class, cell) output is nonzero at a layer's
activations only inside the cell's receptive field there: a box a few pixels wider than the cell,
scaled to that layer's resolution, on a regular grid of cells. Carrying each δ as its box (an
`Axis` pair) rather than as a full map makes the classes·cells backward passes cost about
`classes` full ones, and a convolution's per-sample weight gradient Σ_l δ[l] ⊗ unfolded input[l]
sums over the box only. Autograd's batched backward would carry every full map, which is what
made segmentation NTKD about 130× a CE step; no library walks δ this way, so it is written here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hil.ntkd.plan import Unsupported

__all__ = [
    "Axis",
    "cell_axes",
    "conv_factors",
    "conv_of_maps",
    "plain_conv",
    "pointwise_slope",
    "seeds",
    "segment_sums",
    "step_back",
]


class Axis(NamedTuple):
    """Along one axis of an activation, cell q's box is [start + q·stride, + size)."""

    start: int
    stride: int
    size: int
    cells: int


Axes = tuple[Axis, Axis]  # (height, width)


def cell_axes(hw: tuple[int, ...], pool: int, region: tuple[int, ...] | None) -> Axes:
    """The pool x pool cells of `region` (top, left, h, w; the whole map when None) of a logit
    map of size `hw`, where adaptive pooling cuts equal cells; otherwise `Unsupported`."""
    top, left, h, w = (0, 0, *hw) if region is None else region
    inside = top >= 0 and left >= 0 and top + h <= hw[0] and left + w <= hw[1]
    if not inside or h % pool or w % pool:
        raise Unsupported  # uneven cells overlap: the generic path
    return Axis(top, h // pool, h // pool, pool), Axis(left, w // pool, w // pool, pool)


def windows(t: Tensor, axes: Axes) -> Tensor:
    """(N, C, H, W) → (N, Q, C, h, w): each cell's box of ``t``, zero where it leaves the map."""
    boxes = _boxed(t, axes)  # (N, C, Qh, Qw, h, w)
    n, c, qh, qw, h, w = boxes.shape
    return boxes.permute(0, 2, 3, 1, 4, 5).reshape(n, qh * qw, c, h, w)


def _whole(hw: tuple[int, ...]) -> Axes:
    """One cell whose box is a whole (h, w) map."""
    return Axis(0, 1, hw[0], 1), Axis(0, 1, hw[1], 1)


def _padded(t: Tensor, axes: Axes) -> tuple[Tensor, int, int]:
    """(``t`` zero-padded where the cells' boxes leave it, the top and left padding)."""
    pads = []
    for a, length in ((axes[1], t.shape[-1]), (axes[0], t.shape[-2])):
        end = a.start + (a.cells - 1) * a.stride + a.size
        pads += [max(0, -a.start), max(0, end - length)]
    return (F.pad(t, pads) if any(pads) else t), pads[2], pads[0]


def _boxed(t: Tensor, axes: Axes) -> Tensor:
    """(N, C, H, W) → a view (N, C, Qh, Qw, h, w) of the cells' boxes of ``t`` (zero-padded
    first where they leave the map)."""
    ah, aw = axes
    t, top, left = _padded(t, axes)
    y0, x0 = ah.start + top, aw.start + left
    t = t[..., y0 : y0 + (ah.cells - 1) * ah.stride + ah.size, :]
    t = t[..., x0 : x0 + (aw.cells - 1) * aw.stride + aw.size]
    return t.unfold(2, ah.size, ah.stride).unfold(3, aw.size, aw.stride)


def seeds(logits: Tensor, axes: Axes) -> Tensor:
    """δ (N, Q, K, K, h, w) of each (cell, class) mean over the logit map (N, K, H, W)."""
    n, k = logits.shape[:2]
    ah, aw = axes
    eye = torch.eye(k, dtype=logits.dtype, device=logits.device) / (ah.size * aw.size)
    return eye[None, None, :, :, None, None].expand(n, ah.cells * aw.cells, k, k, ah.size, aw.size)


def pointwise_slope(layer: nn.Module, inp: Tensor, out: Tensor) -> Tensor | None:
    """∂out/∂inp of an elementwise activation a backend is made of, or None for another layer."""
    kind = type(layer)
    if kind is nn.ReLU:
        return (inp > 0).to(out.dtype)
    if kind is nn.Tanh:
        return 1 - out.square()
    if kind is nn.Sigmoid:
        return out * (1 - out)
    return None


def step_back(layer: nn.Module, inp: Tensor, out: Tensor, delta: Tensor, axes: Axes):
    """(δ, axes) at `layer`'s input from δ (N, Q, K, C, h, w) in boxes `axes` at its output."""
    kind = type(layer)
    if kind in (nn.Identity, nn.Dropout):  # dropout is off: `check_batch_independent`
        return delta, axes
    slope = pointwise_slope(layer, inp, out)
    if slope is not None:
        return delta * windows(slope, axes)[:, :, None], axes
    # as matmuls over gathered or scattered patches: torch's CPU convolutions of a few hundred
    # rows of tiny boxes take a per-row path, a third of a segmentation NTKD step
    n, q, k, c, h, w = delta.shape
    rows = delta.reshape(n * q * k, c, h, w)
    weight = layer.weight.to(rows.dtype)
    if kind is nn.Conv2d:  # each output's Wᵀδ, added onto the input positions it read
        stride, new = _conv_inputs(layer, axes)
        sizes = (new[0].size, new[1].size)
        spread = rows.permute(0, 2, 3, 1).reshape(len(rows), h * w, c) @ weight.permute(
            0, 2, 3, 1
        ).reshape(c, -1)  # (rows, L, k²·Cin)
        cin = weight.shape[1]
        index = _patch_index(*_whole(sizes), 0, 0, sizes[1], layer.kernel_size, stride)
        grad = rows.new_zeros(len(rows), sizes[0] * sizes[1], cin)
        grad = grad.index_add(1, index.to(rows.device), spread.reshape(len(rows), -1, cin))
    elif kind is nn.ConvTranspose2d:  # each input's reached outputs, times W
        padded, new = _transposed_padded(layer, rows, axes)
        sizes = (new[0].size, new[1].size)
        cols = patches(padded, _whole(padded.shape[-2:]), layer.kernel_size, layer.stride)
        grad = cols[:, 0] @ weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
    else:
        raise Unsupported
    grad = grad.reshape(n, q, k, *sizes, -1).permute(0, 1, 2, 5, 3, 4)
    if all(
        a.start >= 0 and a.start + (a.cells - 1) * a.stride + a.size <= length
        for a, length in zip(new, inp.shape[-2:], strict=True)
    ):
        return grad, new
    inside = windows(inp.new_ones(1, 1, *inp.shape[-2:]), new)  # the input's own positions
    return grad * inside[:, :, None], new


def conv_factors(layer: nn.Module, inp: Tensor, delta: Tensor, axes: Axes) -> tuple[Tensor, Tensor]:
    """(d (N, Q, L, K·X), c (N, Q, L, F)) whose Σ_l d[l] ⊗ c[l] over each box's L positions is
    the per-sample gradient of each (cell, class) output w.r.t. a Conv2d's or a
    ConvTranspose2d's weight, from δ (N, Q, K, C, h, w) at its output and its input ``inp``:
    for a Conv2d, δ and the input each output position reads (X = Cout, F = Cin·k²); for a
    ConvTranspose2d, the outputs each input position reaches and the input (X = Cout·k²,
    F = Cin)."""
    n, q, k, c, h, w = delta.shape
    if type(layer) is nn.Conv2d:
        stride, box = _conv_inputs(layer, axes)
        d = delta.reshape(n, q, k * c, h * w).transpose(2, 3)
        return d, patches(inp, box, layer.kernel_size, stride)
    padded, box = _transposed_padded(layer, delta.reshape(n * q * k, c, h, w), axes)
    cols = patches(padded, _whole(padded.shape[-2:]), layer.kernel_size, layer.stride)
    d = cols.reshape(n, q, k, *cols.shape[2:]).transpose(2, 3).flatten(3)
    return d, patches(inp, box)


def conv_of_maps(layer: nn.Conv2d, inp_maps: Tensor, delta: Tensor, axes: Axes) -> Tensor:
    """T (N, Q·K, Cout·k², r): Σ over the box of δ (N, Q, K, Cout, h, w) at a Conv2d's output
    ⊗ the r maps ``inp_maps`` (N, r, H, W) its input is linear in, as that convolution reads
    them. When the input is a·maps (m maps, r < m: a segment's output and its shifted inputs),
    the weight's per-sample gradient is T aᵀ and the δ at the input reaches the maps' sums as
    Wᵀ T, so neither the m-map gradient nor δ at the input is formed. The maps are best
    channels-last in memory: each patch row is then copied r entries at a time."""
    n, q, k, c, h, w = delta.shape
    stride, box = _conv_inputs(layer, axes)
    cols = patches(inp_maps, box, layer.kernel_size, stride).flatten(0, 1)  # (N·Q, L, k²·r)
    t = delta.reshape(n * q, k * c, h * w) @ cols  # (N·Q, K·Cout, k²·r)
    return t.reshape(n, q * k, -1, inp_maps.shape[1])


def segment_sums(delta: Tensor, axes: Axes, z: Tensor, cols: Tensor | None, gain: bool):
    """(Σ δ z per map or None, Σ δ per map, s or None): a PSF → map-affine segment's sums from δ
    (N, Q, K, m, h, w) at its output, z (N, m, H, W) before the affine and its shifted inputs
    cols (N, H·W, r), each (N, Q·K, ...) for `hil.ntkd.factored`'s segment terms."""
    n, q, k, m, h, w = delta.shape
    sums = delta.sum(dim=(-2, -1)).reshape(n, q * k, m)
    gains = None
    if gain and cols is None:
        gains = (delta * windows(z, axes)[:, :, None]).sum(dim=(-2, -1)).reshape(n, q * k, m)
    s = None
    if cols is not None:  # the PSF's: Σ_l δ[l] cols[l, u] over each box
        maps = cols.transpose(1, 2).reshape(n, -1, *z.shape[-2:])
        boxed = windows(maps, axes).flatten(3).flatten(0, 1)  # (N·Q, r, h·w)
        s = delta.reshape(n * q, k * m, h * w) @ boxed.transpose(1, 2)
        s = s.reshape(n, q * k, -1)
    return gains, sums, s


def patches(
    t: Tensor, axes: Axes, size: tuple[int, ...] = (1, 1), stride: tuple[int, ...] = (1, 1)
) -> Tensor:
    """(N, C, H, W) → (N, Q, L, kh·kw·C): in each cell's box, at each of the L output positions
    of a `size` x `stride` convolution over it, the entries that position reads (zero off the
    map), taps outer and channels inner. One channels-last copy and one gather, whose backward
    is one index_add: a chain of unfolds backs into one full-size buffer per unfold, which was a
    tenth of a segmentation NTKD step."""
    ah, aw = axes
    t, top, left = _padded(t, axes)
    n, c, _, width = t.shape
    index = _patch_index(ah, aw, top, left, width, tuple(size), tuple(stride))
    rows = t.permute(0, 2, 3, 1).reshape(n, -1, c)  # a view when t is channels-last already
    out = rows.index_select(1, index.to(t.device))
    return out.reshape(n, ah.cells * aw.cells, -1, size[0] * size[1] * c)


@functools.lru_cache(maxsize=256)
def _patch_index(ah: Axis, aw: Axis, top: int, left: int, width: int, size, stride) -> Tensor:
    """Flat positions, in a map `width` wide padded by (top, left), of `patches`' entries in
    order (cell row, cell column, output row, output column, tap row, tap column)."""

    def along(a: Axis, pad: int, k: int, s: int) -> Tensor:
        out = (a.size - k) // s + 1
        cells = torch.arange(a.cells) * a.stride + a.start + pad
        return (
            cells[:, None, None] + torch.arange(out)[None, :, None] * s + torch.arange(k)
        ).long()

    rows, cols = along(ah, top, size[0], stride[0]), along(aw, left, size[1], stride[1])
    # (Qh, oh, kh) x (Qw, ow, kw) → (Qh, Qw, oh, ow, kh, kw)
    flat = rows[:, None, :, None, :, None] * width + cols[None, :, None, :, None, :]
    return flat.reshape(-1)


def plain_conv(layer: nn.Conv2d) -> bool:
    """A Conv2d whose outputs read a zero-padded input at o·s − p + t: no groups, dilation,
    other padding mode or padding by name."""
    plain = layer.groups == 1 and tuple(layer.dilation) == (1, 1) and layer.padding_mode == "zeros"
    return plain and not isinstance(layer.padding, str)


def _conv_inputs(layer: nn.Conv2d, axes: Axes) -> tuple[tuple[int, int], Axes]:
    """(stride, the boxes of its zero-padded input) that a Conv2d's outputs in boxes `axes`
    read: output o reads inputs o·s − p + t, t < k."""
    if not plain_conv(layer):
        raise Unsupported
    boxes = [
        Axis(a.start * s - p, a.stride * s, (a.size - 1) * s + k, a.cells)
        for a, k, s, p in zip(axes, layer.kernel_size, layer.stride, layer.padding, strict=True)
    ]
    return tuple(layer.stride), (boxes[0], boxes[1])


def _transposed_padded(layer: nn.ConvTranspose2d, rows: Tensor, axes: Axes):
    """(δ rows padded or cut to what each input box's outputs span, the input boxes) for a
    ConvTranspose2d, whose input i reaches outputs i·s − p + t, t < k: then δ at the input is
    conv2d(padded, weight, stride s), and each column of its unfold one input's outputs."""
    if layer.groups != 1 or tuple(layer.dilation) != (1, 1):
        raise Unsupported
    pads, new = [], []
    for a, k, s, p in zip(axes, layer.kernel_size, layer.stride, layer.padding, strict=True):
        if a.stride % s:
            raise Unsupported  # the input boxes would not lie on a regular grid
        first = -(-(a.start + p - k + 1) // s)
        size = (a.start + a.size - 1 + p) // s - first + 1
        lo = a.start - (first * s - p)
        pads.append((lo, (size - 1) * s + k - a.size - lo))
        new.append(Axis(first, a.stride // s, size, a.cells))
    (top, bottom), (left, right) = pads
    return F.pad(rows, (left, right, top, bottom)), (new[0], new[1])
