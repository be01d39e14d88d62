"""Delayed Spatial Merging (DSM) and spatial merging: delay, windows, padding, odd grids,
schedules, MACs and the absence of Python loops over windows or images.

Tests of window layouts here are of the joint reading (``windows="joint"``: anchors on the
original grid, the best r merges over all windows); the paper's windows (the default) are
tested in test_paper_windows.py."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import dsm_lite
from dsm_lite import count_macs, patch, schedule
from dsm_lite.merging import window_soft_matching
from dsm_lite.windows import num_windows, window_ids

from reference import record_blocks, reference_vit_forward, small_vit
from reference import single_thread  # noqa: F401  (autouse fixture)

# fixtures vit_ti, photos and ti (the real ViT-Ti, unpatched around each test): conftest.py


def images(b=2, seed=0, hw=(64, 64), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, *hw, generator=g).to(dtype)


def canonical(groups):
    """Relabel a (B, H, W) grouping by first occurrence, so partitions compare equal."""
    out = []
    for img in groups.flatten(1).tolist():
        seen = {}
        out.append([seen.setdefault(g, len(seen)) for g in img])
    return out


def check_windows(model, log, sched):
    """Every local block merges only inside the windows of its input tokens' anchors.

    For each local block: window ids from the anchors entering it; each output patch token's
    sources lie inside the union of the sources of the input tokens of one window; the prefix
    holds only itself; each output token's anchor is one of its own patches.
    Returns the number of local blocks checked.
    """
    st = model._dsm_state
    p, grid = st.num_prefix, st.grid
    n0 = p + grid[0] * grid[1]
    checked = 0
    for i, step in enumerate(sched.blocks):
        if step.mode != "local":
            continue
        anchors = log["anchors_in"][i]
        b, m = anchors.shape
        assert m == step.tokens_in - p
        src_in = log["source_in"][i]
        if src_in is None:
            src_in = torch.eye(n0)[None].expand(b, -1, -1)
        src_out = log["source_out"][i]
        assert src_out.shape[1] == step.tokens_out
        wid = window_ids(anchors, grid, step.window)
        assert int(wid.max()) < step.num_windows == math.prod(num_windows(grid, step.window))
        onehot = torch.nn.functional.one_hot(wid, step.num_windows).to(src_in.dtype)  # (B, M, W)
        union = onehot.transpose(1, 2) @ src_in[:, p:] > 0  # (B, W, N0)
        holds = src_out[:, p:] > 0  # (B, M', N0)
        outside = (holds[:, :, None, :] & ~union[:, None]).any(-1)  # (B, M', W)
        assert (~outside).any(-1).all(), f"block {i}: a token mixes patches of two windows"
        assert torch.equal(src_out[:, :p], torch.eye(n0)[:p].expand(b, -1, -1))
        # the anchor leaving the block is one of the token's own patches
        if i + 1 < len(sched.blocks) and log["anchors_in"][i + 1] is not None:
            nxt = log["anchors_in"][i + 1]
            assert holds.gather(2, (nxt + p)[..., None]).all()
        checked += 1
    return checked


def check_first_local_block_in_original_windows(model, log, sched):
    """In the first local block every merged token's patches lie in one w x w window."""
    st = model._dsm_state
    p, (h, w) = st.num_prefix, st.grid
    first = next(i for i, s in enumerate(sched.blocks) if s.mode == "local")
    win = sched.blocks[first].window
    assert log["source_in"][first] is None  # nothing merged before it
    patch_window = window_ids(torch.arange(h * w)[None], (h, w), win)[0]
    for img in log["source_out"][first][:, p:]:
        for row in img:
            patches = torch.nonzero(row[p:]).flatten()
            assert len(set(patch_window[patches].tolist())) == 1


# --------------------------------------------------------------------------- real ViT-Ti
def test_delay_at_least_depth_is_dense(ti, photos):
    with torch.no_grad():
        dense = ti(photos)
        for delay in (12, 40):
            patch(ti, "dsm", r=16, delay=delay)
            assert set(b.mode for b in schedule(ti).blocks) == {"none"}
            assert torch.equal(ti(photos), dense)


