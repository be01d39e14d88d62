"""The merging engine's pure functions against naive references (tests/reference.py).

Random tests run in float64 so that the engine (batched matmuls) and the reference (python
sums) agree on every comparison of scores; tie tests use metrics whose cosine similarities
are exact in float32 too (entries +-1 over 16 channels: every score is a multiple of 1/16).
"""
from __future__ import annotations

import math
from typing import List, Set

import pytest
import torch

from dsm_lite import merging, schedules, windows
from dsm_lite.merging import (Merge, bipartite_soft_matching, merge_source, merge_wavg,
                              prune_lowest_norm, window_soft_matching)

from reference import (reference_parse_r, reference_prune, reference_tome_merge,
                       reference_window_ids, reference_window_merge)
from reference import single_thread  # noqa: F401  (autouse fixture)


# --------------------------------------------------------------------------- helpers
def source_sets(source: torch.Tensor) -> List[List[Set[int]]]:
    """(B, N, N0) 0/1 -> per image, per token, the set of original tokens it holds."""
    return [[set(torch.nonzero(row).flatten().tolist()) for row in img] for img in source]


def random_inputs(b, n, c=8, cm=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=dtype)
    metric = torch.randn(b, n, cm, generator=g, dtype=dtype)
    size = torch.randint(1, 5, (b, n, 1), generator=g).to(dtype)
    return x, metric, size


def tied_metric(b, n, prototypes=3, seed=0, dtype=torch.float32):
    """Rows drawn from a few +-1 prototypes: many exactly equal scores (exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 2, (prototypes, 16), generator=g).to(dtype) * 2 - 1
    pick = torch.randint(0, prototypes, (b, n), generator=g)
    return protos[pick]


def quantised_metric(b, n, seed=0, dtype=torch.float32):
    """Independent +-1 rows over 16 channels: scores are multiples of 1/16, ties are common."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (b, n, 16), generator=g) * 2 - 1).to(dtype)


def assert_matches_reference(merge: Merge, x, metric, size, ref, n):
    out, out_size = merge_wavg(merge, x, size)
    ref_x, ref_size, ref_src = ref
    assert out.shape == ref_x.shape
    torch.testing.assert_close(out.double(), ref_x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out_size.double(), ref_size, rtol=0, atol=0)
    assert source_sets(merge_source(merge, x)) == ref_src


