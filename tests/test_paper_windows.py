"""DSM's windows as the paper specifies them (``windows="paper"``, the default of spatial
merging and DSM): the square layout, the per-window matching against a naive reference, the
schedule against a naive rule, Table 2's MACs, and whole forwards against a hand-written one.

The joint reading (``windows="joint"``) is tested in test_dsm.py and test_merging.py.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import dsm_lite
from dsm_lite import count_macs, patch, schedule
from dsm_lite.merging import bipartite_soft_matching, merge_source, merge_wavg, window_quota_matching
from dsm_lite.schedules import ModelShape, plan
from dsm_lite.windows import square_layout, square_side, square_window_ids, window_quotas

from reference import (load_photos, record_blocks, reference_quota_window_merge,
                       reference_square_window_ids, reference_vit_forward, small_vit)
from reference import single_thread  # noqa: F401  (autouse fixture)
from test_merging import assert_matches_reference, quantised_metric, random_inputs, tied_metric

#: Table 2 of the paper: DSM on ViT-B/16 (224 px), GFLOPs as torchprofile counts them (MACs)
TABLE2 = {4: 16.10, 8: 14.46, 12: 13.27, 16: 11.96, 20: 10.16}


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("m", [0, 1, 2, 5, 16, 49, 150, 173, 196])
@pytest.mark.parametrize("w", [1, 2, 3, 7, 9, 12, 14, 20])
def test_square_layout_matches_naive(m, w):
    ids = square_window_ids(m, w)
    ref = reference_square_window_ids(m, w)
    assert ids.tolist() == ref and ids.dtype == torch.long
    side = square_side(m)
    assert side == math.ceil(math.sqrt(m))
    layout = square_layout(m, w)
    assert layout.side == side and layout.per_side == -(-side // w)
    assert layout.num_windows == layout.per_side ** 2 and layout.capacity == w * w
    counts = Counter(ref)
    assert list(layout.counts) == [counts.get(k, 0) for k in range(layout.num_windows)]
    assert sum(layout.counts) == m and max(layout.counts, default=0) <= w * w


def test_square_layout_examples_and_errors():
    # 173 tokens on a 14 x 14 square (12 full rows and 5 tokens), 12 x 12 windows
    assert square_layout(173, 12).counts == (144, 24, 5, 0)
    assert window_quotas((144, 24, 5, 0), 2) == (2, 2, 2, 0)
    assert window_quotas((144, 24, 5, 1, 0), 4) == (4, 4, 2, 0, 0)
    assert square_layout(196, 7).counts == (49,) * 4
    with pytest.raises(ValueError, match="window"):
        square_window_ids(10, 0)
    with pytest.raises(ValueError, match="quota"):
        window_quotas((4,), -1)
    with pytest.raises(ValueError, match="num_tokens"):
        square_side(-1)


# --------------------------------------------------------------------------- matching
def expected_r(wid, num_windows, quota):
    counts = Counter(wid.tolist())
    quotas = [quota] * num_windows if isinstance(quota, int) else quota.tolist()
    return sum(min(q, counts.get(k, 0) // 2) for k, q in enumerate(quotas))


def check_same_window(merge, wid, p):
    assert torch.equal(wid[merge.src - p], wid[merge.dst - p])
    assert (merge.src >= p).all() and (merge.dst >= p).all()


@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("m,w", [(23, 2), (30, 4), (49, 7), (61, 5), (40, 9)])
@pytest.mark.parametrize("quota", [0, 1, 3, 100])
def test_quota_matching_matches_reference_random(p, m, w, quota):
    n = p + m
    x, metric, size = random_inputs(3, n, seed=7 * p + m + quota)
    layout = square_layout(m, w)
    wid = square_window_ids(m, w)
    r = expected_r(wid, layout.num_windows, quota)
    assert r == sum(window_quotas(layout.counts, quota))
    merge = window_quota_matching(metric, wid, layout.num_windows, w * w, quota, r, p)
    assert merge.r == r
    ref = reference_quota_window_merge(x, metric, wid.tolist(), quota, p, size)
    assert_matches_reference(merge, x, metric, size, ref, n)
    if r:
        assert torch.equal(merge.keep, merge.keep.sort(dim=1).values)  # sequence order
        check_same_window(merge, wid, p)
        # exactly each window's quota, in every image
        per_window = torch.stack([torch.bincount(wid[s - p], minlength=layout.num_windows) for s in merge.src])
        assert per_window.tolist() == [list(window_quotas(layout.counts, quota))] * 3


@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("make", [tied_metric, quantised_metric])
@pytest.mark.parametrize("m,w,quota", [(30, 4, 2), (45, 5, 100), (64, 3, 1), (37, 6, 5)])
def test_quota_matching_matches_reference_with_ties(p, make, m, w, quota):
    n = p + m
    metric = make(4, n, seed=m + quota + p)
    x, _, size = random_inputs(4, n, seed=m)
    layout = square_layout(m, w)
    wid = square_window_ids(m, w)
    merge = window_quota_matching(metric, wid, layout.num_windows, w * w, quota,
                                  sum(window_quotas(layout.counts, quota)), p)
    ref = reference_quota_window_merge(x, metric, wid.tolist(), quota, p, size)
    assert_matches_reference(merge, x, metric, size, ref, n)


@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_quota_matching_any_windows_and_per_window_quotas(p):
    """Arbitrary (shared) window ids, empty and single-token windows, a quota per window."""
    g = torch.Generator().manual_seed(p)
    for trial in range(12):
        m = int(torch.randint(2, 40, (1,), generator=g))
        nw = int(torch.randint(1, 9, (1,), generator=g))
        wid = torch.randint(0, nw, (m,), generator=g)
        quota = torch.randint(0, 8, (nw,), generator=g)
        cap = int(torch.bincount(wid, minlength=nw).max()) + trial % 3  # loose capacity is fine
        n = p + m
        x, metric, size = random_inputs(2, n, seed=trial)
        r = expected_r(wid, nw, quota)
        merge = window_quota_matching(metric, wid, nw, cap, quota, r, p)
        assert merge.r == r
        ref = reference_quota_window_merge(x, metric, wid.tolist(), quota.tolist(), p, size)
        assert_matches_reference(merge, x, metric, size, ref, n)
        # r=None counts the merges itself (a host sync, fine outside the forward)
        assert window_quota_matching(metric, wid, nw, cap, quota, None, p).r == r


@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_quota_matching_single_window_is_tome(p):
    """One window holding every patch token gives ToMe's merge (in sequence order)."""
    b, m = 3, 24
    n = p + m
    wid = torch.zeros(m, dtype=torch.long)
    for seed, make in enumerate([None, tied_metric, quantised_metric]):
        metric = random_inputs(b, n, seed=seed)[1] if make is None else make(b, n, seed=seed)
        for r in (1, 5, m // 2):
            win = window_quota_matching(metric, wid, 1, m, r, r, p)
            tome = bipartite_soft_matching(metric, r, p, order="sequence")
            assert win.r == tome.r == r
            assert torch.equal(win.src, tome.src) and torch.equal(win.dst, tome.dst)
            assert torch.equal(win.keep, tome.keep)


def test_quota_matching_zero_and_bad_input():
    metric = torch.randn(2, 1 + 10, 4)
    wid = square_window_ids(10, 2)
    merge = window_quota_matching(metric, wid, 4, 4, 0, 0, 1)
    assert merge.r == 0 and merge.src is None and merge.keep.tolist() == [list(range(11))] * 2
    with pytest.raises(ValueError, match="window_ids"):
        window_quota_matching(metric, wid[None].expand(2, -1), 4, 4, 1, None, 1)


def _ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            fn()
    return Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def test_quota_matching_has_no_loop_over_windows_or_images():
    def run(b, m, w):
        metric = torch.randn(b, 1 + m, 16, generator=torch.Generator().manual_seed(0))
        layout = square_layout(m, w)
        wid = square_window_ids(m, w)
        r = sum(window_quotas(layout.counts, 4))
        return _ops(lambda: window_quota_matching(metric, wid, layout.num_windows, w * w, 4, r, 1))

    base = run(1, 196, 7)  # 4 windows
    assert sum(base.values()) > 0
    assert run(4, 196, 7) == base
    assert run(1, 196, 2) == base  # 49 windows
    assert run(8, 173, 4) == base  # 16 windows, padded


def test_quota_matching_compiles_without_graph_breaks():
    """No host sync and no data-dependent shape: torch.compile(fullgraph=True) traces it."""
    m, w, p = 150, 9, 1
    layout = square_layout(m, w)
    wid = square_window_ids(m, w)
    r = sum(window_quotas(layout.counts, 4))
    metric = torch.randn(2, p + m, 8, generator=torch.Generator().manual_seed(3))

    def indices(metric):
        merge = window_quota_matching(metric, wid, layout.num_windows, w * w, 4, r, p)
        return merge.src, merge.dst, merge.keep

    torch._dynamo.reset()
    compiled = torch.compile(indices, fullgraph=True, backend="eager")
    for got, want in zip(compiled(metric), indices(metric)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- schedules
def naive_schedule(grid, depth, r, w, delay, growth=1, p=1):
    """Per block (mode, tokens removed, per-window merges), per the paper reading: block i
    uses windows w + i * growth wide on the square of the M tokens entering it; while they are
    narrower than the square each window merges ceil(r / windows) of its own tokens, at most
    half of them; from then on, global merging of r (at most M // 2)."""
    m = grid[0] * grid[1]
    out = []
    for i in range(depth):
        if i < delay or r == 0:
            out.append(("none", 0, None))
            continue
        side = next(s for s in range(m + 1) if s * s >= m)
        wi = w + i * growth
        if wi < side:
            ids = reference_square_window_ids(m, wi)
            nw = (-(-side // wi)) ** 2
            q = -(-r // nw)
            merges = tuple(min(q, ids.count(k) // 2) for k in range(nw))
            got = sum(merges)
            out.append(("local" if got else "none", got, merges if got else None))
        else:
            got = min(r, m // 2)
            out.append(("global" if got else "none", got, None))
        m -= got
    return out


@pytest.mark.parametrize("grid", [(14, 14), (24, 24), (7, 7), (8, 12)])
def test_schedule_follows_naive_rule(grid):
    model = VisionTransformer(img_size=(grid[0] * 4, grid[1] * 4), patch_size=4, embed_dim=16,
                              depth=12, num_heads=2)
    for r in (1, 3, 4, 8, 13, 16, 20, 30):
        for w, growth, delay in ((7, 1, None), (3, 1, 0), (2, 0, 1), (9, 2, 3)):
            sched = schedule(model, "dsm", r, window=w, window_growth=growth, delay=delay)
            d = sched.options["delay"]
            want = naive_schedule(grid, 12, r, w, d, growth)
            got = [(b.mode, b.r, b.window_quotas) for b in sched.blocks]
            assert got == want, (grid, r, w, growth, delay)
            assert sched.tokens == [1 + grid[0] * grid[1] - sum(sched.r[:i]) for i in range(13)]
            for b in sched.blocks:
                if b.mode == "local":
                    layout = square_layout(b.tokens_in - 1, b.window)
                    assert (b.side, b.num_windows) == (layout.side, layout.num_windows)
                    assert b.quota == -(-r // b.num_windows) and sum(b.window_quotas) == b.r
                    assert b.window == w + b.index * growth < b.side
    # spatial merging: the same rule from block 0
    sched = schedule(model, "spatial", 8)
    assert [(b.mode, b.r, b.window_quotas) for b in sched.blocks] == naive_schedule(grid, 12, 8, 7, 0)


def test_schedule_local_blocks_cap_and_prune():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=12, num_heads=2)
    full = schedule(model, "dsm", 8)
    assert full.local_blocks == 4
    capped = schedule(model, "dsm", 8, local_blocks=2)
    assert [b.mode for b in capped.blocks] == ["none"] * 2 + ["local"] * 2 + ["global"] * 8
    assert capped.blocks[:4] == full.blocks[:4]
    assert schedule(model, "dsm", 8, local_blocks=0).local_blocks == 0
    assert schedule(model, "dsm", 8, reduction="prune").local_blocks == 0


def test_vit_b_macs_match_table2():
    """ViT-B/16 DSM (D = 2, paper windows) is within 2% of the paper's Table 2 at every r."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    dense = schedule(model, "tome", 0).macs / 1e9
    assert abs(dense - 17.57) < 0.01  # Table 2's baseline
    for r, paper in TABLE2.items():
        sched = schedule(model, "dsm", r)
        assert sched.options["delay"] == 2 and sched.options["windows"] == "paper"
        assert abs(sched.macs / 1e9 / paper - 1) < 0.02, (r, sched.macs / 1e9, paper)
    # the joint reading removes exactly r per block and misses Table 2 at r = 16 by ~5%
    joint = schedule(model, "dsm", 16, windows="joint")
    assert all(b.r in (0, 16) for b in joint.blocks)
    assert abs(joint.macs / 1e9 / TABLE2[16] - 1) > 0.04


def test_schedule_table_shows_per_window_merges():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=12, num_heads=2)
    sched = schedule(model, "dsm", 16)
    text = sched.table()
    assert "dsm (paper windows)" in text and "per-window merges" in text
    local = [b for b in sched.blocks if b.mode == "local"]
    assert [b.window_quotas for b in local] == [(4, 4, 4, 4), (4, 4, 4, 4), (4, 4, 4, 1), (4, 4, 0, 0)]
    lines = text.splitlines()[2:]
    for b, line in zip(sched.blocks, lines):
        cells = line.split()
        assert cells[0] == str(b.index) and cells[1] == b.mode
        if b.mode == "local":
            assert ",".join(map(str, b.window_quotas)) in cells and str(b.r) in cells
    frame = sched.to_frame()
    assert {"side", "window", "windows", "quota", "window_quotas", "r"} <= set(frame.columns)
    assert frame.loc[4, "window_quotas"] == (4, 4, 4, 1) and frame.loc[4, "r"] == 13
    many = schedule(VisionTransformer(img_size=384, patch_size=16, embed_dim=16, depth=12, num_heads=2), "spatial", 16)
    assert "1 each" in many.table()  # 24 x 24 square in 7 x 7 windows: 16 windows, 1 each


def test_windows_option_validated():
    model = small_vit(seed=0)
    with pytest.raises(ValueError, match="windows"):
        schedule(model, "dsm", 4, windows="square")
    with pytest.raises(ValueError, match="windows"):
        patch(model, "dsm", r=4, windows="square")
    assert not dsm_lite.is_patched(model)
    assert plan(ModelShape.from_model(model), "dsm", 4).options["windows"] == "paper"


# --------------------------------------------------------------------------- forwards
CASES = {
    "P0_avg": (dict(class_token=False, global_pool="avg"), "spatial", dict(r=5, window=3)),
    "P1": ({}, "dsm", dict(r=6, delay=1, window=3)),
    "P2_reg": (dict(reg_tokens=1), "dsm", dict(r=7, delay=1, window=2, window_growth=2)),
    "P5_reg": (dict(reg_tokens=4), "spatial", dict(r=[4, 9, 0, 9, 3], window=2)),
    "P1_grid7": (dict(img_size=56), "dsm", dict(r=4, delay=0, window=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_paper_forward_equals_naive_forward(name):
    """The whole forward against the hand-written one merging with the naive paper windows."""
    cfg, method, kw = CASES[name]
    model = small_vit(seed=5, dtype=torch.float64, depth=5, **cfg)
    x = torch.randn(3, 3, *(2 * [cfg.get("img_size", 64)]), generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64)
    patch(model, method, trace_source=True, **kw)
    sched = schedule(model)
    assert sched.local_blocks >= 1 and sched.options["windows"] == "paper"
    with torch.no_grad(), record_blocks(model) as log:
        got = model(x)
    paper = [(b.window, b.quota) if b.mode == "local" else None for b in sched.blocks]
    ref, counts, ref_src = reference_vit_forward(model, x, sched.r, order="sequence", paper_windows=paper)
    assert log["tokens"] == counts == sched.tokens
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    got_src = [[set(torch.nonzero(t).flatten().tolist()) for t in img] for img in model._dsm_state.source]
    assert got_src == ref_src
    assert model._dsm_state.anchors is None  # paper windows never need anchors
    assert count_macs(model.float(), (3, *x.shape[-2:])) == sched.macs


# --------------------------------------------------------------------------- real ViT-Ti
def test_real_vit_ti_merges_stay_inside_square_windows(ti):
    """ViT-Ti, DSM r = 16: token counts, window locality on the re-laid square, MACs."""
    vit_ti = ti  # the real ViT-Ti (conftest.py), unpatched around this test
    photos = load_photos(vit_ti, n=4)
    patch(vit_ti, "dsm", r=16, trace_source=True)
    sched = schedule(vit_ti)
    assert sched.local_blocks == 4
    with torch.no_grad(), record_blocks(vit_ti) as log:
        vit_ti(photos)
    assert log["tokens"] == sched.tokens
    p, n0 = 1, 197
    for i, step in enumerate(sched.blocks):
        if step.mode != "local":
            continue
        src_in = log["source_in"][i]
        src_in = torch.eye(n0)[None].expand(len(photos), -1, -1) if src_in is None else src_in
        src_out = log["source_out"][i]
        wid = square_window_ids(step.tokens_in - p, step.window)
        onehot = torch.nn.functional.one_hot(wid, step.num_windows).to(src_in.dtype)  # (M, W)
        union = torch.einsum("mw,bmn->bwn", onehot, src_in[:, p:]) > 0  # (B, W, N0)
        holds = src_out[:, p:] > 0  # (B, M', N0)
        outside = (holds[:, :, None, :] & ~union[:, None]).any(-1)  # (B, M', W)
        assert (~outside).any(-1).all(), f"block {i}: a token mixes two windows"
        # each window lost exactly its quota: count input tokens per window that survive alone
        kept_per_window = (holds[:, :, None, :] & union[:, None]).any(-1).sum(1)  # (B, W)
        expected = torch.bincount(wid, minlength=step.num_windows) - torch.tensor(step.window_quotas)
        assert torch.equal(kept_per_window, expected.expand_as(kept_per_window))
    assert count_macs(vit_ti) == sched.macs
