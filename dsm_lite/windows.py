"""Windows over the patch grid, for spatial (local) merging.

A window is a ``w x w`` square of the *original* patch grid (``H x W`` patches, 14 x 14 for a
224 px image with 16 px patches). The grid is padded at the bottom right up to a multiple of
``w``, so windows in the last row/column may be partly padding. Every token carries an
*anchor*: the raster index of one original patch it holds (its own patch, or the patch of
the token it was merged into), so its window is always defined even after the tokens stop
forming a grid.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["num_windows", "window_ids", "window_partition", "window_reverse"]


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

    (B, H, W, C) -> (B * ceil(H/w) * ceil(W/w), w, w, C); padding is zeros.
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
