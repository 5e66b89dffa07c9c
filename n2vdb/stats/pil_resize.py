"""PIL's bilinear resize of a float ('F' mode) image, bit for bit, for many maps at once.

NetDissect-Lite resizes each raw activation map with scipy's old `imresize(map, (sh, sw), mode='F')`,
which is `PIL.Image.fromarray(map.astype(float32), 'F').resize((sw, sh), BILINEAR)`. Pillow (since
2.7) resamples by separable convolution with a triangle filter on a half-pixel grid:

- per axis, output pixel x has centre c = (x + 0.5) * in / out; input pixels j in
  [int(c - support + 0.5), int(c + support + 0.5)) (clamped to the image) get weight
  triangle((j - c + 0.5) / s), normalised to sum 1, where s = max(in / out, 1) and support = s.
  Upsampling (s = 1) is align_corners=False bilinear with edge clamping; DOWNSAMPLING widens the
  filter (antialiasing), which torch's bilinear never does;
- coefficients are doubles; each output is a double sum rounded to float32; the horizontal pass
  runs first and its float32 result feeds the vertical pass.

So torch's align_corners=False agrees only up to float32 rounding when upsampling (about half the
values differ in the last bit) and not at all when downsampling. This module reproduces Pillow's
arithmetic exactly (a test compares it with PIL itself) while resizing a whole [N, H, W] stack.
"""

from __future__ import annotations

import functools
import math

import torch


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


@functools.lru_cache(maxsize=128)
def coefficients(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [n_out, taps] int64, weight [n_out, taps] float64): Pillow's precomputed filter taps.
    Unused taps point at pixel 0 with weight 0 (adding 0.0 leaves a sum unchanged)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    index = torch.zeros(n_out, taps, dtype=torch.int64)
    weight = torch.zeros(n_out, taps, dtype=torch.float64)
    for x in range(n_out):
        centre = (x + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        high = min(int(centre + support + 0.5), n_in)
        ws = [_triangle((j + low - centre + 0.5) / filterscale) for j in range(high - low)]
        total = 0.0
        for w in ws:
            total += w
        for j, w in enumerate(ws):
            index[x, j] = low + j
            weight[x, j] = w / total if total != 0.0 else w
    return index, weight


def _pass(values: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """One axis of the resize: float32 in, float32 out, summed in float64 tap by tap in Pillow's order."""
    index, weight = coefficients(values.shape[dim], n_out)
    index, weight = index.to(values.device), weight.to(values.device)
    shape = [1] * values.dim()
    shape[dim] = n_out
    total = None
    for tap in range(index.shape[1]):
        term = torch.index_select(values, dim, index[:, tap]).double() * weight[:, tap].view(shape)
        total = term if total is None else total + term
    return total.float()


def resize(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """values [..., H, W] float32 -> [..., sh, sw] float32, as PIL's BILINEAR resize of each map."""
    sh, sw = size
    out = values.float()
    if out.shape[-1] != sw:
        out = _pass(out, sw, out.dim() - 1)
    if out.shape[-2] != sh:
        out = _pass(out, sh, out.dim() - 2)
    return out


@functools.lru_cache(maxsize=128)
def _dense(n_in: int, n_out: int) -> torch.Tensor:
    """The taps as a float32 matrix [n_out, n_in], for the fast approximate pass."""
    index, weight = coefficients(n_in, n_out)
    dense = torch.zeros(n_out, n_in, dtype=torch.float64)
    dense.scatter_add_(1, index, weight)
    return dense.float()


def exact_at(
    values: torch.Tensor, maps: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """resize(values, size)[maps, ys, xs] computed for those pixels only, with Pillow's arithmetic."""
    h, w = values.shape[-2:]
    sh, sw = size
    device = values.device
    iv, wv = (t.to(device) for t in coefficients(h, sh))
    ih, wh = (t.to(device) for t in coefficients(w, sw))
    if w == sw:  # Pillow skips an axis whose size does not change; the identity taps do the same
        ih, wh = xs_identity(w, device)
    if h == sh:
        iv, wv = xs_identity(h, device)
    rows, cols = iv[ys], ih[xs]  # [m, T], [m, S]
    patch = values[maps[:, None, None], rows[:, :, None], cols[:, None, :]].double()  # [m, T, S]
    across = None
    for s in range(cols.shape[1]):
        term = patch[:, :, s] * wh[xs, s][:, None]
        across = term if across is None else across + term
    across = across.float().double()  # the horizontal pass stores float32
    down = None
    for t in range(rows.shape[1]):
        term = across[:, t] * wv[ys, t]
        down = term if down is None else down + term
    return down.float()


def xs_identity(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(n, device=device)[:, None], torch.ones(n, 1, dtype=torch.float64, device=device))


def above(values: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """resize(values, size) > thresholds (float64, one per map), exactly, at the cost of two matrix
    products. The products approximate Pillow's result to within a few float32 roundings of
    sum_j |w_j a_j| (the same products on |values|), so only pixels within 2e-5 of that sum from the
    threshold are recomputed with Pillow's arithmetic (exact_at). Where that sum is 0 every input is 0
    and so is Pillow's value: the pixel is on exactly when the threshold is negative."""
    sh, sw = size
    h, w = values.shape[-2:]
    values = values.float()
    # On CUDA, float32 products may run in TF32 (10-bit mantissa) where a user enables it: float64 there.
    dtype = torch.float64 if values.is_cuda else torch.float32
    rows, cols = _dense(h, sh).to(values.device, dtype), _dense(w, sw).to(values.device, dtype).T
    fast = (rows @ values.to(dtype) @ cols).float()
    spread = fast if bool((values >= 0).all()) else (rows @ values.abs().to(dtype) @ cols).float()
    t64 = thresholds.view(-1, 1, 1).to(values.device, torch.float64)
    t32 = t64.float()
    # float32 throughout (six passes over the maps): the band also covers |threshold - float32(threshold)|.
    gap = fast - t32
    band = torch.add(1e-7 * t32.abs(), spread, alpha=2e-5)
    out = gap > band
    unsure = gap.abs_() <= band
    flat = (t64 <= 0).flatten()  # only there can an all-zero neighbourhood sit inside the band
    if bool(flat.any()):
        zero = spread[flat] == 0
        out[flat] |= zero & (t64[flat] < 0)
        unsure[flat] &= ~zero
    if bool(unsure.any()):
        maps, ys, xs = torch.nonzero(unsure, as_tuple=True)
        out[maps, ys, xs] = exact_at(values, maps, ys, xs, size).double() > t64.flatten()[maps]
    return out
