"""Matching and merging of one block in two Triton kernel launches (``patch(..., backend=)``).

The eager engine (:mod:`dsm_lite.merging`) builds a merge out of 30 to 50 small PyTorch ops:
normalise, score, max, sort, gather, scatter. On a GPU each costs a launch of 2-3 µs even
replayed from a CUDA graph, which at batch 32 eats most of what merging saves. Here the
same decisions take two launches:

1. ``_match_kernel``, one program per image, makes every decision. Its phases, separated
   by barriers, each a loop over tiles of ``BLOCK`` tokens:

   0. *sides*: each patch token's side, A or B, by the parity of its rank inside its group
      (the whole sequence for ToMe, a window for spatial merging: ToMe's parity rule);
   1. *proposals*: cosine similarity of every A token to every B token of its group
      (normalised rows, ``tl.dot`` in IEEE float32), the row max and its first argmax;
   2. *ranks*: each proposal's rank by (score descending, then position ascending: the
      stable sort of the eager engine), over the image or inside the window; the first
      ``r`` (or the window's quota) are merged, written to ``src``/``dst`` in the eager
      engine's order;
   3. *output order*: each survivor's output row (sequence order, or ToMe's), ``keep``;
   4. *sources per row*: for every output row, the range of the sources folded into it,
      sorted by destination then by merge order (the order the eager ``index_add`` adds).

2. ``_merge_kernel``, one program per (image, ``BLOCK_R`` output rows, ``BLOCK_C``
   channels), writes the merged sequence directly: each output row is its token, moved by
   the size-weighted pulls of its sources, ``x_d + sum_i (s_i / S)(x_i - x_d)`` summed in
   the same order and precision as :func:`dsm_lite.merging.merge_wavg`, and its new size.

Which tokens merge is decided exactly as in the eager engine, ties included: sides, groups
and the stable tie-break are the same rules; only the similarity's rounding can differ (a
different summation order), so only proposals equal to float32 rounding could be ordered
differently. ``tests/test_fused_merge.py`` checks decisions and outputs against the eager
engine with Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Covered: ToMe's global matching (its output order or sequence order), the paper's windows
with a quota per window, joint windows (top r over all windows of an image), pruning by
norm, protected prefix tokens, token sizes (proportional attention). Source tracing uses
the kernel's decisions: :func:`fused_merge` returns the :class:`~dsm_lite.merging.Merge`,
and the (B, N, N0) source map is updated from it by the eager ``merge_source``.

Registered as the custom op ``dsm_lite::fused_merge`` (``torch.library.triton_op``) so that
``torch.compile(fullgraph=True)`` traces it and CUDA graphs capture it: nothing in it reads
a tensor back to the host. Under the interpreter it is a plain custom op with a fake
(shape-only) implementation, since interpreted kernels cannot run on fake tensors.

Shapes: ``B`` images, ``N`` tokens (``P`` prefix tokens first), ``C`` channels of the
tokens, ``Cm`` of the similarity feature, ``r`` tokens removed, ``K = N - r`` kept.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .merging import (Merge, bipartite_soft_matching, merge_wavg, prune_lowest_norm,
                      window_quota_matching, window_soft_matching)

__all__ = ["TritonUnavailableError", "triton_available", "interpreter_on", "check_fused", "require_triton", "prepare",
           "fused_merge", "eager_merge", "KERNEL_DTYPES", "MAX_TOKENS", "GLOBAL", "JOINT", "PAPER", "PRUNE"]

#: activation dtypes the kernels take (float64, the book's CPU numerics, stays eager)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: longest sequence the matching kernel takes: it runs one program per image, whose rank
#: phases compare every pair of tokens (N^2 / 2 comparisons per phase)
MAX_TOKENS = 4096
#: matching modes of the kernel
GLOBAL, JOINT, PAPER, PRUNE = 0, 1, 2, 3

_BLOCK = 64  # tokens per tile of the matching kernel
_BLOCK_R = 16  # output rows per program of the merge kernel


class TritonUnavailableError(RuntimeError):
    """``backend="triton"`` was asked for where its kernels cannot run."""


def interpreter_on() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read when Triton's
    kernels are defined, i.e. when this module first loads them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_KERNELS = None  # (match, merge, interpreted) once Triton has been imported


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from . import triton_kernels as k
        _KERNELS = k
    return _KERNELS


def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of torch) and torch can register its
    kernels as an op (``torch.library.triton_op``, torch 2.6 and later)."""
    if not hasattr(torch.library, "triton_op"):
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


def require_triton() -> None:
    """Raise :class:`TritonUnavailableError` unless :func:`triton_available`."""
    if not triton_available():
        raise TritonUnavailableError(
            "backend='triton' needs Triton, which did not import (it ships with CUDA builds of "
            "torch; `pip install triton`), and torch 2.6 or later; use backend='auto' or 'eager'")


