"""The patch grid: where a patch token sits, and how merged groups of patches lie on it.

Patch tokens are numbered row-major, as timm's patch embedding lays them out (prefix tokens
removed): token ``i`` of an ``h x w`` grid is at row ``i // w``, column ``i % w``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["patch_coords", "group_contiguity", "group_sizes"]


def patch_coords(index: Union[int, torch.Tensor], grid_size: Tuple[int, int]) -> Tuple[Any, Any]:
    """(row, col) on the patch grid of a patch-token index (prefix tokens already
    removed), row-major as timm's patch embedding lays them out."""
    w = grid_size[1]
    return index // w, index % w


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
    y, x = (torch.arange(n) // w).expand(b, n), (torch.arange(n) % w).expand(b, n)
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