# --------------------------------------------------------------------------- ToMe
@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("n", [12, 17])
@pytest.mark.parametrize("r", [0, 1, 4, 100])
def test_bipartite_matches_reference_random(p, n, r):
    x, metric, size = random_inputs(3, n, seed=100 * p + n + r)
    merge = bipartite_soft_matching(metric, r, p)
    expected_r = min(r, (n - p) // 2)
    assert merge.r == expected_r
    ref = reference_tome_merge(x, metric, r, p, size)
    assert_matches_reference(merge, x, metric, size, ref, n)


@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("make", [tied_metric, quantised_metric])
@pytest.mark.parametrize("r", [1, 3, 6, 50])
def test_bipartite_matches_reference_with_ties(p, make, r):
    n = 19
    metric = make(4, n, seed=r + 7 * p)
    x, _, size = random_inputs(4, n, seed=r)
    # a merge of float32 metrics applied to float64 features: only the indices matter here
    merge = bipartite_soft_matching(metric, r, p)
    ref = reference_tome_merge(x, metric, r, p, size)
    assert_matches_reference(merge, x, metric, size, ref, n)


def test_bipartite_all_scores_equal():
    """Every score ties: the first A tokens merge, each into the first B token."""
    n, p, r = 10, 1, 3
    metric = torch.ones(1, n, 4)
    merge = bipartite_soft_matching(metric, r, p)
    # A = 0 (protected), 2, 4, 6, 8; B = 1, 3, 5, 7, 9; all A pick B=1
    assert merge.src.tolist() == [[2, 4, 6]]
    assert merge.dst.tolist() == [[1, 1, 1]]
    assert merge.keep.tolist() == [[0, 8, 1, 3, 5, 7, 9]]


def test_bipartite_protected_prefix_never_merges():
    """Even when the prefix tokens are the most similar ones, they neither move nor absorb."""
    b, n = 2, 14
    for p in (1, 2, 3, 5):
        metric = torch.randn(b, n, 8, dtype=torch.float64)
        metric[:, :p] = metric[:, p:p + 1]  # prefix identical to the first patch token
        merge = bipartite_soft_matching(metric, 100, p)
        assert (merge.src >= p).all() and (merge.dst >= p).all()
        assert merge.keep[:, :p].tolist() == [list(range(p))] * b
        _, size = merge_wavg(merge, torch.randn(b, n, 3, dtype=torch.float64))
        assert (size[:, :p] == 1).all()


def test_bipartite_r_clamp_and_identity():
    x, metric, _ = random_inputs(2, 9)
    for r in (0, -3):
        m = bipartite_soft_matching(metric, r, 1)
        assert m.r == 0 and m.src is None
        out, size = merge_wavg(m, x)
        assert torch.equal(out, x) and (size == 1).all()
    assert bipartite_soft_matching(metric, 10**6, 1).r == (9 - 1) // 2
    with pytest.raises(ValueError, match="order"):
        bipartite_soft_matching(metric, 2, 1, order="random")


@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [1, 5, 50])
def test_bipartite_sequence_order(p, r):
    """order='sequence': the same merged tokens as order='tome', survivors in input order."""
    n = 21
    x, metric, size = random_inputs(3, n, seed=p + r)
    tome = bipartite_soft_matching(metric, r, p, order="tome")
    seq = bipartite_soft_matching(metric, r, p, order="sequence")
    assert torch.equal(tome.src, seq.src) and torch.equal(tome.dst, seq.dst)
    assert torch.equal(seq.keep, seq.keep.sort(dim=1).values)
    assert torch.equal(seq.keep, tome.keep.sort(dim=1).values)
    xt, st = merge_wavg(tome, x, size)
    xs, ss = merge_wavg(seq, x, size)
    # the same tokens up to a permutation: tome.keep[i] sits at rank(tome.keep[i]) in seq
    perm = tome.keep.argsort(dim=1).argsort(dim=1)
    torch.testing.assert_close(xs.gather(1, perm[..., None].expand_as(xs)), xt, rtol=0, atol=0)
    torch.testing.assert_close(ss.gather(1, perm[..., None]), st, rtol=0, atol=0)
    ref = reference_tome_merge(x, metric, r, p, size, order="sequence")
    assert_matches_reference(seq, x, metric, size, ref, n)


def test_merge_chain_sources_and_sizes():
    """Several steps in a row: sources partition the input and sizes count them."""
    b, n, p = 2, 31, 1
    x, _, _ = random_inputs(b, n, seed=5)
    size, source = None, None
    ref_size, ref_src = None, None
    ref_x = x
    for step in range(4):
        metric = torch.randn(b, x.shape[1], 6, dtype=torch.float64)
        merge = bipartite_soft_matching(metric, 3, p)
        source = merge_source(merge, x, source)
        ref_x, ref_size, ref_src = reference_tome_merge(ref_x, metric, 3, p, ref_size, ref_src)
        x, size = merge_wavg(merge, x, size)
        torch.testing.assert_close(x, ref_x, rtol=1e-9, atol=1e-9)
        assert torch.equal(size, ref_size)
        assert source_sets(source) == ref_src
        assert torch.equal(source.sum(1), torch.ones(b, n, dtype=source.dtype))  # a partition
        assert torch.equal(source.sum(-1, keepdim=True), size)


def test_merge_mean_mode_includes_destination():
    x = torch.tensor([[[0.0], [10.0], [2.0], [20.0]]])
    merge = Merge(torch.tensor([[2]]), torch.tensor([[1]]), torch.tensor([[0, 1, 3]]))
    assert merge(x).flatten().tolist() == [0.0, 6.0, 20.0]
    out, size = merge_wavg(merge, x, torch.tensor([[[1.0], [3.0], [1.0], [1.0]]]))
    assert out.flatten().tolist() == [0.0, 8.0, 20.0] and size.flatten().tolist() == [1.0, 4.0, 1.0]


