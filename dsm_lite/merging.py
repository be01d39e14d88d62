"""Token merging: bipartite soft matching (ToMe) and its windowed variant, as pure functions.

Every matching function returns a :class:`Merge`: three index tensors that say which tokens
are folded into which and which survive, in what order. Applying a merge is the same
scatter-then-gather for every method, so ToMe, spatial merging, DSM and pruning differ only
in how they choose indices.

Shapes: ``B`` batch, ``N`` tokens in the current sequence (prefix tokens first), ``C``
channels, ``r`` tokens removed, ``P`` protected prefix tokens (class, distillation,
registers: ``model.num_prefix_tokens``).

Precision: the engine runs on float16, bfloat16, float32 and float64 activations, with or
without ``torch.autocast``. Matching always scores in float32 (float64 stays float64): the
similarity feature is upcast and autocast is switched off around the normalisation, the
similarity matmul, the max and the sort, because in bfloat16 (8 bits of mantissa) cosine
similarities near 1 collapse into exact ties and the merge order would follow token
positions instead of similarity. Token sizes are float32 as well (integers up to 2^24 stay
exact; bfloat16 would round sizes above 256), and the size-weighted average is taken in
that precision before the merged features go back to their own dtype.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "Merge",
    "WindowLayout",
    "bipartite_soft_matching",
    "window_layout",
    "window_soft_matching",
    "window_ranks",
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
        dst_out: optional (B, r) position of each ``dst`` token in the output, i.e. the
            index ``j`` with ``keep[:, j] == dst``; a matching function that knows it cheaply
            fills it in, otherwise it is derived from ``keep`` when first needed.
    """

    src: Optional[Tensor]
    dst: Optional[Tensor]
    keep: Tensor
    dst_out: Optional[Tensor] = None
    # flat (B * k,) row indices, built once per merge and reused for every tensor it moves
    _flat: Dict[object, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def r(self) -> int:
        return 0 if self.src is None else self.src.shape[1]

    def __call__(self, x: Tensor, mode: str = "mean") -> Tensor:
        """Apply to (B, N, C) -> (B, N - r, C); ``mode`` is a ``scatter_reduce`` reduction.

        ``"sum"`` (what :func:`merge_wavg` uses) and pure selections take a fast path: the
        survivors are copied with one ``index_select`` and the moved rows added into their
        destinations with ``index_add_``. That adds in the same order as ``scatter_reduce``
        with ``include_self`` (destination first, then sources in ``src`` order), so the
        result is the same to the bit; it just avoids ``gather`` with an expanded index,
        which reads one index per element (about 15 times slower than ``index_select`` for
        a batch-1 DeiT-S merge on CPU).
        """
        if self.src is None:
            return _take_rows(x, self._rows("keep", self.keep, x.shape[1]))
        if mode == "sum":
            n = x.shape[1]
            out = _take_rows(x, self._rows("keep", self.keep, n))
            moved = _take_rows(x, self._rows("src", self.src, n))
            dst = self._rows("dst_out", self.destinations(n), self.keep.shape[1])
            out.view(-1, out.shape[-1]).index_add_(0, dst, moved.view(-1, moved.shape[-1]))
            return out
        c = x.shape[-1]
        moved = x.gather(1, self.src[..., None].expand(-1, -1, c))
        # include_self: the destination's own value takes part, as in ToMe
        x = x.scatter_reduce(1, self.dst[..., None].expand(-1, -1, c), moved, reduce=mode)
        return x.gather(1, self.keep[..., None].expand(-1, -1, c))

    def destinations(self, num_tokens: int) -> Tensor:
        """(B, r) position of each ``dst`` token among the survivors (``dst_out``)."""
        if self.dst_out is None:
            b, k = self.keep.shape
            order = torch.arange(k, device=self.keep.device).expand(b, k)
            where = self.keep.new_empty(b, num_tokens).scatter_(1, self.keep, order)
            self.dst_out = where.gather(1, self.dst)
        return self.dst_out

    def _rows(self, name: str, index: Tensor, num_tokens: int) -> Tensor:
        """``index`` (B, k) into a (B, num_tokens, C) tensor as (B * k,) rows of its flat view
        (built once per merge: every tensor the merge moves reuses it)."""
        if name not in self._flat:
            b = index.shape[0]
            if b == 1:  # one image: the rows are the indices (no kernel to launch)
                self._flat[name] = index.reshape(-1)
                return self._flat[name]
            start = self._flat.get(num_tokens)
            if start is None:  # first row of each image
                start = torch.arange(0, b * num_tokens, num_tokens, device=index.device).view(b, 1)
                self._flat[num_tokens] = start
            self._flat[name] = (index + start).view(-1)
        return self._flat[name]

    def _survivors_then_moved(self, num_tokens: int) -> Tensor:
        """(B * N,) flat rows: every survivor (``keep``, image by image), then every ``src``
        token, so one ``index_select`` fetches both."""
        if "keep+src" not in self._flat:
            self._flat["keep+src"] = torch.cat([self._rows("keep", self.keep, num_tokens),
                                                self._rows("src", self.src, num_tokens)])
        return self._flat["keep+src"]


def _take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Rows of x (B, N, C) by flat index (B * k,) -> (B, k, C)."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, rows).view(b, -1, c)


def max_reduction(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r bipartite matching can remove from ``num_tokens`` (ToMe's clamp)."""
    return max((num_tokens - num_protected) // 2, 0)


def _normalize(metric: Tensor) -> Tensor:
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)


#: activation dtypes the engine supports
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the half-precision dtypes, whose matching scores are computed in float32
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _scoring_dtype(dtype: torch.dtype) -> torch.dtype:
    """Matching scores and token sizes: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _full_precision(metric: Tensor):
    """Context for matching on ``metric``: autocast off (a no-op context when it is off)."""
    device_type = metric.device.type
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _upcast(metric: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; other dtypes unchanged (no copy)."""
    return metric.float() if metric.dtype in HALF_DTYPES else metric


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
    if r <= 0:
        return Merge(None, None, torch.arange(n, device=metric.device).expand(b, n))
    if order not in ("tome", "sequence"):
        raise ValueError(f"order must be 'tome' or 'sequence', got {order!r}")
    with torch.no_grad(), _full_precision(metric):
        metric = _normalize(_upcast(metric))
        a, bb = metric[:, ::2], metric[:, 1::2]
        scores = a @ bb.transpose(-1, -2)
        na, nb = (num_protected + 1) // 2, num_protected // 2
        if na:
            scores[:, :na, :].fill_(-math.inf)
        if nb:
            scores[:, :, :nb].fill_(-math.inf)
        node_max, node_idx = scores.max(dim=-1)
        # stable: equal scores merge in A order, so results are defined even for ties
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
        # sequence positions: A token i sits at 2i, B token j at 2j + 1
        src, dst = src_idx * 2, dst_idx * 2 + 1
        if order == "sequence":
            return Merge(src, dst, _keep_sorted(n, src))
        unm_idx = edge_idx[:, r:]
        if num_protected:
            unm_idx = unm_idx.sort(dim=1).values
        pos_b = torch.arange(1, n, 2, device=metric.device).expand(b, -1)
        keep = _tome_order(n, num_protected, unm_idx * 2, pos_b)
        # without a B prefix, every B token sits, in order, after the unmerged A tokens
        dst_out = dst_idx + (keep.shape[1] - n // 2) if nb == 0 else None
    return Merge(src, dst, keep, dst_out)


def _keep_sorted(n: int, removed: Tensor) -> Tensor:
    """(B, N - r) indices of the tokens not in ``removed`` (B, r), ascending."""
    b, r = removed.shape
    gone = torch.zeros(b, n, dtype=torch.uint8, device=removed.device).scatter_(1, removed, 1)
    # each row has exactly n - r zeros; a stable sort puts them first, in order
    return gone.argsort(dim=1, stable=True)[:, : n - r]


@dataclass
class WindowLayout:
    """Where window matching puts each patch token: a padded stack of windows.

    Windows are stacked image-major, each as two halves of ``half`` slots (A side, then B
    side); a token of rank k inside its window (sequence order) goes to side
    ``(k + P) % 2`` at position ``k // 2``. Only the window ids decide the layout, so it can
    be built once and reused whenever they are known in advance (e.g. for the first merging
    block, when every token is still its own patch).

    Attributes:
        slot: (B * M,) flat slot of each patch token in the (B * W * 2 * half) stack.
        owner: (B * W, 2, half) sequence index of the token in each slot, -1 for padding.
        empty: (B * W, 2, half) bool, True for padding slots.
    """

    slot: Tensor
    owner: Tensor
    empty: Tensor

    @property
    def half(self) -> int:
        return self.owner.shape[-1]


def window_layout(window_ids: Tensor, num_windows: int, window_capacity: int,
                  num_protected: int = 0) -> WindowLayout:
    """The :class:`WindowLayout` of patch tokens with ``window_ids`` (B, M) in [0, W).

    Args:
        window_ids: (B, M) window of each patch token (prefix excluded), in sequence order.
        num_windows: W, windows per image.
        window_capacity: most tokens a window can hold.
        num_protected: P, prefix tokens before the patch tokens (sets the A/B parity and
            the sequence indices stored in ``owner``).
    """
    b, m = window_ids.shape
    p, device = num_protected, window_ids.device
    half = (window_capacity + 1) // 2
    with torch.no_grad():
        # 1 + rank of each token inside its window, in sequence order
        hits = window_ids[..., None] == torch.arange(num_windows, device=device)  # (B, M, W)
        count = hits.cumsum(dim=1).gather(2, window_ids[..., None])[..., 0]  # (B, M)
        # offset inside the window's 2 * half slots, by 1 + rank: side * half + rank // 2
        rank = torch.arange(-1, window_capacity, device=device)
        inner = ((rank + p) % 2) * half + torch.div(rank, 2, rounding_mode="floor")
        # slot = (image * W + window) * 2 * half + inner
        first = torch.arange(0, b * num_windows * 2 * half, num_windows * 2 * half, device=device)
        slot = (first[:, None].add(window_ids, alpha=2 * half) + inner.take(count)).view(-1)
        owner = torch.full((b * num_windows * 2 * half,), -1, dtype=torch.long, device=device)
        tokens = torch.arange(p, p + m, device=device).repeat(b)
        owner = owner.index_copy_(0, slot, tokens).view(b * num_windows, 2, half)
    return WindowLayout(slot, owner, owner < 0)


def window_soft_matching(
    metric: Tensor,
    r: int,
    window_ids: Tensor,
    num_windows: int,
    window_capacity: int,
    num_protected: int = 0,
    layout: Optional[WindowLayout] = None,
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
        layout: optional precomputed ``window_layout(window_ids, num_windows,
            window_capacity, num_protected)``, for callers that know the window ids in
            advance (it is input-independent until the first merge); built here if None.

    Returns:
        A :class:`Merge` whose survivors stay in sequence order.
    """
    b, n, c = metric.shape
    p = num_protected
    m = n - p
    r = min(r, max((m - num_windows) // 2, 0))
    if r <= 0:
        return Merge(None, None, torch.arange(n, device=metric.device).expand(b, n))
    with torch.no_grad(), _full_precision(metric):
        # 1. where each token goes: its window, and inside it side A or B by rank parity
        if layout is None:
            layout = window_layout(window_ids, num_windows, window_capacity, p)
        half = layout.half
        # 2. stack the windows: (B * W, side, half, C) unit features, zeros in padding slots
        feats = _normalize(_upcast(metric[:, p:]))
        stack = feats.new_zeros(b * num_windows * 2 * half, c)
        stack.index_copy_(0, layout.slot, feats.reshape(-1, c))
        stack = stack.view(b * num_windows, 2, half, c)
        # 3. cosine similarity of every A token to every B token of its own window
        scores = stack[:, 0] @ stack[:, 1].transpose(-1, -2)  # (B*W, half, half)
        # 4. padding takes no part: an empty B slot is never a destination; an empty A slot
        # never proposes (its row would be all -inf; setting its best score to -inf is the
        # same for every proposal that can be chosen, since the clamp on r leaves at least r
        # finite proposals)
        scores.masked_fill_(layout.empty[:, 1, None, :], -math.inf)
        # 5. each A token proposes its most similar B token
        node_max, node_idx = scores.max(dim=-1)  # (B*W, half)
        node_max.masked_fill_(layout.empty[:, 0], -math.inf)
        # 6. the r best proposals over all windows of an image merge
        edge = node_max.view(b, num_windows * half).argsort(dim=-1, descending=True, stable=True)[:, :r]
        # 7. back from slots to sequence indices; survivors stay in sequence order
        src = layout.owner[:, 0].reshape(b, -1).gather(1, edge)
        dst = layout.owner[:, 1].gather(1, node_idx).view(b, -1).gather(1, edge)
        keep = _keep_sorted(n, src)
    return Merge(src, dst, keep)


def window_ranks(window_ids: Tensor, num_windows: int, num_protected: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Each token's rank inside its window and its side, and the tokens per window.

    Args:
        window_ids: (..., M) window of each patch token (prefix excluded), in sequence order.
        num_windows: W.
        num_protected: P, prefix tokens before the patch tokens: sides alternate with the
            token's place in the whole sequence, as ToMe's A/B split does.

    Returns:
        ``rank`` (..., M): 0 for a window's first token in sequence order, 1 for its second...;
        ``is_b`` (..., M) bool: the token is on side B, ``(rank + P) % 2 == 1``;
        ``counts`` (..., W): tokens in each window.
    """
    onehot = torch.nn.functional.one_hot(window_ids, num_windows)  # (..., M, W)
    rank = (onehot.cumsum(dim=-2) * onehot).sum(-1) - 1
    return rank, (rank + num_protected) % 2 == 1, onehot.sum(-2)


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
        rank, is_b, counts = window_ranks(window_ids, num_windows, p)
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
    with torch.no_grad(), _full_precision(metric):
        norms = _upcast(metric).norm(dim=-1)
        norms[:, :num_protected].fill_(math.inf)
        dropped = norms.argsort(dim=-1, stable=True)[:, :r]
        keep = _keep_sorted(n, dropped)
    return Merge(None, None, keep)


def merge_wavg(merge: Merge, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge. x: (B, N, C), size: (B, N, 1) or None (all ones).

    Returns (B, N - r, C) features in x's dtype and (B, N - r, 1) sizes. Sizes are float32
    (float64 for float64 x). For pruning, kept tokens keep their size.

    A destination ``d`` of total size ``S = s_d + sum_i s_i`` becomes
    ``x_d + sum_i (s_i / S) (x_i - x_d)``, which is ``(s_d x_d + sum_i s_i x_i) / S``: each
    source pulls its destination towards itself by its share of the merged size. Written
    this way only the survivors are copied once and the r moved rows do the arithmetic (in
    the wider of x's and the sizes' dtypes), instead of weighting, packing and dividing all
    N rows: on a GPU at large batch the merge is bound by memory traffic, and this moves
    about a quarter of the bytes. For float16/bfloat16 x the pulls are summed in float32 and
    each destination is rounded to x's dtype once.
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, dtype=_scoring_dtype(x.dtype), device=x.device)
    if merge.src is None:
        return merge(x), merge(size)
    b, n, c = x.shape
    k = b * merge.keep.shape[1]  # survivors, all images
    rows = merge._survivors_then_moved(n)
    dst = merge._rows("dst_out", merge.destinations(n), merge.keep.shape[1])
    both = x.reshape(b * n, c).index_select(0, rows)  # survivors, then moved rows
    sizes = size.reshape(b * n, 1).index_select(0, rows)
    flat, moved = both[:k], both[k:]
    # the survivors' new sizes; out of place, because index_add saves its source for the
    # backward pass and the source is a view of the same tensor
    total = sizes[:k].index_add(0, dst, sizes[k:])
    wide = torch.promote_types(x.dtype, size.dtype)
    share = sizes[k:] / total.index_select(0, dst)
    base = flat.index_select(0, dst)
    if wide == x.dtype:
        flat.index_add_(0, dst, (moved - base) * share)
    else:  # half x: sum the pulls in the wide dtype and round each destination once
        pull = (moved.to(wide) - base.to(wide)) * share.to(wide)
        # sum per destination in a buffer of the moved rows' size, not of all survivors: each
        # moved row adds into the slot of the first moved row with the same destination
        first = torch.full((k,), len(dst), dtype=dst.dtype, device=dst.device)
        slot = first.scatter_reduce_(0, dst, torch.arange(len(dst), device=dst.device), "amin").index_select(0, dst)
        sums = torch.zeros_like(pull).index_add_(0, slot, pull).index_select(0, slot)
        flat.index_copy_(0, dst, (base.to(wide) + sums).to(x.dtype))  # repeats write one value
    return flat.view(b, -1, c), total.view(b, -1, 1)


def merge_source(merge: Merge, x: Tensor, source: Optional[Tensor] = None) -> Tensor:
    """Track which input tokens each token holds. source: (B, N, N0) 0/1, identity at first."""
    if source is None:
        b, n, _ = x.shape
        source = torch.eye(n, device=x.device, dtype=x.dtype)[None].expand(b, n, n)
    return merge(source, mode="amax")
