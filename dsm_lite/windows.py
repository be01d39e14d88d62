"""The patch grid and its windows: where a patch token sits, the windows of spatial merging,
and how merged groups lie on the grid.

Patch tokens are numbered row-major, as timm's patch embedding lays them out (prefix tokens
removed): token ``i`` of an ``h x w`` grid is at row ``i // w``, column ``i % w``
(:func:`patch_coords`).

Windows for spatial (local) merging come in two readings.

**Paper windows** (the default, ``windows="paper"``): before each local block, the M patch
tokens of the current sequence are laid row-major, in sequence order, on a square of side
``S = ceil(sqrt(M))``, padded at the bottom right, and cut into ``w x w`` windows
(``ceil(S / w)`` per side). Which window a token is in depends only on its position in the
sequence, never on the image, so the layout (and every window's share of the merges) is fixed
by M and w: :func:`square_layout`, :func:`square_window_ids`, :func:`window_quotas`.

**Joint windows** (``windows="joint"``): a window is a ``w x w`` square of the *original*
patch grid (``H x W`` patches, 14 x 14 for a 224 px image with 16 px patches). The grid is
padded at the bottom right up to a multiple of ``w``, so windows in the last row/column may
be partly padding. Every token carries an *anchor*: the raster index of one original patch it
holds (its own patch, or the patch of the token it was merged into), so its window is always
defined even after the tokens stop forming a grid.

**Merged groups on the grid** (for the analysis of :func:`dsm_lite.trace_sources`'s maps):
:func:`group_contiguity` and :func:`group_sizes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["patch_coords", "num_windows", "window_ids", "window_partition", "window_reverse",
           "SquareLayout", "square_side", "square_layout", "square_window_ids", "window_quotas",
           "group_contiguity", "group_sizes"]


def patch_coords(index: Union[int, torch.Tensor], grid_size: Tuple[int, int]) -> Tuple[Any, Any]:
    """(row, col) on the patch grid of a patch-token index (prefix tokens already
    removed), row-major as timm's patch embedding lays them out."""
    w = grid_size[1]
    return index // w, index % w