# --------------------------------------------------------------------------- windows (matching)
def random_layout(b, m, nw, seed, empty=True):
    """Window ids (B, M): random windows, some of them empty or holding a single token."""
    g = torch.Generator().manual_seed(seed)
    used = nw - 2 if (empty and nw > 3) else nw
    wid = torch.randint(0, used, (b, m), generator=g)
    if nw > 3 and empty:
        wid[:, 0] = nw - 2  # a window with a single token (the last one stays empty)
    return wid


def capacity(wid, nw):
    return int(torch.stack([(wid == w).sum(1) for w in range(nw)]).max())


@pytest.mark.parametrize("p", [0, 1, 2, 3])
@pytest.mark.parametrize("nw", [1, 3, 6])
@pytest.mark.parametrize("r", [0, 2, 5, 100])
def test_window_matches_reference_random(p, nw, r):
    b, m = 3, 23
    n = p + m
    x, metric, size = random_inputs(b, n, seed=11 * p + nw + r)
    wid = random_layout(b, m, nw, seed=r + nw)
    cap = capacity(wid, nw) + 1  # a loose capacity must not matter
    merge = window_soft_matching(metric, r, wid, nw, cap, p)
    assert merge.r == max(min(r, (m - nw) // 2), 0)
    ref = reference_window_merge(x, metric, r, wid, nw, p, size)
    assert_matches_reference(merge, x, metric, size, ref, n)
    assert torch.equal(merge.keep, merge.keep.sort(dim=1).values)


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("make", [tied_metric, quantised_metric])
@pytest.mark.parametrize("r", [3, 8, 100])
def test_window_matches_reference_with_ties(p, make, r):
    b, m, nw = 4, 30, 5
    n = p + m
    metric = make(b, n, seed=r + p)
    x, _, size = random_inputs(b, n, seed=r)
    wid = random_layout(b, m, nw, seed=r * 3 + p)
    merge = window_soft_matching(metric, r, wid, nw, capacity(wid, nw), p)
    ref = reference_window_merge(x, metric, r, wid, nw, p, size)
    assert_matches_reference(merge, x, metric, size, ref, n)


@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_window_single_window_is_tome(p):
    """One window holding every patch token gives ToMe's merge (in sequence order)."""
    b, m = 3, 24
    n = p + m
    for seed, make in enumerate([None, tied_metric]):
        metric = random_inputs(b, n, seed=seed)[1] if make is None else make(b, n, seed=seed)
        wid = torch.zeros(b, m, dtype=torch.long)
        r = (m - 1) // 2  # the window clamp; ToMe's clamp is at least this
        win = window_soft_matching(metric, r, wid, 1, m, p)
        tome = bipartite_soft_matching(metric, r, p, order="sequence")
        assert win.r == tome.r == r
        assert torch.equal(win.src, tome.src) and torch.equal(win.dst, tome.dst)
        assert torch.equal(win.keep, tome.keep)


def test_window_padding_and_singletons_never_merge():
    """Padding slots (owner -1) never merge; a window with one token neither gives nor takes."""
    b, p = 2, 1
    # window 0: 1 token, window 1: 5 tokens, window 2: 2 tokens, window 3: empty; capacity 9
    wid = torch.tensor([[0, 1, 1, 1, 1, 1, 2, 2]] * b)
    m = wid.shape[1]
    for seed in range(20):
        metric = torch.randn(b, p + m, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        # make the lone token the most similar to everything: it still must not merge
        metric[:, p] = metric[:, p + 1:].mean(1)
        merge = window_soft_matching(metric, 100, wid, 4, 9, p)
        assert merge.r == (m - 4) // 2 == 2
        assert ((merge.src >= p) & (merge.src < p + m)).all()
        assert ((merge.dst >= p) & (merge.dst < p + m)).all()
        assert not (merge.src == p).any() and not (merge.dst == p).any()
        assert torch.equal(wid.gather(1, merge.src - p), wid.gather(1, merge.dst - p))


@pytest.mark.parametrize("p", [0, 1, 2, 4])
def test_window_clamp_always_satisfiable_fuzz(p):
    """Random window layouts at the largest r: every merge pairs two tokens of one window."""
    g = torch.Generator().manual_seed(p)
    for trial in range(60):
        b = int(torch.randint(1, 4, (1,), generator=g))
        m = int(torch.randint(2, 40, (1,), generator=g))
        nw = int(torch.randint(1, 12, (1,), generator=g))
        wid = torch.randint(0, nw, (b, m), generator=g)
        if trial % 3 == 0:  # skewed: most tokens in one window
            wid = torch.where(torch.rand(b, m, generator=g) < 0.7, torch.zeros_like(wid), wid)
        cap = capacity(wid, nw)
        metric = quantised_metric(b, p + m, seed=trial) if trial % 2 else torch.randn(b, p + m, 4, generator=g)
        merge = window_soft_matching(metric, 10**6, wid, nw, cap, p)
        want = max((m - nw) // 2, 0)
        assert merge.r == want
        if want == 0:
            continue
        assert ((merge.src >= p) & (merge.dst >= p)).all()
        assert torch.equal(wid.gather(1, merge.src - p), wid.gather(1, merge.dst - p))
        assert (merge.src != merge.dst).all()
        # each source merges once and no source is also a destination
        for i in range(b):
            s, d = set(merge.src[i].tolist()), set(merge.dst[i].tolist())
            assert len(s) == merge.r and not (s & d)
        out, size = merge_wavg(merge, torch.randn(b, p + m, 3), None)
        assert out.shape[1] == p + m - want and size.sum().item() == b * (p + m)


def test_window_from_grid_layout_matches_reference():
    """Windows of a real (padded) patch grid: 10 x 13 patches in 4 x 4 windows."""
    grid, w, p, b = (10, 13), 4, 1, 2
    anchors = torch.arange(130).expand(b, -1)
    wid = windows.window_ids(anchors, grid, w)
    nh, nw_ = windows.num_windows(grid, w)
    x, metric, size = random_inputs(b, p + 130, seed=3)
    merge = window_soft_matching(metric, 40, wid, nh * nw_, w * w, p)
    ref = reference_window_merge(x, metric, 40, wid, nh * nw_, p, size)
    assert_matches_reference(merge, x, metric, size, ref, p + 130)


# --------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("p", [0, 1, 3])
@pytest.mark.parametrize("r", [0, 1, 5, 100])
def test_prune_lowest_norm(p, r):
    b, n = 3, 15
    g = torch.Generator().manual_seed(r + p)
    metric = torch.randn(b, n, 4, generator=g, dtype=torch.float64)
    metric[:, :p] *= 1e-3  # the prefix has the lowest norms and must still survive
    metric[1, p + 2] = metric[1, p + 5]  # a tie
    merge = prune_lowest_norm(metric, r, p)
    assert merge.src is None and merge.dst is None
    assert merge.keep.tolist() == reference_prune(metric, r, p)
    assert merge.keep.shape[1] == n - min(r, n - p - 1)
    assert (merge.keep[:, :p] == torch.arange(p)).all()
    x = torch.randn(b, n, 2)
    size = torch.randint(1, 4, (b, n, 1)).float()
    out, out_size = merge_wavg(merge, x, size)
    assert torch.equal(out, x.gather(1, merge.keep[..., None].expand(-1, -1, 2)))
    assert torch.equal(out_size, size.gather(1, merge.keep[..., None]))


def test_max_reduction():
    assert merging.max_reduction(197, 1) == 98
    assert merging.max_reduction(198, 2) == 98
    assert merging.max_reduction(3, 5) == 0


# --------------------------------------------------------------------------- windows (grid)
@pytest.mark.parametrize("h,w,win", [(14, 14, 7), (14, 14, 4), (7, 7, 3), (24, 24, 7), (5, 9, 4), (3, 2, 5)])
def test_window_partition_reverse_round_trip(h, w, win):
    b, c = 2, 3
    x = torch.randn(b, h, w, c)
    parts = windows.window_partition(x, win)
    nh, nw = -(-h // win), -(-w // win)
    assert parts.shape == (b * nh * nw, win, win, c)
    assert torch.equal(windows.window_reverse(parts, (h, w)), x)
    padded = torch.zeros(b, nh * win, nw * win, c)
    padded[:, :h, :w] = x
    for i in range(b):
        for wy in range(nh):
            for wx in range(nw):
                k = (i * nh + wy) * nw + wx
                assert torch.equal(parts[k], padded[i, wy * win:(wy + 1) * win, wx * win:(wx + 1) * win])
    assert windows.num_windows((h, w), win) == (nh, nw)


@pytest.mark.parametrize("grid,win", [((14, 14), 7), ((14, 14), 5), ((24, 24), 7), ((7, 7), 3), ((6, 11), 4), ((9, 4), 9)])
def test_window_ids_naive(grid, win):
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(n + win)
    anchors = torch.stack([torch.randperm(n, generator=g) for _ in range(3)])
    assert windows.window_ids(anchors, grid, win).tolist() == reference_window_ids(anchors, grid, win)
    ids = windows.window_ids(torch.arange(n)[None], grid, win)
    assert ids.max().item() + 1 <= math.prod(windows.num_windows(grid, win))


# --------------------------------------------------------------------------- parse_r
@pytest.mark.parametrize("depth", [1, 4, 12])
@pytest.mark.parametrize("r", [0, 1, 8, 13, 16])
def test_parse_r_int(depth, r):
    assert schedules.parse_r(depth, r) == [r] * depth
    if depth > 1:
        assert schedules.parse_r(depth, r) == reference_parse_r(depth, r)


@pytest.mark.parametrize("r", [[], [3], [1, 2, 3], [0, 5, 0, 2]])
def test_parse_r_list_padded(r):
    assert schedules.parse_r(6, r) == reference_parse_r(6, list(r))
    assert schedules.parse_r(6, r) == list(r) + [0] * (6 - len(r))


@pytest.mark.parametrize("depth", [4, 12, 24])
@pytest.mark.parametrize("r,inflect", [(8, -1.0), (8, -0.5), (13, 0.0), (13, 0.5), (16, 1.0), (7, 0.3), (5, -0.7)])
def test_parse_r_inflection_ramp(depth, r, inflect):
    got = schedules.parse_r(depth, (r, inflect))
    assert got == reference_parse_r(depth, (r, inflect))
    assert len(got) == depth and all(v >= 0 for v in got)


@pytest.mark.parametrize("r", [(8, -1), (13, 0), (8, 1)])
def test_parse_r_integer_inflection_as_tome(r):
    """ToMe's parse_r takes every tuple as (r, inflection); (r, -1) is its 'decreasing' schedule."""
    assert schedules.parse_r(12, r) == reference_parse_r(12, r)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), ([2, -1], ValueError), ([1] * 13, ValueError),
                                     ((-4, 0.5), ValueError), ("8", TypeError), (8.0, TypeError),
                                     (True, TypeError), (None, TypeError)])
def test_parse_r_bad_values(bad, exc):
    with pytest.raises(exc, match=r"\br\b|blocks"):
        schedules.parse_r(12, bad)



def test_merge_wavg_backward_is_exact():
    """The merge writes into views in place; its gradients must still be right: gradcheck
    (float64, analytic against numerical) for features and sizes, on a ToMe merge and on one
    whose destination takes two sources."""
    x, metric, size = random_inputs(2, 9, seed=7)
    two_into_one = Merge(torch.tensor([[2, 4], [6, 8]]), torch.tensor([[1, 1], [5, 5]]),
                         torch.tensor([[0, 1, 3, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 7]]))
    for merge in (bipartite_soft_matching(metric, 4, 1), two_into_one):
        assert torch.autograd.gradcheck(lambda x, s: merge_wavg(merge, x, s),
                                        (x.clone().requires_grad_(), size.clone().requires_grad_()))