def test_window_covering_grid_matches_tome(ti, photos):
    """D = 0 with w = 14 on a 14 x 14 grid: ToMe's first merge and ToMe's token counts."""
    x = photos[:4]
    patch(ti, "tome", r=[13])
    _, tome_groups = dsm_lite.trace_sources(ti, x)
    patch(ti, "dsm", r=[13], delay=0, window=14)
    _, dsm_groups = dsm_lite.trace_sources(ti, x)
    assert canonical(dsm_groups) == canonical(tome_groups)
    assert len(set(canonical(dsm_groups)[0])) == 196 - 13
    counts = {}
    for method, kw in (("tome", {}), ("dsm", dict(delay=0, window=14))):
        patch(ti, method, r=13, **kw)
        with torch.no_grad(), record_blocks(ti) as log:
            ti(x)
        counts[method] = list(log["tokens"])
        assert counts[method] == schedule(ti).tokens
    assert counts["dsm"] == counts["tome"]


@pytest.mark.parametrize("method,kw", [("dsm", dict(r=16, windows="joint")),
                                       ("dsm", dict(r=8, window=4, delay=1, windows="joint")),
                                       ("spatial", dict(r=10, window=5, windows="joint"))])
def test_real_merges_stay_inside_windows(ti, photos, method, kw):
    patch(ti, method, trace_source=True, **kw)
    sched = schedule(ti)
    with torch.no_grad(), record_blocks(ti) as log:
        ti(photos)
    assert log["tokens"] == sched.tokens
    assert check_windows(ti, log, sched) == sched.local_blocks >= 1
    check_first_local_block_in_original_windows(ti, log, sched)
    if method == "dsm" and kw["r"] == 16:
        assert count_macs(ti) == sched.macs


# --------------------------------------------------------------------------- reference forward
@pytest.mark.parametrize("method,kw", [
    ("dsm", dict(r=6, delay=1, window=3, windows="joint")),
    ("spatial", dict(r=5, window=2, windows="joint")),
    ("dsm", dict(r=[0, 9, 7, 7, 5], delay=0, window=3, window_growth=0, windows="joint")),
    ("dsm", dict(r=5, delay=1, window=3, local_blocks=0, windows="joint")),
])
def test_dsm_equals_naive_forward(method, kw):
    """The whole DSM forward against the hand-written one with reference window merging."""
    model = small_vit(seed=5, dtype=torch.float64, depth=5, reg_tokens=1)
    x = images(3, seed=6, dtype=torch.float64)
    patch(model, method, trace_source=True, **kw)
    sched = schedule(model)
    with torch.no_grad(), record_blocks(model) as log:
        got = model(x)
    windows = [s.window if s.mode == "local" else None for s in sched.blocks]
    ref, counts, ref_src = reference_vit_forward(model, x, sched.r, order="sequence", windows=windows)
    assert log["tokens"] == counts == sched.tokens
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    got_src = [[set(torch.nonzero(t).flatten().tolist()) for t in img] for img in model._dsm_state.source]
    assert got_src == ref_src
    if kw.get("local_blocks") == 0:
        assert [s.mode for s in sched.blocks] == ["none"] + ["global"] * 4
    else:
        assert sched.local_blocks >= 1


def test_local_blocks_zero_is_delayed_global_sequence_merging():
    """local_blocks=0: ToMe's matching in sequence order after the delay (reference forward)."""
    model = small_vit(seed=7, dtype=torch.float64, depth=5)
    x = images(2, seed=8, dtype=torch.float64)
    patch(model, "dsm", r=6, delay=2, local_blocks=0)
    with torch.no_grad():
        got = model(x)
    ref, counts, _ = reference_vit_forward(model, x, [0, 0, 6, 6, 6], order="sequence")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert counts == schedule(model).tokens
    # ToMe's output order would give different results from the second merging block on
    tome, _, _ = reference_vit_forward(model, x, [0, 0, 6, 6, 6], order="tome")
    assert not torch.allclose(tome, ref, atol=1e-5)