def check_fused(x: Tensor, metric: Optional[Tensor] = None) -> None:
    """Raise a clear error where the Triton backend cannot run on tokens ``x`` (B, N, C).

    Raises:
        TritonUnavailableError: Triton does not import, or ``x`` is on the CPU while the
            interpreter is off.
        TypeError: a dtype the kernels do not take.
        ValueError: more tokens than ``MAX_TOKENS``.
    """
    require_triton()
    if x.device.type == "cpu" and not _kernels().INTERPRETED:
        raise TritonUnavailableError(
            "backend='triton' on CPU tensors needs Triton's interpreter (set TRITON_INTERPRET=1 "
            "before dsm_lite loads its kernels); on a CPU, backend='auto' or 'eager' runs the "
            "eager engine")
    for name, t in (("activations", x), ("similarity feature", metric)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend='triton' takes {', '.join(map(str, KERNEL_DTYPES))} {name}; "
                            f"got {t.dtype} (float64 runs on backend='eager')")
    if x.shape[1] > MAX_TOKENS:
        raise ValueError(f"backend='triton' matches at most {MAX_TOKENS} tokens per image (so r "
                         f"at most {MAX_TOKENS // 2}); got {x.shape[1]}: use backend='eager'")


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _allocate(x: Tensor, r: int, num_prefix: int, anchors: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """The op's outputs, uninitialised (the kernels write every element): merged tokens,
    sizes, src, dst, keep, and the survivors' anchors (JOINT; else empty)."""
    b, n, c = x.shape
    k = n - r
    long = dict(dtype=torch.long, device=x.device)
    kept_anchors = (torch.empty(b, k - num_prefix, **long) if anchors is not None
                    else torch.empty(0, **long))
    return (x.new_empty(b, k, c), torch.empty(b, k, 1, dtype=torch.float32, device=x.device),
            torch.empty(b, r, **long), torch.empty(b, r, **long), torch.empty(b, k, **long),
            kept_anchors)


def _fused_merge_impl(x: Tensor, size: Optional[Tensor], metric: Tensor,
                      window_ids: Optional[Tensor], anchors: Optional[Tensor],
                      window_table: Optional[Tensor], quotas: Optional[Tensor],
                      quota_starts: Optional[Tensor], r: int, num_prefix: int, mode: int,
                      tome_order: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from torch.library import wrap_triton

    kern = _kernels()
    out, size_out, src, dst, keep, kept_anchors = _allocate(x, r, num_prefix, anchors)
    b, n, c = x.shape
    k = n - r
    np_ = -(-n // (2 * _BLOCK)) * 2 * _BLOCK  # whole tiles, also of every second position
    scratch = torch.empty(7, b, np_, dtype=torch.int32, device=x.device)
    best = torch.empty(b, np_, dtype=torch.float32, device=x.device)
    # the CSR of sources per output row; order: source tokens sorted by destination
    starts = torch.empty(b, k, dtype=torch.int32, device=x.device)
    counts = torch.empty(b, k, dtype=torch.int32, device=x.device)
    order = torch.empty(b, r, dtype=torch.int32, device=x.device)
    # a token's group: its window (PAPER), its anchor's window (JOINT, via the table)
    gid = anchors if anchors is not None else window_ids
    gid_stride = 0 if gid is None or gid.dim() == 1 else gid.stride(0)
    gid = gid if gid is not None else scratch  # placeholder pointers where unused
    table = window_table if window_table is not None else scratch
    quo = quotas if quotas is not None else scratch
    qst = quota_starts if quota_starts is not None else scratch
    cm = metric.shape[-1]
    wrap_triton(kern.match_kernel)[(b,)](
        metric, metric.stride(0), metric.stride(1), metric.stride(2),
        gid, gid_stride, table, quo, qst, scratch, best,
        src, dst, keep, starts, counts, order, kept_anchors,
        n, cm, num_prefix, r, b * np_,
        MODE=mode, TOME_ORDER=tome_order, NP=np_, BLOCK=_BLOCK,
        BLOCK_C=_pow2(cm, 16, 64), STEP=2 if mode == GLOBAL else 1)
    has_size = size is not None
    sz = size if has_size else best  # placeholder pointer when there are no sizes yet
    block_c = _pow2(c, 16, 256)
    wrap_triton(kern.merge_kernel)[(b, -(-k // _BLOCK_R), -(-c // block_c))](
        x, x.stride(0), x.stride(1), x.stride(2),
        sz, sz.stride(0) if has_size else 0, sz.stride(1) if has_size else 0,
        keep, starts, counts, order, out, size_out,
        k, r, c,
        HAS_SIZE=has_size, WIDE_SUM=x.dtype in (torch.float16, torch.bfloat16),
        BF16_OUT=x.dtype == torch.bfloat16,
        BLOCK_R=_BLOCK_R, BLOCK_C=block_c)
    return out, size_out, src, dst, keep, kept_anchors


_OP = None


def prepare() -> None:
    """Import the kernels and register the op ``dsm_lite::fused_merge``, if not yet done.

    ``patch`` calls it wherever the kernels may run, so that the first forward pass can be
    traced by ``torch.compile``: registering an op inside a traced function breaks the graph.
    """
    _op()


def _op():
    """``dsm_lite::fused_merge``, registered on first use (see :func:`prepare`)."""
    global _OP
    if _OP is None:
        name = "dsm_lite::fused_merge"
        if _kernels().INTERPRETED:
            # interpreted kernels run on real CPU tensors only: an opaque op whose fake
            # implementation gives the shapes, so torch.compile calls it at run time
            op = torch.library.custom_op(name, _fused_merge_impl, mutates_args=())

            @op.register_fake
            def _(x, size, metric, window_ids, anchors, window_table, quotas, quota_starts, r,
                  num_prefix, mode, tome_order):
                return _allocate(x, r, num_prefix, anchors)
        else:
            op = torch.library.triton_op(name, _fused_merge_impl, mutates_args=())
        _OP = op
    return _OP


def fused_merge(x: Tensor, size: Optional[Tensor], metric: Tensor, r: int, num_prefix: int,
                mode: int = GLOBAL, tome_order: bool = False, window_ids: Optional[Tensor] = None,
                anchors: Optional[Tensor] = None, window_table: Optional[Tensor] = None,
                quotas: Optional[Tensor] = None, quota_starts: Optional[Tensor] = None,
                ) -> Tuple[Tensor, Tensor, Merge, Optional[Tensor]]:
    """Match and merge one block's tokens with the Triton kernels.

    Args:
        x: (B, N, C) tokens, float16, bfloat16 or float32.
        size: (B, N, 1) float32 token sizes, or None (all ones).
        metric: (B, N, Cm) similarity feature (pruning: the feature whose norm ranks tokens).
        r: tokens removed per image, already clamped as the eager engine clamps it
            (``1 <= r <= N - num_prefix``).
        num_prefix: P, leading tokens that never merge.
        mode: ``GLOBAL`` (ToMe's bipartite matching over the sequence), ``JOINT``
            (each token's window is ``window_table[anchors]``: ``anchors`` (B, N - P) the
            raster index of each patch token's anchor patch, ``window_table`` (H * W,) the
            window of each patch; the best r proposals of all windows), ``PAPER`` (windows given by ``window_ids`` (N - P,), the same for
            every image; window w merges ``quotas[w]`` of its best proposals; ``quota_starts``
            (W,) holds the exclusive prefix sums of ``quotas`` and ``r`` their sum) or
            ``PRUNE`` (drop the r tokens of lowest norm).
        tome_order: with GLOBAL, ToMe's output order instead of sequence order.

    Returns:
        ``(x, size, merge, anchors)``: (B, K, C) merged tokens in x's dtype, (B, K, 1)
        float32 sizes, the :class:`~dsm_lite.merging.Merge` of the decisions (src and dst in
        the eager engine's order; None for pruning), K = N - r, and for JOINT the survivors'
        anchors (B, K - P) (``anchors.gather(1, keep[:, P:] - P)``), else None.
    """
    check_fused(x, metric)
    if not 1 <= r <= x.shape[1] - num_prefix:
        raise ValueError(f"fused_merge removes 1 to N - P = {x.shape[1] - num_prefix} tokens; got r={r}")
    out, size_out, src, dst, keep, kept = _op()(x, size, metric, window_ids, anchors, window_table,
                                                quotas, quota_starts, r, num_prefix, mode, tome_order)
    merge = Merge(None, None, keep) if mode == PRUNE else Merge(src, dst, keep)
    return out, size_out, merge, (kept if mode == JOINT else None)


def eager_merge(x: Tensor, size: Optional[Tensor], metric: Tensor, r: int, num_prefix: int,
                mode: int = GLOBAL, tome_order: bool = False, window_ids: Optional[Tensor] = None,
                anchors: Optional[Tensor] = None, window_table: Optional[Tensor] = None,
                quotas: Optional[Tensor] = None, quota_starts: Optional[Tensor] = None,
                ) -> Tuple[Tensor, Tensor, Merge, Optional[Tensor]]:
    """What the eager engine gives for :func:`fused_merge`'s arguments, in its return format:
    the matching function of ``mode`` (:mod:`dsm_lite.merging`), then ``merge_wavg``. For
    comparisons (tests, ``benchmarks/fused_exactness.py``); it reads window counts back to
    the host, which :func:`fused_merge` never does."""
    p, kept = num_prefix, None
    if mode == GLOBAL:
        merge = bipartite_soft_matching(metric, r, p, order="tome" if tome_order else "sequence")
    elif mode == PRUNE:
        merge = prune_lowest_norm(metric, r, p)
    elif mode == PAPER:
        capacity = int(window_ids.bincount().max())
        merge = window_quota_matching(metric, window_ids, len(quotas), capacity, quotas.long(), r, p)
    else:
        capacity = int(window_table.bincount().max())
        merge = window_soft_matching(metric, r, window_table.take(anchors), int(window_table.max()) + 1,
                                     capacity, p)
        kept = anchors.gather(1, merge.keep[:, p:] - p)
    return (*merge_wavg(merge, x, size), merge, kept)
