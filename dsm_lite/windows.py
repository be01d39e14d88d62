"""Windows for spatial (local) merging, in two readings.

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["num_windows", "window_ids", "window_partition", "window_reverse",
           "SquareLayout", "square_side", "square_layout", "square_window_ids", "window_quotas"]


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
    _, width = grid
    _, per_row = num_windows(grid, window)
    y, x = anchors // width, anchors % width
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