# --------------------------------------------------------------------------- odd grids, padding
ODD = {
    # 384 px, 16 px patches: 24 x 24 grid, w = 7 -> 4 x 4 windows, the last row/column padded
    "grid24_w7": (dict(img_size=384, patch_size=16, embed_dim=32, depth=4, num_heads=2), (384, 384), dict(r=60, window=7)),
    # 224 px, 32 px patches: 7 x 7 grid, w = 3 -> 3 x 3 windows, padded
    "grid7_w3": (dict(img_size=224, patch_size=32, embed_dim=32, depth=4, num_heads=2), (224, 224), dict(r=4, window=3)),
    # rectangular 8 x 12 grid, w = 5 -> 2 x 3 windows, padded
    "grid8x12_w5": (dict(img_size=(64, 96), patch_size=8, depth=4), (64, 96), dict(r=8, window=5)),
    # with registers: 4 prefix tokens
    "grid9_w4_reg": (dict(img_size=72, patch_size=8, depth=4, reg_tokens=3), (72, 72), dict(r=6, window=4)),
}


@pytest.mark.parametrize("name", list(ODD))
@pytest.mark.parametrize("method", ["spatial", "dsm"])
def test_odd_grids_padding(name, method):
    cfg, hw, kw = ODD[name]
    model = small_vit(seed=0, **cfg)
    kw = dict(kw, windows="joint")
    kw = dict(kw, delay=1) if method == "dsm" else kw
    patch(model, method, trace_source=True, **kw)
    sched = schedule(model)
    assert sched.local_blocks >= 1
    st = model._dsm_state
    p = model.num_prefix_tokens
    n0 = p + model.patch_embed.num_patches
    attended = []
    hook = [b.attn.register_forward_pre_hook(
        lambda mod, args: attended.append((args[0].shape[1], dsm_lite.attention_bias(mod)))) for b in model.blocks]
    x = images(3, seed=1, hw=hw)
    try:
        with torch.no_grad(), record_blocks(model) as log:
            out = model(x)
    finally:
        for h in hook:
            h.remove()
    # the hand-written forward with the naive window merging (padding needs no special case there)
    windows = [s.window if s.mode == "local" else None for s in sched.blocks]
    ref, counts, _ = reference_vit_forward(model, x, sched.r, order="sequence", windows=windows)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert log["tokens"] == sched.tokens == counts
    # no padding token ever enters attention, and the size bias covers exactly the real tokens
    assert [n for n, _ in attended] == sched.tokens[:-1]
    assert all(bias is None or bias.shape == (3, 1, 1, n) for n, bias in attended)
    # no padding was merged in: sizes count exactly the real tokens, sources partition them
    assert torch.equal(st.size.sum(1).flatten(), torch.full((3,), float(n0)))
    assert torch.equal(st.source.sum(1), torch.ones(3, n0))
    assert torch.equal(st.source.sum(-1, keepdim=True), st.size)
    assert check_windows(model, log, sched) == sched.local_blocks
    check_first_local_block_in_original_windows(model, log, sched)
    assert any(s.mode == "local" and (model.patch_embed.grid_size[0] % s.window or model.patch_embed.grid_size[1] % s.window)
               for s in sched.blocks), "no padded window was exercised"
    assert count_macs(model, (3, *hw)) == sched.macs
    with torch.no_grad():
        for i in range(3):
            torch.testing.assert_close(model(x[i:i + 1]), out[i:i + 1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- schedules
def _naive_local_blocks(grid, depth, r, w, delay, growth=1, p=1):
    """Local blocks per the documented rule: block j after the delay uses windows of
    round((w + j * growth) * sqrt(N0 / M_j)) patches while that is smaller than the grid."""
    n0 = grid[0] * grid[1]
    m, count = n0, 0
    for j in range(depth - delay):
        side = math.floor((w + j * growth) * math.sqrt(n0 / m) + 0.5)
        if side >= max(grid):
            break
        nw = math.ceil(grid[0] / side) * math.ceil(grid[1] / side)
        got = min(r, max((m - nw) // 2, 0))
        m -= got
        count += 1
    return count


def test_schedule_local_blocks_follow_from_w_r_grid():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=12, num_heads=2)
    counts = {}
    for w in (2, 3, 4, 5, 7, 9, 13, 14, 20):
        for r in (1, 4, 8, 13, 16, 20, 25, 30):
            sched = schedule(model, "dsm", r, window=w, windows="joint")
            modes = [b.mode for b in sched.blocks]
            d = dsm_lite.default_delay(12)
            assert modes[:d] == ["none"] * d
            rest = "".join({"local": "L", "global": "G", "none": "N"}[m] for m in modes[d:])
            assert rest == "L" * sched.local_blocks + "G" * (len(rest) - sched.local_blocks), rest
            assert sched.local_blocks == _naive_local_blocks((14, 14), 12, r, w, d), (w, r)
            assert all(b.window is not None and b.window < 14 for b in sched.blocks if b.mode == "local")
            assert sched.tokens == [197 - sum(sched.r[:i]) for i in range(13)]
            counts[w, r] = sched.local_blocks
            capped = schedule(model, "dsm", r, window=w, local_blocks=1, windows="joint")
            assert capped.local_blocks == min(1, sched.local_blocks)
    for w in (2, 3, 4, 5, 7, 9, 13):
        rs = [counts[w, r] for r in (1, 4, 8, 13, 16, 20, 25, 30)]
        assert rs == sorted(rs, reverse=True), (w, rs)  # larger r -> fewer or equal local blocks
    for r in (1, 4, 8, 13, 16, 20, 25, 30):
        ws = [counts[w, r] for w in (2, 3, 4, 5, 7, 9, 13, 14, 20)]
        assert ws == sorted(ws, reverse=True), (r, ws)  # larger windows -> fewer or equal
    assert counts[14, 16] == counts[20, 1] == 0 and counts[2, 1] > counts[7, 16] >= 1
    # a wider grid keeps merging locally for longer
    wide = VisionTransformer(img_size=384, patch_size=16, embed_dim=16, depth=12, num_heads=2)
    assert (schedule(wide, "dsm", 16, windows="joint").local_blocks
            >= schedule(model, "dsm", 16, windows="joint").local_blocks)


def test_schedule_clamps_and_counts():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=12, num_heads=2)
    sched = schedule(model, "spatial", 200, window=7, windows="joint")
    for b in sched.blocks:
        if b.mode == "local":
            assert b.r == (b.tokens_in - 1 - b.num_windows) // 2
        elif b.mode == "global":
            assert b.r == (b.tokens_in - 1) // 2
        assert b.tokens_out == b.tokens_in - b.r
    assert sched.tokens[-1] >= 2
    with pytest.raises(ValueError, match="spatial"):
        schedule(model, "spatial", 8, delay=2)
    assert schedule(model, "dsm", 8).options["delay"] == dsm_lite.default_delay(12) == 2


# --------------------------------------------------------------------------- no Python loops
def _ops(fn):
    """Top-level aten ops a call dispatches (ops nested inside other ops are kernel details:
    e.g. zero_ calls fill_ only above a size threshold)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            fn()
    return Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def test_window_matching_has_no_loop_over_windows_or_images():
    def run(b, w):
        g = torch.Generator().manual_seed(0)
        metric = torch.randn(b, 1 + 196, 16, generator=g)
        anchors = torch.stack([torch.randperm(196, generator=g) for _ in range(b)])
        wid = window_ids(anchors, (14, 14), w)
        nw = math.prod(num_windows((14, 14), w))
        return _ops(lambda: window_soft_matching(metric, 20, wid, nw, w * w, 1))

    base = run(1, 7)  # 4 windows
    assert sum(base.values()) > 0
    assert run(4, 7) == base
    assert run(1, 2) == base  # 49 windows
    assert run(8, 4) == base  # 16 windows, padded


@pytest.mark.parametrize("windows", ["joint", "paper"])
def test_dsm_forward_has_no_loop_over_windows_or_images(windows):
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=10).eval()
    x = images(4, hw=(224, 224))
    counts, layouts = {}, set()
    for w in (4, 7):  # joint: 16 vs 4 windows; paper: 9 vs 4 windows; one local block each
        patch(model, "dsm", r=12, delay=1, window=w, local_blocks=1, windows=windows)
        assert [b.mode for b in schedule(model).blocks] == ["none", "local", "global", "global"]
        layouts.add(schedule(model).blocks[1].num_windows)
        with torch.no_grad():  # first calls build the cached window ids / tables, per batch size
            model(x[:2]), model(x[:4])
        # batches of 2 and 4: a batch of one skips the per-image row offsets (fewer ops)
        for b in (2, 4):
            counts[w, b] = _ops(lambda: model(x[:b]))
    assert len(layouts) == 2
    assert counts[4, 2] == counts[4, 4] == counts[7, 2] == counts[7, 4]