def num_windows(grid: Tuple[int, int], window: int) -> Tuple[int, int]:
    """Windows per column and per row: ``(ceil(H / w), ceil(W / w))``."""
    h, w = grid
    return -(-h // window), -(-w // window)


def window_ids(anchors: Tensor, grid: Tuple[int, int], window: int) -> Tensor:
    """Window index (raster order over windows) of each anchor.

    Args:
        anchors: (B, M) raster indices into the ``H x W`` patch grid.
        grid: (H, W).
        window: side w of the square windows, in patches.

    Returns:
        (B, M) long tensor in ``[0, ceil(H/w) * ceil(W/w))``.
    """
    _, per_row = num_windows(grid, window)
    y, x = patch_coords(anchors, grid)
    return (y // window) * per_row + x // window


def window_partition(x: Tensor, window: int) -> Tensor:
    """Stack windows into the batch dimension, padding the grid at the bottom right.

    (B, H, W, C) -> (B * ceil(H/w) * ceil(W/w), w, w, C); padding is zeros. The picture of a
    window for a reader (chapter 4 draws with it); the engine never partitions a grid, since
    merged tokens stop forming one: it matches through window ids (:func:`window_ids`,
    :func:`square_window_ids`) in :func:`dsm_lite.merging.window_soft_matching` and
    :func:`dsm_lite.merging.window_quota_matching`.
    """
    b, h, w, c = x.shape
    nh, nw = num_windows((h, w), window)
    x = torch.nn.functional.pad(x, (0, 0, 0, nw * window - w, 0, nh * window - h))
    x = x.view(b, nh, window, nw, window, c).transpose(2, 3)
    return x.reshape(b * nh * nw, window, window, c)


def window_reverse(windows: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, w, w, C) -> (B, H, W, C), padding dropped."""
    h, w = grid
    window, c = windows.shape[1], windows.shape[-1]
    nh, nw = num_windows(grid, window)
    x = windows.view(-1, nh, nw, window, window, c).transpose(2, 3)
    return x.reshape(-1, nh * window, nw * window, c)[:, :h, :w]


# --------------------------------------------------------------------------- paper windows
def square_side(num_tokens: int) -> int:
    """Side of the smallest square holding ``num_tokens`` tokens: ``ceil(sqrt(M))`` (0 for 0)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    root = math.isqrt(num_tokens)
    return root if root * root == num_tokens else root + 1


def square_window_ids(num_tokens: int, window: int,
                      device: Optional[torch.device] = None) -> Tensor:
    """Window of each sequence position when M tokens are laid on the square (paper windows).

    Position ``i`` sits at row ``i // S``, column ``i % S`` of the ``S x S`` square
    (``S = square_side(M)``); windows are ``w x w``, ``k = ceil(S / w)`` per side, numbered
    in raster order over windows, so the last row and column of windows may be partly padding.

    Args:
        num_tokens: M, patch tokens in the sequence (prefix excluded).
        window: w, the window side in tokens.
        device: where to build the ids.

    Returns:
        (M,) long tensor in ``[0, k * k)``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    side = square_side(num_tokens)
    per_side = -(-side // window)
    pos = torch.arange(num_tokens, device=device)
    row, col = pos // side, pos % side
    return (row // window) * per_side + col // window


@dataclass(frozen=True)
class SquareLayout:
    """Paper windows for M tokens: square side, windows per side and real tokens per window.

    Attributes:
        tokens: M, patch tokens laid on the square.
        window: w, window side in tokens.
        side: S = ceil(sqrt(M)).
        per_side: k = ceil(S / w) windows per side.
        counts: real (non-padding) tokens in each of the ``k * k`` windows, raster order.
    """

    tokens: int
    window: int
    side: int
    per_side: int
    counts: Tuple[int, ...]

    @property
    def num_windows(self) -> int:
        return self.per_side * self.per_side

    @property
    def capacity(self) -> int:
        """Slots per window, padding included: ``w * w``."""
        return self.window * self.window


def square_layout(num_tokens: int, window: int) -> SquareLayout:
    """The :class:`SquareLayout` of M tokens in ``w x w`` windows (see :func:`square_window_ids`).

    Pure integer arithmetic, no tensors: schedules are planned before any image is seen, also
    under fake or meta tensor modes.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    side = square_side(num_tokens)
    per_side = -(-side // window)
    full_rows, rest = divmod(num_tokens, side) if side else (0, 0)

    def row_tokens(row: int, c0: int, c1: int) -> int:  # tokens of one square row in [c0, c1)
        filled = side if row < full_rows else (rest if row == full_rows else 0)
        return max(0, min(c1, filled) - c0)

    counts = tuple(
        sum(row_tokens(row, wx * window, min((wx + 1) * window, side))
            for row in range(wy * window, min((wy + 1) * window, side)))
        for wy in range(per_side) for wx in range(per_side))
    return SquareLayout(num_tokens, window, side, per_side, counts)


def window_quotas(counts: Sequence[int], quota: int) -> Tuple[int, ...]:
    """Merges each window makes: ``quota``, but never more than half its real tokens.

    A window of n real tokens has at least ``n // 2`` tokens on each side of the bipartite
    split, so ``min(quota, n // 2)`` merges are always possible; windows of 0 or 1 tokens
    merge nothing.

    Args:
        counts: real tokens per window.
        quota: the per-window quota (the paper: ``ceil(r / windows)``).

    Returns:
        One int per window.
    """
    if quota < 0:
        raise ValueError(f"quota must be >= 0, got {quota}")
    return tuple(min(quota, int(c) // 2) for c in counts)


# --------------------------------------------------------------------------- merged groups
def group_contiguity(groups: Tensor) -> Tuple[Tensor, Tensor]:
    """How contiguous the merged groups of each photo are on the patch grid.

    Args:
        groups: (B, h, w) integer group index per patch (``dsm_lite.trace_sources``); patches
            sharing an index were merged into one token. Indices must lie in ``[0, h * w)``.

    Returns:
        ``(connected, spread)``, each (B,) float64 on the CPU (``groups`` may be on any
        device), over the photo's *merged* groups (groups of two or more patches; NaN for a
        photo with none):

        - ``connected``: share of merged groups that are 4-connected (every patch reachable
          from every other through edge-sharing patches of the same group);
        - ``spread``: mean over merged groups of bounding-box area / group size (1 for a
          filled rectangle, larger for scattered groups).
    """
    if groups.dim() != 3:
        raise ValueError(f"groups must be (B, h, w), got shape {tuple(groups.shape)}")
    groups = groups.long().cpu()
    b, h, w = groups.shape
    n = h * w
    g = groups.reshape(b, n)
    if g.numel() and (g.min() < 0 or g.max() >= n):
        raise ValueError(f"group indices must lie in [0, {n})")
    # flood fill inside groups: every patch ends with the smallest patch index it can reach
    lab = torch.arange(n).repeat(b, 1).view(b, h, w)
    steps = [((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
             ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
             ((slice(None), slice(None), slice(1, None)), (slice(None), slice(None), slice(None, -1))),
             ((slice(None), slice(None), slice(None, -1)), (slice(None), slice(None), slice(1, None)))]
    while True:
        new = lab.clone()
        for to, frm in steps:
            same = groups[to] == groups[frm]
            new[to] = torch.where(same, torch.minimum(new[to], lab[frm]), new[to])
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab.reshape(b, n)

    def per_group(v: Tensor, how: str) -> Tensor:
        return torch.zeros(b, n, dtype=v.dtype).scatter_reduce(1, g, v, how, include_self=False)

    size = per_group(torch.ones_like(g), "sum")
    merged = size > 1
    connected = per_group(lab, "amin") == per_group(lab, "amax")
    y, x = (c.expand(b, n) for c in patch_coords(torch.arange(n), (h, w)))
    box = ((per_group(y, "amax") - per_group(y, "amin") + 1)
           * (per_group(x, "amax") - per_group(x, "amin") + 1))
    count = merged.sum(1).double()
    share = (connected & merged).sum(1).double() / count          # 0/0 -> NaN: no merged group
    spread = torch.where(merged, box / size.clamp_min(1), 0.0).sum(1).double() / count
    return share, spread


def group_sizes(groups: Tensor, counted: Optional[Tensor] = None) -> Tensor:
    """Patches in the group of each patch: (B, h, w) group indices -> (B, h, w) long sizes on
    the same device (1 for a patch that was never merged).

    ``counted``: a bool mask of the patches to count, (h, w) or (B, h, w) (default: all), e.g.
    the patches *other* than the attention sinks, to ask whether a sink was merged with one of
    them. Indices must lie in ``[0, h * w)``, as :func:`dsm_lite.trace_sources` gives them.
    """
    if groups.dim() != 3:
        raise ValueError(f"groups must be (B, h, w), got shape {tuple(groups.shape)}")
    b, h, w = groups.shape
    flat = groups.reshape(b, h * w).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= h * w):
        raise ValueError(f"group indices must lie in [0, {h * w})")
    offset = flat + torch.arange(b, device=flat.device)[:, None] * (h * w)  # one bin range per photo
    weights = None
    if counted is not None:
        if counted.shape[-2:] != (h, w) or counted.dim() not in (2, 3):
            raise ValueError(f"counted must be (h, w) or (B, h, w) = {(b, h, w)}, got {tuple(counted.shape)}")
        weights = counted.to(flat.device, torch.float64).expand(b, h, w).reshape(-1)
    counts = torch.bincount(offset.flatten(), weights=weights, minlength=b * h * w)
    return counts.round().long()[offset].reshape(b, h, w)
