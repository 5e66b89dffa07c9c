"""Counting overlaps of upsampled binary maps without upsampling them (design.md, performance notes).

In Net2Vec's mode a filter's mask is bilinear_upsample(B) > 0.5 for a binary map B at H x W. Each
output pixel depends only on the 2 x 2 cell of B around its source point, so whether it is on is a
fixed function of that cell's 4-bit pattern. Per geometry (H, W, sh, sw) we tabulate, for every
output pixel, its cell and its on/off value under each of the 16 patterns, reading the values from
torch's own interpolation (so ties at exactly 0.5 resolve as torch resolves them). Then, per image:

    |M_k|          = sum over cells of area[cell, pattern_k(cell)]
    |M_k and L_c|  = sum over cells of count_c[cell, pattern_k(cell)],
    count_c[cell, q] = labelled pixels of concept c in the cell that pattern q turns on,

which costs O(cells x 16) per concept and O(K x cells) per image instead of O(K x sh x sw).

label_counts and batch_overlaps do the same for a batch of images at once (every concept mask of
the batch in one product, every filter's cells in one gather), so the cost per image is a few
tensor operations shared by the batch rather than a dozen dispatched per image. All sums are of
integers below 2^24 in float32, hence exact in any order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatternTable:
    cells: int
    order: torch.Tensor  # [cells, m] output-pixel index per cell, padded with sh*sw (a zero column)
    on: torch.Tensor  # [cells, m, 16] float 0/1; padding rows are 0
    area: torch.Tensor  # [cells, 16] pixels on per cell and pattern


def cell_patterns(binary: torch.Tensor) -> torch.Tensor:
    """binary [K, H, W] bool -> [K, (H-1)*(W-1)] uint8 pattern numbers: bits (y0,x0), (y0,x1), (y1,x0), (y1,x1)."""
    b = binary.to(torch.uint8)
    pattern = b[:, :-1, :-1] + 2 * b[:, :-1, 1:] + 4 * b[:, 1:, :-1] + 8 * b[:, 1:, 1:]
    return pattern.flatten(1)


def _source_cells(n_in: int, n_out: int) -> torch.Tensor:
    """The cell index (lower corner, at most n_in - 2) of each output pixel, align_corners=True, float32."""
    scale = torch.tensor((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0, dtype=torch.float32)
    src = scale * torch.arange(n_out, dtype=torch.float32)
    return src.floor().to(torch.int64).clamp(0, n_in - 2)


@functools.lru_cache(maxsize=64)
def table(h: int, w: int, sh: int, sw: int) -> PatternTable | None:
    """The pattern table of a geometry, or None where the method does not apply (a 1-pixel side)."""
    if h < 2 or w < 2:
        return None
    rows, cols = _source_cells(h, sh), _source_cells(w, sw)
    cell_of = (rows[:, None] * (w - 1) + cols[None, :]).flatten()  # [S]
    n_cells = (h - 1) * (w - 1)
    on = torch.zeros(sh * sw, 16)
    parity = ((rows[:, None] % 2) * 2 + (cols[None, :] % 2)).flatten()
    yy = torch.arange(h)[:, None]
    xx = torch.arange(w)[None, :]
    for py in (0, 1):
        for px in (0, 1):
            # A cell whose lower corner has this parity sees bit ((y-py)%2)*2 + (x-px)%2 at (y, x).
            bit_index = ((yy - py) % 2) * 2 + (xx - px) % 2
            inputs = torch.stack([((q >> bit_index) & 1).float() for q in range(16)])[:, None]
            out = F.interpolate(inputs, size=(sh, sw), mode="bilinear", align_corners=True)[:, 0] > 0.5
            mine = parity == py * 2 + px
            on[mine] = out.flatten(1).T[mine].float()
    counts = torch.bincount(cell_of, minlength=n_cells)
    m = int(counts.max())
    sorted_pixels = torch.argsort(cell_of, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(sh * sw) - starts[cell_of[sorted_pixels]]
    order = torch.full((n_cells, m), sh * sw, dtype=torch.int64)
    order[cell_of[sorted_pixels], slot] = sorted_pixels
    padded_on = torch.cat([on, torch.zeros(1, 16)])[order]  # [cells, m, 16]
    result = PatternTable(n_cells, order, padded_on, padded_on.sum(1))
    if not _agrees_with_torch(result, h, w, sh, sw):
        return None
    return result


@functools.lru_cache(maxsize=64)
def table_on(h: int, w: int, sh: int, sw: int, device: torch.device) -> PatternTable | None:
    """table() with its tensors on DEVICE."""
    tab = table(h, w, sh, sw)
    if tab is None or device.type == "cpu":
        return tab
    return PatternTable(tab.cells, tab.order.to(device), tab.on.to(device), tab.area.to(device))


@functools.lru_cache(maxsize=16)
def packed_cells(h: int, w: int, sh: int, sw: int) -> np.ndarray | None:
    """uint64 [cells, 16, words]: the output pixels each cell turns on under each pattern, as packed
    bits (pixel p is bit p % 64 of word p // 64), so that a filter's whole mask is the OR of its
    cells' rows: the upsampled mask without the upsample. None where table() is None."""
    tab = table(h, w, sh, sw)
    if tab is None:
        return None
    pixels = sh * sw
    words = (pixels + 63) // 64
    bits = np.zeros((tab.cells, 16, words * 64), dtype=bool)
    order = tab.order.numpy()
    on = tab.on.numpy() > 0  # [cells, m, 16]
    cell, slot = np.nonzero(order < pixels)
    bits[cell[:, None], np.arange(16)[None, :], order[cell, slot][:, None]] = on[cell, slot]
    return np.packbits(bits, axis=2, bitorder="little").view("<u8")


def _agrees_with_torch(tab: PatternTable, h: int, w: int, sh: int, sw: int) -> bool:
    """Self-check on random maps: the tabulated masks must equal torch's, or the caller falls back."""
    gen = torch.Generator().manual_seed(0)
    binary = torch.rand(8, h, w, generator=gen) < 0.35
    direct = F.interpolate(binary[:, None].float(), size=(sh, sw), mode="bilinear", align_corners=True)[:, 0] > 0.5
    labels = torch.rand(3, sh, sw, generator=gen) < 0.5
    inter, area = overlaps(binary, labels, tab)
    expected = direct.flatten(1).float() @ labels.flatten(1).float().T
    return bool(torch.equal(area, direct.flatten(1).sum(1).float()) and torch.equal(inter, expected))


def overlaps(binary: torch.Tensor, labels: torch.Tensor, tab: PatternTable) -> tuple[torch.Tensor, torch.Tensor]:
    """binary [K, H, W] bool, labels [C, sh, sw] bool -> (intersections [K, C], |M| [K])."""
    c, k = len(labels), len(binary)
    pattern = cell_patterns(binary)  # [K, cells]
    # An all-off cell (pattern 0) turns no pixel on, and thresholded maps are sparse: only the
    # (filter, cell) pairs with some corner on contribute.
    filters, cells = torch.nonzero(pattern, as_tuple=True)
    index = cells * 16 + pattern[filters, cells].long()
    device = labels.device
    mask_area = torch.zeros(k, device=device).index_add_(0, filters, tab.area.flatten()[index])
    flat = torch.cat([labels.flatten(1).float(), torch.zeros(c, 1, device=device)], dim=1)
    by_cell = torch.index_select(flat, 1, tab.order.flatten()).view(c, *tab.order.shape)  # [C, cells, m]
    count = torch.bmm(by_cell.transpose(0, 1), tab.on)  # [cells, C, 16]
    count = count.transpose(1, 2).reshape(tab.cells * 16, c)
    inter = torch.zeros(k, c, device=device).index_add_(0, filters, count[index])  # [K, C]
    return inter, mask_area


# Bounds on the temporaries of the batched functions (floats): masks per label_counts product,
# gathered rows per index_add_.
_MASKS_PER_PRODUCT = 256
_GATHER_FLOATS = 1 << 22


def label_counts(labels: torch.Tensor, tab: PatternTable) -> torch.Tensor:
    """labels [N, sh, sw] bool (any images of one size) -> counts [N, cells * 16] float:
    counts[n, cell * 16 + q] = pixels of mask n in the cell that pattern q turns on."""
    n = len(labels)
    out = torch.empty(n, tab.cells * 16, device=labels.device)
    order = tab.order.flatten()
    for start in range(0, n, _MASKS_PER_PRODUCT):
        part = labels[start : start + _MASKS_PER_PRODUCT].flatten(1).view(torch.uint8)
        flat = torch.cat([part, part.new_zeros(len(part), 1)], dim=1)  # a zero column for padding
        by_cell = torch.index_select(flat, 1, order).view(len(part), tab.cells, -1).float()  # [n, cells, m]
        count = torch.bmm(by_cell.transpose(0, 1), tab.on)  # [cells, n, 16]
        out[start : start + len(part)] = count.transpose(0, 1).reshape(len(part), -1)
    return out


@dataclass(frozen=True)
class PixelTypes:
    """The output pixels of a geometry grouped by what the 16 patterns do to them: within a cell, a
    pixel's on/off column over the patterns depends only on where it sits, and few columns occur
    (18 for 13x13 -> 113x113), so per-cell counts are per-(cell, type) pixel counts times values."""

    key: np.ndarray  # int32 [sh * sw]: cell * n_types + type of each output pixel
    values: np.ndarray  # float32 [n_types, 16]: 1 where the pattern turns a pixel of the type on
    n_types: int
    full: np.ndarray  # int64 [cells * n_types]: the pixels of each (cell, type), an all-ones mask's counts


@functools.lru_cache(maxsize=64)
def pixel_types(h: int, w: int, sh: int, sw: int) -> PixelTypes | None:
    """The pixel types of a geometry, read off its pattern table (None where there is none)."""
    tab = table(h, w, sh, sw)
    if tab is None:
        return None
    order = tab.order.flatten()
    real = order < sh * sw  # padding slots name no pixel
    values, inverse = torch.unique(tab.on.flatten(0, 1)[real], dim=0, return_inverse=True)
    cell = torch.arange(tab.cells).repeat_interleave(tab.order.shape[1])[real]
    key = torch.empty(sh * sw, dtype=torch.int64)
    key[order[real]] = cell * len(values) + inverse
    full = torch.bincount(key, minlength=tab.cells * len(values)).numpy()
    return PixelTypes(key.numpy().astype(np.int32), values.numpy().astype(np.float32), len(values), full)


def sparse_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell counts [C, cells * 16] -> (index [Z], counts [Z, 16]) of the (concept, cell) rows with
    some labelled pixel, index = concept * cells + cell, ascending. Pattern 15 (all corners on) turns on
    every pixel of its cell, so a row is all zeros exactly where its count for pattern 15 is."""
    rows = counts.reshape(-1, 16)
    index = torch.nonzero(rows[:, 15]).flatten()
    return index, rows[index]


def code_counts(
    channels: list[np.ndarray],
    present: list[np.ndarray],
    local: np.ndarray,
    whole: np.ndarray,
    n: int,
    tab: PatternTable,
    types: PixelTypes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_counts(label_counts(masks)) of an image's concept masks straight from its decoded label
    maps, no mask built. CHANNELS: int label maps [sh, sw], PRESENT: the label numbers of each;
    LOCAL: label number -> concept row (-1: none, as for 0); WHOLE: rows of image-level concepts
    (all-ones masks); N concepts -> (index [Z] int64, counts [Z, 16] float32)."""
    per_image = tab.cells * types.n_types
    dump = n * per_image  # where unlabelled pixels count: a block past the concepts' bins, cut off
    # Label number -> the first bin of its concept's block (unlabelled: the dump block), so that a
    # pixel's bin is one lookup and one addition.
    first_bin = np.where(local >= 0, local * per_image, dump).astype(np.int32)
    keys = np.empty((len(channels), types.key.size), np.int32)
    for j, codes in enumerate(channels):
        flat = codes.ravel()
        for i in range(j):  # a mask is the OR of its channels: each (pixel, label) once
            if np.intersect1d(present[i], present[j], assume_unique=True).size:
                flat = np.where(flat == channels[i].ravel(), 0, flat)
        np.add(np.take(first_bin, flat), types.key, out=keys[j])
    pixels = np.bincount(keys.ravel(), minlength=dump + per_image)[:dump].reshape(n, per_image)
    pixels[whole] = types.full  # every pixel of every cell
    pixels = torch.from_numpy(pixels.reshape(n * tab.cells, types.n_types).astype(np.float32))
    # Integers below 2^24 in float32: the product is exact, as label_counts' is. In torch, whose
    # thread count a worker sets to one (numpy's BLAS would start threads of its own in every worker).
    counts = pixels @ torch.from_numpy(types.values)
    index = torch.nonzero(counts[:, 15]).flatten()  # as sparse_counts: the rows with labelled pixels
    return index, counts[index]


def batch_overlaps(
    binary: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, pair_image: torch.Tensor, tab: PatternTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """binary [B, K, H, W] bool; the counts of N concept masks as sparse_counts gives them (INDEX = mask *
    cells + cell; COUNTS [Z, 16], any dtype), mask n belonging to image pair_image[n] (non-decreasing)
    -> (intersections [N, K], |M| [B, K])."""
    b, k = binary.shape[:2]
    pattern = cell_patterns(binary.flatten(0, 1))  # [B * K, cells]
    rows, cells = torch.nonzero(pattern, as_tuple=True)
    return _entry_overlaps(b, k, rows, cells * 16 + pattern[rows, cells].long(), index, counts, pair_image, tab)


def code_overlaps(
    codes: torch.Tensor,
    cutoffs: torch.Tensor,
    index: torch.Tensor,
    counts: torch.Tensor,
    pair_image: torch.Tensor,
    tab: PatternTable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_overlaps of the binary maps codes >= cutoffs: codes [B, K, H, W] uint8, cutoffs [B, K] integers
    (256 and above: no code is on). Only the maps with some position on are read: with thresholds at a top quantile most
    (image, filter) maps have none (NetDissect-Lite skips those units too)."""
    b, k = codes.shape[:2]
    flat = cutoffs.flatten()
    live = torch.nonzero(flat <= 255).flatten()  # (image, filter) rows whose largest code could be on
    binary = codes.reshape(b * k, *codes.shape[2:])[live] >= flat[live].clamp(min=0).to(torch.uint8)[:, None, None]
    pattern = cell_patterns(binary)  # [live, cells]
    at, cells = torch.nonzero(pattern, as_tuple=True)
    return _entry_overlaps(b, k, live[at], cells * 16 + pattern[at, cells].long(), index, counts, pair_image, tab)


def _entry_overlaps(
    b: int,
    k: int,
    rows: torch.Tensor,
    code: torch.Tensor,
    index: torch.Tensor,
    counts: torch.Tensor,
    pair_image: torch.Tensor,
    tab: PatternTable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums behind batch_overlaps, from the (image, filter, cell) entries with some corner on
    (ROWS = image * K + filter, CODE = cell * 16 + pattern) and the masks' sparse counts."""
    n, device = len(pair_image), pair_image.device
    images = torch.div(rows, k, rounding_mode="floor")
    mask_area = torch.zeros(b * k, device=device).index_add_(0, rows, tab.area.flatten()[code]).view(b, k)
    if n == 0:
        return torch.zeros(0, k, device=device), mask_area
    # Each image's masks in slots 0..C_b-1 of a padded [B, cells, C_max, 16] table, so that one
    # gather reads, for every (image, filter, cell) on, the counts of all of that image's concepts.
    per_image = torch.bincount(pair_image, minlength=b)
    slot = torch.arange(n, device=device) - (torch.cumsum(per_image, 0) - per_image)[pair_image]
    width = int(per_image.max())
    mask, cell = torch.div(index, tab.cells, rounding_mode="floor"), index % tab.cells
    table = torch.zeros(b * tab.cells * width, 16, dtype=counts.dtype, device=device)
    table.index_copy_(0, (pair_image[mask] * tab.cells + cell) * width + slot[mask], counts)
    table = table.view(b * tab.cells, width, 16)
    source, pattern = images * tab.cells + torch.div(code, 16, rounding_mode="floor"), code % 16
    inter = torch.zeros(b * k, width, device=device)
    step = max(1, _GATHER_FLOATS // width)
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        inter.index_add_(0, rows[part], table[source[part], :, pattern[part]].float())
    inter = inter.view(b, k, width)[pair_image, :, slot]  # [N, K]
    return inter, mask_area
