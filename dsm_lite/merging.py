"""Token merging: bipartite soft matching (ToMe) and its windowed variant, as pure functions.

Every matching function returns a :class:`Merge`: three index tensors that say which tokens
are folded into which and which survive, in what order. Applying a merge is the same
scatter-then-gather for every method, so ToMe, spatial merging, DSM and pruning differ only
in how they choose indices.

Shapes: ``B`` batch, ``N`` tokens in the current sequence (prefix tokens first), ``C``
channels, ``r`` tokens removed, ``P`` protected prefix tokens (class, distillation,
registers: ``model.num_prefix_tokens``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "Merge",
    "bipartite_soft_matching",
    "window_soft_matching",
    "window_quota_matching",
    "prune_lowest_norm",
    "merge_wavg",
    "merge_source",
    "max_reduction",
]


@dataclass
class Merge:
    """One token-reduction step, as indices into the current sequence.

    Attributes:
        src: (B, r) tokens folded into ``dst`` (None for pruning: they are simply dropped).
        dst: (B, r) the token each ``src`` token is folded into.
        keep: (B, N - r) the surviving tokens, in output order.
    """

    src: Optional[Tensor]
    dst: Optional[Tensor]
    keep: Tensor

    @property
    def r(self) -> int:
        return 0 if self.src is None else self.src.shape[1]

    def __call__(self, x: Tensor, mode: str = "mean") -> Tensor:
        """Apply to (B, N, C) -> (B, N - r, C); ``mode`` is a ``scatter_reduce`` reduction."""
        c = x.shape[-1]
        if self.src is not None:
            moved = x.gather(1, self.src[..., None].expand(-1, -1, c))
            # include_self: the destination's own value takes part, as in ToMe
            x = x.scatter_reduce(1, self.dst[..., None].expand(-1, -1, c), moved, reduce=mode)
        return x.gather(1, self.keep[..., None].expand(-1, -1, c))


def max_reduction(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r bipartite matching can remove from ``num_tokens`` (ToMe's clamp)."""
    return max((num_tokens - num_protected) // 2, 0)


def _normalize(metric: Tensor) -> Tensor:
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _tome_order(num_tokens: int, num_protected: int, unm: Tensor, dst_all: Tensor) -> Tensor:
    """ToMe's output order: protected prefix tokens interleaved as in the input, then the
    unmerged A tokens, then every B token. ``unm`` and ``dst_all`` are sequence indices."""
    na, nb = (num_protected + 1) // 2, num_protected // 2
    if nb == 0:
        return torch.cat([unm, dst_all], dim=1)
    prefix = torch.stack([unm[:, :nb], dst_all[:, :nb]], dim=2).flatten(1)
    return torch.cat([prefix, unm[:, nb:na], unm[:, na:], dst_all[:, nb:]], dim=1)


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    num_protected: int = 0,
    order: str = "tome",
) -> Merge:
    """Bipartite soft matching of ToMe (Bolya et al., 2023), exactly as the official code.

    Tokens alternate into A (even positions) and B (odd positions), counting the prefix.
    Each A token proposes its most similar B token (cosine similarity of ``metric``); the r
    best proposals are merged. Protected prefix tokens never merge: as sources (in A) their
    rows are -inf, as destinations (in B) their columns are -inf.

    Args:
        metric: (B, N, C) similarity feature (ToMe: keys averaged over heads).
        r: tokens to remove; clamped to ``max_reduction(N, num_protected)``.
        num_protected: leading tokens that never merge.
        order: ``"tome"`` keeps ToMe's output order (unmerged A tokens, sorted when there is a
            prefix, then all B tokens); ``"sequence"`` keeps survivors in input order, which
            DSM uses so that tokens stay in spatial order.

    Returns:
        A :class:`Merge` removing ``min(r, max_reduction)`` tokens.
    """
    b, n, _ = metric.shape
    r = min(r, max_reduction(n, num_protected))
    arange = torch.arange(n, device=metric.device)
    if r <= 0:
        return Merge(None, None, arange.expand(b, n))
    with torch.no_grad():
        metric = _normalize(metric)
        a, bb = metric[:, ::2], metric[:, 1::2]
        scores = a @ bb.transpose(-1, -2)
        na, nb = (num_protected + 1) // 2, num_protected // 2
        if na:
            scores[:, :na, :] = -math.inf
        if nb:
            scores[:, :, :nb] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        # stable: equal scores merge in A order, so results are defined even for ties
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
        if num_protected:
            unm_idx = unm_idx.sort(dim=1).values
        # sequence positions of A and B tokens (a lookup, not index arithmetic, so that
        # MAC counters see no multiplications here)
        pos_a, pos_b = arange[0::2].expand(b, -1), arange[1::2].expand(b, -1)
        src, dst, unm = pos_a.gather(1, src_idx), pos_b.gather(1, dst_idx), pos_a.gather(1, unm_idx)
        if order == "tome":
            keep = _tome_order(n, num_protected, unm, pos_b)
        elif order == "sequence":
            keep = _keep_sorted(n, src)
        else:
            raise ValueError(f"order must be 'tome' or 'sequence', got {order!r}")
    return Merge(src, dst, keep)


