"""The two Triton kernels of :mod:`dsm_lite.fused_merge` (importing this imports Triton).

``match_kernel`` decides, one program per image; ``merge_kernel`` moves the features.
:mod:`dsm_lite.fused_merge` says what each phase does and why; the comments here say how.
Scratch planes of ``match_kernel`` (int32, ``PLANE = B * NP`` apart, image ``b`` at
``b * NP``): 0 side (0 A, 1 B, -1 never merges), 1 best B of each A (sequence position),
2 rank of each proposal, 3 merge slot (-1: not merged), 4 output row of each survivor (-1:
merged away), 5 output row of each merged token's destination (-1: not merged).
"""
from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - every Triton with an interpreter has it
    InterpretedFunction = ()

__all__ = ["match_kernel", "merge_kernel", "INTERPRETED"]

_SIDE, _BEST_B, _RANK, _SLOT, _ROW, _DST_ROW = 0, 1, 2, 3, 4, 5


@triton.jit
def _group(gid_ptr, gid_stride, table_ptr, b, i, N, P, MODE: tl.constexpr):
    """Group (window) of tokens ``i``: 0 for every token in GLOBAL and PRUNE modes, -1 for
    prefix and padding. JOINT: ``gid_ptr`` holds each token's anchor patch and
    ``table_ptr`` the window of each patch; PAPER: ``gid_ptr`` the window of each position."""
    valid = (i >= P) & (i < N)
    if MODE == 1:
        anchor = tl.load(gid_ptr + b * gid_stride + (i - P), mask=valid, other=0)
        g = tl.load(table_ptr + anchor, mask=valid, other=-1).to(tl.int32)
    elif MODE == 2:
        g = tl.load(gid_ptr + b * gid_stride + (i - P), mask=valid, other=-1).to(tl.int32)
    else:
        g = tl.zeros(i.shape, tl.int32)
    return tl.where(valid, g, -1)


@triton.jit
def _norm(metric_ptr, s_mb, s_mn, s_mc, b, i, N, CM, BLOCK_C: tl.constexpr):
    """Euclidean norm of rows ``i`` of the feature, float32, correctly rounded sqrt."""
    offc = tl.arange(0, BLOCK_C)
    ssq = tl.zeros(i.shape, tl.float32)
    for c0 in range(0, CM, BLOCK_C):
        c = c0 + offc
        m = (i[:, None] < N) & (c[None, :] < CM)
        v = tl.load(metric_ptr + b * s_mb + i[:, None] * s_mn + c[None, :] * s_mc, mask=m,
                    other=0.0).to(tl.float32)
        ssq += tl.sum(v * v, axis=1)
    return tl.sqrt_rn(ssq)


@triton.jit
def _unit_rows(metric_ptr, s_mb, s_mn, s_mc, b, i, c, N, CM, norm):
    """Rows ``i``, channels ``c`` of the feature divided by their clamped norm, as the eager
    ``metric / metric.norm(dim=-1).clamp_min(1e-12)``."""
    m = (i[:, None] < N) & (c[None, :] < CM)
    v = tl.load(metric_ptr + b * s_mb + i[:, None] * s_mn + c[None, :] * s_mc, mask=m,
                other=0.0).to(tl.float32)
    return tl.div_rn(v, tl.maximum(norm, 1e-12)[:, None])


@triton.jit
def _sides(gid_ptr, gid_stride, table_ptr, side_p, slot_p, b, N, P,
           MODE: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 0, sides. Inside a group, rank k (in sequence order) goes to B when k + P is odd;
    with one group (GLOBAL) that is the token's own parity. PRUNE: every patch token competes."""
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, NP, BLOCK):
        i = i0 + offs
        g = _group(gid_ptr, gid_stride, table_ptr, b, i, N, P, MODE)
        if MODE == 1 or MODE == 2:
            rank = tl.zeros([BLOCK], tl.int32)
            for j0 in range(0, i0 + BLOCK, BLOCK):
                j = j0 + offs
                gj = _group(gid_ptr, gid_stride, table_ptr, b, j, N, P, MODE)
                same = (gj[None, :] == g[:, None]) & (j[None, :] < i[:, None])
                rank += tl.sum(same.to(tl.int32), axis=1)
            side = (rank + P) % 2
        elif MODE == 0:
            side = i % 2
        else:
            side = tl.zeros([BLOCK], tl.int32)
        tl.store(side_p + i, tl.where(g >= 0, side, -1))
        tl.store(slot_p + i, tl.full([BLOCK], -1, tl.int32))  # phase 2 writes the candidates'


