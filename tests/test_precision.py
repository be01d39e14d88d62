"""Half precision: matching scores and token sizes stay float32 under autocast and on
bfloat16 models, and every method runs under bfloat16 autocast on CPU."""
from __future__ import annotations

import math

import pytest
import torch

import dsm_lite
from dsm_lite import patch
from dsm_lite.merging import (Merge, bipartite_soft_matching, merge_wavg, prune_lowest_norm,
                              window_soft_matching)
from dsm_lite.windows import num_windows, window_ids

from reference import small_vit
from reference import single_thread  # noqa: F401  (autouse fixture)


def near_duplicates(b=2, n=197, c=64, seed=0):
    """Tokens that are all nearly the same vector: cosine similarities within ~1e-4 of 1,
    which bfloat16 (steps of 2^-8 near 1) rounds into exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, c, generator=g)
    return base + 1e-2 * torch.randn(b, n, c, generator=g)


def same(a: Merge, b: Merge) -> bool:
    return all((x is None and y is None) or torch.equal(x, y)
               for x, y in ((a.src, b.src), (a.dst, b.dst), (a.keep, b.keep)))


def windowed(metric, r=20, w=4, p=1):
    m = metric.shape[1] - p
    side = int(math.isqrt(m))
    anchors = torch.arange(m).expand(metric.shape[0], m)
    nw = math.prod(num_windows((side, side), w))
    return window_soft_matching(metric, r, window_ids(anchors, (side, side), w), nw, w * w, p)


@pytest.mark.parametrize("match", [
    lambda m: bipartite_soft_matching(m, 40, 1),
    lambda m: bipartite_soft_matching(m, 40, 1, order="sequence"),
    lambda m: windowed(m),
    lambda m: prune_lowest_norm(m, 40, 1),
], ids=["tome", "sequence", "window", "prune"])
def test_matching_scores_in_float32_under_autocast(match):
    """Under bf16 autocast, matching picks exactly what it picks in float32 (autocast is off
    inside it); a bf16 metric is matched as its float32 upcast."""
    metric = near_duplicates()
    want = match(metric)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert same(match(metric), want)
    half = metric.bfloat16()
    assert same(match(half), match(half.float()))


def test_bfloat16_scores_would_tie():
    """The premise of the test above: in bf16 these similarities collapse into ties, so
    scoring in bf16 would change the matching."""
    m = near_duplicates()
    m = m / m.norm(dim=-1, keepdim=True)
    s32 = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    s16 = (m.bfloat16()[:, ::2] @ m.bfloat16()[:, 1::2].transpose(-1, -2)).float()
    assert s16.unique().numel() * 50 < s32.unique().numel()


def test_merge_wavg_half_precision_keeps_float32_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 4, generator=g)
    size = torch.randint(250, 300, (2, 10, 1), generator=g).float()  # not exact in bf16
    merge = bipartite_soft_matching(torch.randn(2, 10, 8, generator=g), 3)
    out, out_size = merge_wavg(merge, x.bfloat16(), size)
    ref, ref_size = merge_wavg(merge, x.bfloat16().float(), size)
    assert out.dtype == torch.bfloat16 and out_size.dtype == torch.float32
    assert torch.equal(out_size, ref_size)
    # averaged in float32 and rounded to bfloat16 once: within half a bfloat16 ulp of the
    # exact (float64) average, up to float32's own rounding; summing the pulls in bfloat16
    # would round every addition and miss by up to an ulp
    exact, _ = merge_wavg(merge, x.bfloat16().double(), size.double())
    half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 8)
    assert ((out.double() - exact).abs() <= half_ulp + 1e-6 * exact.abs()).all()
    assert (out.float() - ref).abs().max() > 0  # the outputs really were rounded
    _, first = merge_wavg(merge, x.bfloat16())
    assert first.dtype == torch.float32 and first.sum() == 20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_wavg_half_rounds_a_shared_destination_once(dtype):
    """Destinations that take two and three sources (and one that takes none): the pulls
    of all sources are summed before the one rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, generator=g).to(dtype)
    size = torch.randint(1, 40, (2, 9, 1), generator=g).float()
    merge = Merge(torch.tensor([[2, 4, 8], [6, 8, 3]]), torch.tensor([[1, 1, 1], [5, 5, 0]]),
                  torch.tensor([[0, 1, 3, 5, 6, 7], [0, 1, 2, 4, 5, 7]]))
    out, out_size = merge_wavg(merge, x, size)
    exact, exact_size = merge_wavg(merge, x.double(), size.double())
    assert out.dtype == dtype and torch.equal(out_size.double(), exact_size)
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]  # stored fraction bits
    half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs())) - mantissa - 1)
    assert ((out.double() - exact).abs() <= half_ulp + 1e-6 * exact.abs()).all()


CONFIGS = [
    ("tome", dict(r=8)), ("spatial", dict(r=8)), ("dsm", dict(r=8)),
    ("tome", dict(r=8, reduction="prune")), ("spatial", dict(r=8, reduction="prune")),
    ("dsm", dict(r=8, reduction="prune")), ("tome", dict(r=8, feature="q")),
    ("spatial", dict(r=8, feature="v")), ("dsm", dict(r=8, feature="x")),
    ("dsm", dict(r=8, feature="random")), ("tome", dict(r=8, prop_attn=False)),
    ("spatial", dict(r=8, trace_source=True)),
]


@pytest.mark.parametrize("method,kw", CONFIGS, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in CONFIGS])
def test_every_method_runs_under_bfloat16_autocast(method, kw):
    model = small_vit()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g)
    patch(model, method, **kw, **(dict(delay=1) if method == "dsm" else {}))
    sched = dsm_lite.schedule(model)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    st = model._dsm_state
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert st.size.dtype == torch.float32 and st.size.shape[1] == sched.tokens[-1]
    if kw.get("reduction") != "prune":
        assert torch.equal(st.size.sum(1), torch.full((4, 1), 65.0))
    # bf16 rounding, not a different computation: close to float32 at this scale
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("method", ["tome", "spatial", "dsm"])
def test_bfloat16_model(method):
    """A model converted to bfloat16 (no autocast) runs; sizes stay float32; its logits are
    those of the same (bf16-rounded) weights run in float32, up to bfloat16 rounding."""
    kw = dict(delay=1) if method == "dsm" else {}
    model = patch(small_vit().to(torch.bfloat16), method, r=8, **kw)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        out = model(x)
        want = patch(small_vit().to(torch.bfloat16).float(), method, r=8, **kw)(x.float())
    assert out.dtype == torch.bfloat16
    assert model._dsm_state.size.dtype == torch.float32
    assert (out.float() - want).abs().max() < 0.05 * want.abs().max()


def test_avg_pool_bfloat16_model():
    def build():
        return small_vit(class_token=False, global_pool="avg").to(torch.bfloat16)

    model = patch(build(), "dsm", r=8, delay=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        out = model(x)
        want = patch(build().float(), "dsm", r=8, delay=1)(x.float())  # float32 reference
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max() < 0.05 * want.abs().max()