def _keep_sorted(n: int, removed: Tensor) -> Tensor:
    """(B, N - r) indices of the tokens not in ``removed`` (B, r), ascending."""
    b, r = removed.shape
    keep = torch.ones(b, n, dtype=torch.bool, device=removed.device)
    keep = keep.scatter(1, removed, torch.zeros_like(removed, dtype=torch.bool))
    # each row has exactly n - r True values; a stable sort puts them first, in order
    return keep.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, : n - r]


def window_soft_matching(
    metric: Tensor,
    r: int,
    window_ids: Tensor,
    num_windows: int,
    window_capacity: int,
    num_protected: int = 0,
) -> Merge:
    """Bipartite soft matching inside windows, with windows stacked into the batch dimension.

    The patch tokens (everything after the prefix) are grouped by window; inside a window
    they alternate into A and B in sequence order (the same parity rule as ToMe over the full
    sequence, so one window covering the grid gives ToMe's first merge). Windows are packed
    into a (B * num_windows, capacity, C) stack, padded where a window holds fewer tokens;
    padding slots score -inf, so they never merge. The r best proposals are then taken over
    all windows of an image together: windows with more redundancy give up more tokens, and a
    window with one token simply gives none.

    Args:
        metric: (B, N, C) similarity feature; the first ``num_protected`` tokens are the prefix.
        r: tokens to remove per image; clamped to ``(M - num_windows) // 2`` for M patch
            tokens, which every window layout can satisfy (a window of n tokens offers at
            least n // 2 proposals).
        window_ids: (B, N - num_protected) window of each patch token, in [0, num_windows).
        num_windows: windows per image.
        window_capacity: most tokens any window can hold (w * w for a w x w window).
        num_protected: prefix tokens, never merged.

    Returns:
        A :class:`Merge` whose survivors stay in sequence order.
    """
    b, n, c = metric.shape
    p = num_protected
    m = n - p
    r = min(r, max((m - num_windows) // 2, 0))
    device = metric.device
    if r <= 0:
        return Merge(None, None, torch.arange(n, device=device).expand(b, n))
    with torch.no_grad():
        feats = _normalize(metric[:, p:])
        # rank of each token inside its window, in sequence order
        onehot = torch.nn.functional.one_hot(window_ids, num_windows)  # (B, M, W)
        rank = (onehot.cumsum(dim=1) * onehot).sum(-1) - 1  # (B, M)
        is_b = (rank + p) % 2 == 1
        half = (window_capacity + 1) // 2
        # slot = ((image * W + window) * 2 + side) * half + rank // 2
        img = torch.arange(b, device=device)[:, None]
        slot = ((img * num_windows + window_ids) * 2 + is_b.long()) * half + rank // 2
        slot = slot.flatten()
        stack = feats.new_zeros(b * num_windows * 2 * half, c)
        stack.index_copy_(0, slot, feats.reshape(-1, c))
        owner = torch.full((b * num_windows * 2 * half,), -1, dtype=torch.long, device=device)
        owner.index_copy_(0, slot, torch.arange(p, n, device=device).repeat(b))
        stack = stack.view(b * num_windows, 2, half, c)
        owner = owner.view(b * num_windows, 2, half)
        scores = stack[:, 0] @ stack[:, 1].transpose(-1, -2)  # (B*W, half, half)
        valid = owner >= 0
        scores = scores.masked_fill(~(valid[:, 0, :, None] & valid[:, 1, None, :]), -math.inf)
        node_max, node_idx = scores.max(dim=-1)  # (B*W, half)
        node_max = node_max.view(b, num_windows * half)
        edge = node_max.argsort(dim=-1, descending=True, stable=True)[:, :r]  # (B, r)
        dst_slot = node_idx.view(b, -1).gather(1, edge) + (edge // half) * half
        src = owner[:, 0].reshape(b, -1).gather(1, edge)
        dst = owner[:, 1].reshape(b, -1).gather(1, dst_slot)
        keep = _keep_sorted(n, src)
    return Merge(src, dst, keep)


def window_quota_matching(
    metric: Tensor,
    window_ids: Tensor,
    num_windows: int,
    window_capacity: int,
    quota: Union[int, Tensor],
    r: Optional[int] = None,
    num_protected: int = 0,
) -> Merge:
    """Bipartite soft matching inside windows, each window merging its own quota (paper DSM).

    The windows are the same for every image (``window_ids`` gives one window per sequence
    position, e.g. :func:`dsm_lite.windows.square_window_ids`), and every window merges
    ``min(quota, n // 2)`` of its own ``n`` tokens: its best proposals, never another window's.
    So how many tokens go is fixed before any image is seen.

    Steps:
        1. Normalise the patch tokens' features (the ``num_protected`` prefix tokens are left
           out: they never merge).
        2. Rank each token inside its window, in sequence order; rank k goes to B when
           ``k + num_protected`` is odd, else to A (ToMe's parity over the full sequence, so
           one window holding every patch token gives ToMe's first merge).
        3. Stack the windows: (B, W, 2, half, C) features, ``half = ceil(capacity / 2)``,
           zeros in padding slots, plus the sequence position owning each slot (-1: padding).
        4. Score every A slot against every B slot of its window (one batched matmul,
           (B, W, half, half)); pairs with a padding slot score -inf.
        5. Each A slot proposes its most similar B slot (the first on ties).
        6. Sort each window's proposals by score, stable (ties: in A rank order).
        7. Window w keeps the first ``min(quota_w, n_w // 2)`` sorted proposals: a fixed set of
           (window, place) pairs, the same for every image, ``r`` in all.
        8. Map the chosen slots back to sequence positions (``src`` into ``dst``); survivors
           keep their sequence order.

    Args:
        metric: (B, N, C) similarity feature; the first ``num_protected`` tokens are the prefix.
        window_ids: (N - num_protected,) window of each patch token, in [0, num_windows).
        num_windows: W, windows per image.
        window_capacity: most tokens a window can hold (``w * w``).
        quota: merges per window before the cap: an int (every window) or a (W,) long tensor.
        r: total merges per image, ``sum_w min(quota_w, n_w // 2)``; pass it (the schedule
            knows it) to keep the forward free of host syncs. None computes it, which reads
            a tensor back to the host.
        num_protected: prefix tokens, never merged.

    Returns:
        A :class:`Merge` removing ``r`` tokens, survivors in sequence order.
    """
    b, n, c = metric.shape
    p = num_protected
    m = n - p
    device = metric.device
    if window_ids.shape != (m,):
        raise ValueError(f"window_ids must have shape ({m},), got {tuple(window_ids.shape)}")
    with torch.no_grad():
        # 2. rank inside the window, A/B side, and the real tokens per window
        onehot = torch.nn.functional.one_hot(window_ids, num_windows)  # (M, W)
        rank = (onehot.cumsum(dim=0) * onehot).sum(-1) - 1  # (M,)
        counts = onehot.sum(0)  # (W,)
        caps = counts // 2
        if isinstance(quota, int):
            quotas = caps.clamp(max=quota)
        else:
            quotas = torch.minimum(caps, quota.to(device))
        if r is None:
            r = int(quotas.sum())
        if r <= 0:
            return Merge(None, None, torch.arange(n, device=device).expand(b, n))
        # 1. + 3. stack windows: slot = (window * 2 + side) * half + rank // 2
        is_b = (rank + p) % 2 == 1
        half = (window_capacity + 1) // 2
        slot = (window_ids * 2 + is_b.long()) * half + rank // 2
        stack = metric.new_zeros(b, num_windows * 2 * half, c)
        stack.index_copy_(1, slot, _normalize(metric[:, p:]))
        owner = torch.full((num_windows * 2 * half,), -1, dtype=torch.long, device=device)
        owner.index_copy_(0, slot, torch.arange(p, n, device=device))
        stack = stack.view(b, num_windows, 2, half, c)
        owner = owner.view(num_windows, 2, half)
        # 4. scores inside each window
        scores = stack[:, :, 0] @ stack[:, :, 1].transpose(-1, -2)  # (B, W, half, half)
        valid = owner >= 0
        scores = scores.masked_fill(~(valid[:, 0, :, None] & valid[:, 1, None, :]), -math.inf)
        # 5. best B of each A
        node_max, node_idx = scores.max(dim=-1)  # (B, W, half)
        # 6. each window's proposals, best first
        order = node_max.argsort(dim=-1, descending=True, stable=True)  # (B, W, half)
        # 7. the first quota_w places of window w, as flat (window, place) indices: a fixed
        # set, found with a sort (static shape) rather than nonzero (data-dependent shape)
        places = torch.arange(half, device=device)
        taken = places[None, :] < quotas[:, None]  # (W, half)
        pick = taken.flatten().to(torch.uint8).argsort(descending=True, stable=True)[:r]  # (r,)
        base = torch.arange(num_windows, device=device)[:, None] * half  # (W, 1)
        src_slot = (order + base).view(b, -1)[:, pick]  # (B, r) flat A slots
        dst_slot = node_idx.view(b, -1).gather(1, src_slot) + (src_slot // half) * half
        # 8. back to sequence positions
        src = owner[:, 0].reshape(-1)[src_slot]
        dst = owner[:, 1].reshape(-1)[dst_slot]
        keep = _keep_sorted(n, src)
    return Merge(src, dst, keep)


def prune_lowest_norm(metric: Tensor, r: int, num_protected: int = 0) -> Merge:
    """Drop the r tokens whose ``metric`` has the lowest L2 norm (the paper's pruning baseline).

    Args:
        metric: (B, N, C); the first ``num_protected`` tokens are never dropped.
        r: tokens to drop, clamped to ``N - num_protected - 1``.
    """
    b, n, _ = metric.shape
    r = min(r, max(n - num_protected - 1, 0))
    if r <= 0:
        return Merge(None, None, torch.arange(n, device=metric.device).expand(b, n))
    with torch.no_grad():
        norms = metric.norm(dim=-1)
        norms[:, :num_protected] = math.inf
        dropped = norms.argsort(dim=-1, stable=True)[:, :r]
        keep = _keep_sorted(n, dropped)
    return Merge(None, None, keep)


def merge_wavg(merge: Merge, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge. x: (B, N, C), size: (B, N, 1) or None (all ones).

    Returns (B, N - r, C) features and (B, N - r, 1) sizes. For pruning, kept tokens keep
    their size.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    if merge.src is None:
        return merge(x), merge(size)
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Merge, x: Tensor, source: Optional[Tensor] = None) -> Tensor:
    """Track which input tokens each token holds. source: (B, N, N0) 0/1, identity at first."""
    if source is None:
        b, n, _ = x.shape
        source = torch.eye(n, device=x.device, dtype=x.dtype)[None].expand(b, n, n)
    return merge(source, mode="amax")