@triton.jit
def _proposals(metric_ptr, s_mb, s_mn, s_mc, gid_ptr, gid_stride, table_ptr, side_p, best_p, bestb_p,
               b, N, CM, P, MODE: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
               BLOCK_C: tl.constexpr, STEP: tl.constexpr):
    """Phase 1, proposals: each A token's best B of its group (the first on ties) and its cosine
    similarity, or PRUNE's -norm."""
    offs = tl.arange(0, BLOCK)
    offc = tl.arange(0, BLOCK_C)
    for i0 in range(0, NP // STEP, BLOCK):
        i = (i0 + offs) * STEP
        side_i = tl.load(side_p + i)
        norm_i = _norm(metric_ptr, s_mb, s_mn, s_mc, b, i, N, CM, BLOCK_C)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        bidx = tl.zeros([BLOCK], tl.int32)
        if MODE == 3:
            best = -norm_i
        else:
            g = _group(gid_ptr, gid_stride, table_ptr, b, i, N, P, MODE)
            for j0 in range(0, NP // STEP, BLOCK):
                j = (j0 + offs) * STEP + (STEP - 1)
                side_j = tl.load(side_p + j)
                gj = _group(gid_ptr, gid_stride, table_ptr, b, j, N, P, MODE)
                norm_j = _norm(metric_ptr, s_mb, s_mn, s_mc, b, j, N, CM, BLOCK_C)
                acc = tl.zeros([BLOCK, BLOCK], tl.float32)
                for c0 in range(0, CM, BLOCK_C):
                    c = c0 + offc
                    a = _unit_rows(metric_ptr, s_mb, s_mn, s_mc, b, i, c, N, CM, norm_i)
                    bb = _unit_rows(metric_ptr, s_mb, s_mn, s_mc, b, j, c, N, CM, norm_j)
                    acc += tl.dot(a, tl.trans(bb), input_precision="ieee")
                ok = (side_i[:, None] == 0) & (side_j[None, :] == 1) & (g[:, None] == gj[None, :])
                s = tl.where(ok, acc, float("-inf"))
                m = tl.max(s, axis=1)
                arg = tl.min(tl.where(s == m[:, None], j[None, :], 2 * NP), axis=1)
                better = m > best  # strictly: an earlier tile keeps a tie
                bidx = tl.where(better, arg, bidx)
                best = tl.where(better, m, best)
        tl.store(best_p + i, best)
        tl.store(bestb_p + i, bidx)


@triton.jit
def _ranks(gid_ptr, gid_stride, table_ptr, quota_ptr, qstart_ptr, side_p, best_p, bestb_p, rank_p, slot_p,
           src_ptr, dst_ptr, b, N, P, R, MODE: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
           STEP: tl.constexpr):
    """Phase 2, ranks: each proposal's rank by (score desc, position asc), over the image or
    (PAPER) inside its window; the first R (PAPER: the window's quota) merge, written to
    ``src``/``dst`` at their merge slot."""
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, NP // STEP, BLOCK):
        i = (i0 + offs) * STEP
        cand_i = tl.load(side_p + i) == 0
        v_i = tl.load(best_p + i)
        g = _group(gid_ptr, gid_stride, table_ptr, b, i, N, P, MODE)
        rank = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, NP // STEP, BLOCK):
            j = (j0 + offs) * STEP
            cand_j = tl.load(side_p + j) == 0
            v_j = tl.load(best_p + j)
            gj = _group(gid_ptr, gid_stride, table_ptr, b, j, N, P, MODE)
            if MODE == 1:  # joint windows tie by (window, position): the eager slot order
                first = (gj[None, :] < g[:, None]) | ((gj[None, :] == g[:, None]) & (j[None, :] < i[:, None]))
            else:
                first = j[None, :] < i[:, None]
            ahead = (v_j[None, :] > v_i[:, None]) | ((v_j[None, :] == v_i[:, None]) & first)
            ahead = ahead & cand_j[None, :]
            if MODE == 2:
                ahead = ahead & (gj[None, :] == g[:, None])
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        if MODE == 2:
            limit = tl.load(quota_ptr + g, mask=cand_i, other=0).to(tl.int32)
            slot = tl.load(qstart_ptr + g, mask=cand_i, other=0).to(tl.int32) + rank
        else:
            limit = tl.zeros([BLOCK], tl.int32) + R
            slot = rank
        chosen = cand_i & (rank < limit)
        tl.store(rank_p + i, rank)
        tl.store(slot_p + i, tl.where(chosen, slot, -1))
        bidx = tl.load(bestb_p + i)
        tl.store(src_ptr + b * R + slot, i.to(tl.int64), mask=chosen)
        if MODE != 3:
            tl.store(dst_ptr + b * R + slot, bidx.to(tl.int64), mask=chosen)


@triton.jit
def _output_rows(gid_ptr, gid_stride, side_p, slot_p, rank_p, row_p, keep_ptr, anchors_out_ptr, b, N, P, R,
                 MODE: tl.constexpr, TOME_ORDER: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 3, output order: the output row of every survivor, ``keep``, and (JOINT) the
    survivors' anchors."""
    offs = tl.arange(0, BLOCK)
    K = N - R
    carry = tl.zeros([], tl.int32)
    for i0 in range(0, NP, BLOCK):
        i = i0 + offs
        chosen = tl.load(slot_p + i) >= 0
        kept = (i < N) & (chosen == 0)
        if TOME_ORDER:
            # prefix tokens, then the unmerged A tokens (sorted when there is a prefix, by
            # rank when there is none), then every B token: dsm_lite.merging._tome_order
            side = tl.load(side_p + i)
            unmerged_a = (side == 0) & (chosen == 0)
            before = tl.cumsum(unmerged_a.to(tl.int32), axis=0) - unmerged_a.to(tl.int32) + carry
            carry += tl.sum(unmerged_a.to(tl.int32), axis=0)
            rank = tl.load(rank_p + i)
            num_a = (N + 1) // 2
            unmerged = num_a - (P + 1) // 2 - R
            if P > 0:
                row = tl.where(side == 0, P + before, P + unmerged + (i // 2 - P // 2))
            else:
                row = tl.where(side == 0, rank - R, num_a - R + i // 2)
            row = tl.where(i < P, i, row)
        else:
            c = chosen.to(tl.int32)
            before = tl.cumsum(c, axis=0) - c + carry
            carry += tl.sum(c, axis=0)
            row = i - before
        tl.store(row_p + i, tl.where(kept, row, -1))
        tl.store(keep_ptr + b * K + row, i.to(tl.int64), mask=kept)
        if MODE == 1:  # the survivors' anchors, for the next local block
            patch = kept & (i >= P)
            anchor = tl.load(gid_ptr + b * gid_stride + (i - P), mask=patch, other=0)
            tl.store(anchors_out_ptr + b * (K - P) + (row - P), anchor, mask=patch)


@triton.jit
def _destination_rows(slot_p, bestb_p, row_p, drow_p, MODE: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 4a: the output row of each merged token's destination (-1: not merged)."""
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, NP, BLOCK):
        i = i0 + offs
        chosen = tl.load(slot_p + i) >= 0
        if MODE == 3:
            chosen = chosen & (i < 0)  # pruning folds nothing into the survivors
        bidx = tl.load(bestb_p + i, mask=chosen, other=0)
        drow = tl.load(row_p + bidx, mask=chosen, other=-1)
        tl.store(drow_p + i, tl.where(chosen, drow, -1))


@triton.jit
def _sources_per_row(row_p, drow_p, slot_p, start_ptr, count_ptr, order_ptr, b, N, R, NP: tl.constexpr,
                     BLOCK: tl.constexpr, STEP: tl.constexpr):
    """Phase 4b: per output row, the range of its sources in ``order``, which lists the
    sources by (destination row, merge slot): the order the eager ``index_add_`` adds them."""
    offs = tl.arange(0, BLOCK)
    K = N - R
    for i0 in range(0, NP, BLOCK):
        i = i0 + offs
        row_i = tl.load(row_p + i)
        drow_i = tl.load(drow_p + i)
        slot_i = tl.load(slot_p + i)
        start = tl.zeros([BLOCK], tl.int32)
        count = tl.zeros([BLOCK], tl.int32)
        place = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, NP // STEP, BLOCK):  # the moved tokens are A tokens
            j = (j0 + offs) * STEP
            drow_j = tl.load(drow_p + j)
            slot_j = tl.load(slot_p + j)
            moved_j = drow_j[None, :] >= 0
            start += tl.sum((moved_j & (drow_j[None, :] < row_i[:, None])).to(tl.int32), axis=1)
            count += tl.sum((moved_j & (drow_j[None, :] == row_i[:, None])).to(tl.int32), axis=1)
            ahead = (drow_j[None, :] < drow_i[:, None]) | (
                (drow_j[None, :] == drow_i[:, None]) & (slot_j[None, :] < slot_i[:, None]))
            place += tl.sum((moved_j & ahead).to(tl.int32), axis=1)
        kept = row_i >= 0
        tl.store(start_ptr + b * K + row_i, start, mask=kept)
        tl.store(count_ptr + b * K + row_i, count, mask=kept)
        tl.store(order_ptr + b * R + place, i, mask=drow_i >= 0)


@triton.jit
def match_kernel(metric_ptr, s_mb, s_mn, s_mc, gid_ptr, gid_stride, table_ptr, quota_ptr,
                 qstart_ptr, scratch_ptr, best_ptr, src_ptr, dst_ptr, keep_ptr, start_ptr,
                 count_ptr, order_ptr, anchors_out_ptr, N, CM, P, R, PLANE,
                 MODE: tl.constexpr, TOME_ORDER: tl.constexpr, NP: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, STEP: tl.constexpr):
    """Every merge decision of image ``program_id(0)``, in phases separated by barriers (each
    phase reads what the threads of the previous one wrote to the scratch planes).

    STEP 2 (ToMe's global matching): A tokens sit at even positions and B tokens at odd
    ones, so the proposal and rank loops visit only those (a quarter of the pairs); STEP 1
    (windows, pruning): sides depend on the window, every position is visited.
    """
    b = tl.program_id(0)
    base = scratch_ptr + b * NP
    side_p, bestb_p, rank_p = base, base + PLANE, base + 2 * PLANE
    slot_p, row_p, drow_p = base + 3 * PLANE, base + 4 * PLANE, base + 5 * PLANE
    best_p = best_ptr + b * NP
    _sides(gid_ptr, gid_stride, table_ptr, side_p, slot_p, b, N, P, MODE, NP, BLOCK)
    tl.debug_barrier()
    _proposals(metric_ptr, s_mb, s_mn, s_mc, gid_ptr, gid_stride, table_ptr, side_p, best_p, bestb_p,
               b, N, CM, P, MODE, NP, BLOCK, BLOCK_C, STEP)
    tl.debug_barrier()
    _ranks(gid_ptr, gid_stride, table_ptr, quota_ptr, qstart_ptr, side_p, best_p, bestb_p, rank_p, slot_p,
           src_ptr, dst_ptr, b, N, P, R, MODE, NP, BLOCK, STEP)
    tl.debug_barrier()
    _output_rows(gid_ptr, gid_stride, side_p, slot_p, rank_p, row_p, keep_ptr, anchors_out_ptr, b, N, P, R,
                 MODE, TOME_ORDER, NP, BLOCK)
    tl.debug_barrier()
    _destination_rows(slot_p, bestb_p, row_p, drow_p, MODE, NP, BLOCK)
    tl.debug_barrier()
    _sources_per_row(row_p, drow_p, slot_p, start_ptr, count_ptr, order_ptr, b, N, R, NP, BLOCK, STEP)


@triton.jit
def _to_bf16(v):
    """float32 -> bfloat16, rounded to nearest even on the bits (Triton's interpreter
    truncates a plain ``.to(tl.bfloat16)``; this is what the GPU and torch do, everywhere).
    Finite values only: the merge of finite tokens stays finite."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _kth_source(order_ptr, size_ptr, s_sb, s_sn, b, R, start, count, live, k, HAS_SIZE: tl.constexpr):
    """The k-th source of each output row: (has one, its token, its size; 0 where none)."""
    m = live & (k < count)
    src = tl.load(order_ptr + b * R + start + k, mask=m, other=0)
    if HAS_SIZE:
        s = tl.load(size_ptr + b * s_sb + src * s_sn, mask=m, other=0.0)
    else:
        s = tl.where(m, 1.0, 0.0)
    return m, src, s


@triton.jit
def merge_kernel(x_ptr, s_xb, s_xn, s_xc, size_ptr, s_sb, s_sn, keep_ptr, start_ptr, count_ptr,
                 order_ptr, out_ptr, size_out_ptr, K, R, C,
                 HAS_SIZE: tl.constexpr, WIDE_SUM: tl.constexpr, BF16_OUT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = rows < K
    cmask = chans < C
    tok = tl.load(keep_ptr + b * K + rows, mask=live, other=0)
    start = tl.load(start_ptr + b * K + rows, mask=live, other=0)
    count = tl.load(count_ptr + b * K + rows, mask=live, other=0)
    if HAS_SIZE:
        total = tl.load(size_ptr + b * s_sb + tok * s_sn, mask=live, other=1.0)
    else:
        total = tl.full([BLOCK_R], 1.0, tl.float32)
    most = tl.max(count, axis=0)
    for k in range(0, most):  # the destination's new size first: every share divides by it
        m, src, s = _kth_source(order_ptr, size_ptr, s_sb, s_sn, b, R, start, count, live, k, HAS_SIZE)
        total += s
    mask2 = live[:, None] & cmask[None, :]
    x_d = tl.load(x_ptr + b * s_xb + tok[:, None] * s_xn + chans[None, :] * s_xc, mask=mask2,
                  other=0.0).to(tl.float32)
    if WIDE_SUM:  # half precision: pulls summed in float32, the destination rounded once
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    else:  # float32: pulls added one by one into the destination, as index_add_ does
        acc = x_d
    for k in range(0, most):
        m, src, s = _kth_source(order_ptr, size_ptr, s_sb, s_sn, b, R, start, count, live, k, HAS_SIZE)
        share = tl.div_rn(s, total)
        x_i = tl.load(x_ptr + b * s_xb + src[:, None] * s_xn + chans[None, :] * s_xc,
                      mask=m[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        pull = (x_i - x_d) * share[:, None]
        acc += tl.where(m[:, None], pull, 0.0)
    if WIDE_SUM:
        acc = x_d + acc
    if BF16_OUT:
        res = _to_bf16(acc)
    else:
        res = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * K * C + rows[:, None] * C + chans[None, :], res, mask=mask2)
    if tl.program_id(2) == 0:
        tl.store(size_out_ptr + b * K + rows, total, mask=live)


INTERPRETED = isinstance(match_kernel, InterpretedFunction)
