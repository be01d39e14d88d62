"""Tests for dsm_lite.probes (fast: small random-weight ViTs only)."""
import math

import pytest
import torch
from timm.models import VisionTransformer

from dsm_lite import probes
from dsm_lite.probes import (
    AttentionProbe,
    attention_received,
    delta_sim,
    emergence_block,
    find_outliers,
    outlier_report,
    prefix_share,
    run_probe,
    sim_per_block,
    token_similarity,
    topk_share,
    transition_block,
)


def small_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


MODELS = {
    "plain": dict(),
    "registers": dict(reg_tokens=4, class_token=True),
    "layerscale_qknorm": dict(init_values=0.1, qk_norm=True),
}


def images(b=4, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def set_fused(model, fused: bool):
    for blk in model.blocks:
        blk.attn.fused_attn = fused


def no_hooks(model):
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    return True


@pytest.fixture(params=[(name, fused) for name in MODELS for fused in (True, False)],
                ids=lambda p: f"{p[0]}-{'sdpa' if p[1] else 'explicit'}")
def variant_model(request):
    """Each of MODELS, with fused (SDPA) and with explicit attention."""
    name, fused = request.param
    model = small_vit(**MODELS[name])
    set_fused(model, fused)
    return model


# ---------------------------------------------------------------------------
# the probe leaves the model untouched
# ---------------------------------------------------------------------------

def test_probe_is_transparent(variant_model):
    model = variant_model
    x = images()
    with torch.no_grad():
        before = model(x)
        with AttentionProbe(model) as probe:
            during = model(x)
        after = model(x)
    assert torch.equal(before, during)
    assert torch.equal(before, after)
    assert no_hooks(model)
    assert len(probe.records) == len(model.blocks)
    # run_probe too, and its logits are the model's
    res = run_probe(model, x, what=probes.CAPTURABLE, batch_size=len(x))
    assert no_hooks(model)
    assert torch.equal(res.logits, before)
    # smaller batches: the same up to batch-size-dependent float rounding
    res = run_probe(model, x, what=probes.CAPTURABLE, batch_size=3)
    torch.testing.assert_close(res.logits, before)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_probe_removed_on_error():
    model = small_vit()
    with pytest.raises(ValueError):
        with torch.no_grad(), AttentionProbe(model):
            model(images(2))
            raise ValueError("boom")
    assert no_hooks(model)


# ---------------------------------------------------------------------------
# recorded tensors are what the block computes
# ---------------------------------------------------------------------------

def naive_attention(attn_module, x):
    """Deliberately simple recomputation: explicit loops over batch and heads."""
    B, N, C = x.shape
    H = attn_module.num_heads
    hd = C // H
    W, b = attn_module.qkv.weight, attn_module.qkv.bias
    out = torch.zeros(B, H, N, N)
    for i in range(B):
        qkv = x[i] @ W.T + (b if b is not None else 0)  # (N, 3C)
        for h in range(H):
            q = qkv[:, h * hd:(h + 1) * hd]
            k = qkv[:, C + h * hd:C + (h + 1) * hd]
            q = attn_module.q_norm(q)
            k = attn_module.k_norm(k)
            logits = (q @ k.T) * hd ** -0.5
            e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
            out[i, h] = e / e.sum(dim=-1, keepdim=True)
    return out


def test_attention_probs_match_naive(variant_model):
    model = variant_model
    x = images(3)
    res = run_probe(model, x, what=("x_in", "attn", "received"))
    for l, blk in enumerate(model.blocks):
        with torch.no_grad():
            expected = naive_attention(blk.attn, blk.norm1(res.blocks[l]["x_in"]))
        got = res.blocks[l]["attn"]
        N = x.shape[0] and res.blocks[l]["x_in"].shape[1]
        assert got.shape == (3, blk.attn.num_heads, N, N)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(res.blocks[l]["received"], attention_received(got))
        torch.testing.assert_close(res.blocks[l]["received"].sum(-1), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_recorded_stream_is_consistent(name):
    model = small_vit(**MODELS[name])
    x = images(2)
    res = run_probe(model, x, what=probes.CAPTURABLE)
    L = len(model.blocks)
    for l in range(L):
        b = res.blocks[l]
        torch.testing.assert_close(b["x_mid"], b["x_in"] + b["attn_out"], atol=0, rtol=0)
        with torch.no_grad():
            blk = model.blocks[l]
            branch = blk.ls1(blk.attn(blk.norm1(b["x_in"])))
            torch.testing.assert_close(b["attn_out"], branch)
            torch.testing.assert_close(b["x_out"], blk(b["x_in"]))
        torch.testing.assert_close(b["norms"], b["x_out"].norm(dim=-1))
        torch.testing.assert_close(b["norms_in"], b["x_in"].norm(dim=-1))
        if l + 1 < L:
            assert torch.equal(b["x_out"], res.blocks[l + 1]["x_in"])
    with torch.no_grad():
        feats = model.forward_features(x)
    torch.testing.assert_close(model.norm(res.blocks[-1]["x_out"]), feats)
    assert res.num_prefix_tokens == model.num_prefix_tokens
    assert res.grid_size == (4, 4)


def test_registers_prefix():
    model = small_vit(**MODELS["registers"])
    assert model.num_prefix_tokens == 5
    res = run_probe(model, images(2), what=("x_in", "x_mid", "received"))
    assert res.blocks[0]["x_in"].shape == (2, 5 + 16, 48)
    s_all = sim_per_block(res, "x_in")
    s_patch = sim_per_block(res, "x_in", include_prefix=False)
    assert s_all.shape == s_patch.shape == (2, 3)
    for b in range(2):  # every block, against the double loop, with and without the 5 prefix tokens
        for l in range(3):
            x_in = res.blocks[l]["x_in"][b]
            assert math.isclose(float(s_all[b, l]), naive_sim(x_in), abs_tol=1e-5)
            assert math.isclose(float(s_patch[b, l]), naive_sim(x_in[5:]), abs_tol=1e-5)
    received = res.blocks[0]["received"]
    share = prefix_share(received, 5)
    want = [sum(float(received[b, t]) for t in range(5)) for b in range(2)]
    torch.testing.assert_close(share, torch.tensor(want), atol=1e-6, rtol=0)


def test_reduce_and_extra_and_block_subset():
    model = small_vit()
    x = images(5)
    full = run_probe(model, x, what=("attn", "x_in", "x_mid"))
    red = run_probe(model, x, what=("attn",), batch_size=2, blocks=[0, 2],
                    reduce={"attn": lambda t: t.amax(dim=(1, 2))})
    assert red.depth == 2
    torch.testing.assert_close(red.blocks[1]["attn"], full.blocks[2]["attn"].amax(dim=(1, 2)))
    red2 = run_probe(model, x, what=("attn",), batch_size=2,
                     reduce=lambda name, l, t: t[:, :, 0].mean(1))
    torch.testing.assert_close(red2.blocks[1]["attn"], full.blocks[1]["attn"][:, :, 0].mean(1))
    ex = run_probe(model, x, what=("x_in", "x_mid"), batch_size=2, keep=(),
                   extra={"sim_in": lambda r: token_similarity(r["x_in"]),
                          "sim_mid": lambda r: token_similarity(r["x_mid"])})
    assert set(ex.blocks[0]) == {"sim_in", "sim_mid"}
    torch.testing.assert_close(ex.stack("sim_in"), sim_per_block(full, "x_in"))
    torch.testing.assert_close(ex.stack("sim_mid") - ex.stack("sim_in"),
                               delta_sim(sim_per_block(full, "x_in"), sim_per_block(full, "x_mid")))
    with pytest.raises(ValueError):
        AttentionProbe(model, what=("nope",))


# ---------------------------------------------------------------------------
# Sim (paper eq. 2)
# ---------------------------------------------------------------------------

def naive_sim(x):
    n = x.shape[0]
    tot = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                tot += float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
    return tot / (n * (n - 1))


def test_sim_matches_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 7, generator=g) + 0.5
    s = token_similarity(x)
    assert s.shape == (3,)
    for b in range(3):
        assert math.isclose(float(s[b]), naive_sim(x[b]), abs_tol=1e-6)
    s2 = token_similarity(x, num_prefix_tokens=2, include_prefix=False)
    for b in range(3):
        assert math.isclose(float(s2[b]), naive_sim(x[b, 2:]), abs_tol=1e-6)
    # identical tokens -> 1, opposite pairs -> -1/(n-1)
    assert math.isclose(float(token_similarity(torch.ones(5, 4))), 1.0, abs_tol=1e-6)
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert math.isclose(float(token_similarity(v)), -1.0, abs_tol=1e-6)


def test_delta_sim_sign():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 20, 16, generator=g)
    centre = x.mean(dim=1, keepdim=True) + 3.0
    towards = x + 0.5 * (centre - x)          # tokens pulled together: convergent
    away = x + 0.5 * (x - x.mean(dim=1, keepdim=True))  # pushed apart: divergent
    assert bool((delta_sim(token_similarity(x), token_similarity(towards)) > 0).all())
    x2 = x + 2.0  # start from fairly similar tokens
    away = x2 + 1.0 * (x2 - x2.mean(dim=1, keepdim=True))
    assert bool((delta_sim(token_similarity(x2), token_similarity(away)) < 0).all())


# ---------------------------------------------------------------------------
# attention received, outliers, transition
# ---------------------------------------------------------------------------

def test_received_and_shares():
    attn = torch.full((2, 3, 5, 5), 0.2)
    r = attention_received(attn)
    torch.testing.assert_close(r, torch.full((2, 5), 0.2))
    attn = torch.zeros(1, 2, 4, 4)
    attn[..., 3] = 0.7
    attn[..., 0] = 0.1
    attn[..., 1] = 0.1
    attn[..., 2] = 0.1
    r = attention_received(attn)
    assert math.isclose(float(topk_share(r, 1)), 0.7, abs_tol=1e-6)
    assert math.isclose(float(topk_share(r, 2)), 0.8, abs_tol=1e-6)
    assert math.isclose(float(prefix_share(r, 1)), 0.1, abs_tol=1e-6)
    assert math.isclose(float(topk_share(r, 1, num_prefix_tokens=1, include_prefix=False)), 0.7, abs_tol=1e-6)


def test_outliers_constructed():
    g = torch.Generator().manual_seed(0)
    L, B, N = 4, 3, 1 + 16
    norms = [torch.rand(B, N, generator=g) * 0.2 + 1.0 for _ in range(L)]
    for l in (2, 3):
        norms[l][:, 1 + 5] = 30.0   # patch 5 -> grid (1, 1) on a 4x4 grid
        norms[l][0, 1 + 15] = 10.0  # image 0 also patch 15 -> (3, 3)
    norms[1][0, 1 + 2] = 5.0        # a lone outlier in one image only
    for n in norms:
        n[:, 0] = 50.0              # class token is never a patch outlier
    mask = find_outliers(norms[2], num_prefix_tokens=1, ratio=2.0)
    assert mask.shape == (B, 16)
    assert mask[:, 5].all() and mask[0, 15] and int(mask.sum()) == 4
    rep = outlier_report(norms, num_prefix_tokens=1, ratio=2.0)
    torch.testing.assert_close(rep.frac_images, torch.tensor([0.0, 1 / 3, 1.0, 1.0]))
    torch.testing.assert_close(rep.mean_count, torch.tensor([0.0, 1 / 3, 4 / 3, 4 / 3]))
    assert rep.emergence == 2
    assert rep.max_ratio.shape == (B, L)
    assert emergence_block(torch.tensor([0.0, 0.9, 0.2, 0.8, 0.9])) == 3
    assert emergence_block(torch.tensor([0.0, 0.1])) is None


def test_transition_block_rule():
    # paper-like: divergent in blocks 0-1, convergent from 2 on
    d = torch.tensor([-0.1, -0.05, 0.02, 0.03, 0.04, 0.01, 0.02, 0.05, 0.03, 0.02, 0.01, 0.02])
    assert transition_block(d) == 2
    # an isolated positive early block does not count; one late dip is tolerated
    d = torch.tensor([0.1, -0.1, -0.03, -0.02, 0.09, 0.03, 0.06, 0.06, 0.07, 0.03, -0.02, 0.01])
    assert transition_block(d) == 4
    # per-image input is averaged over images first
    per_image = torch.stack([d + 0.001, d - 0.001])
    assert transition_block(per_image) == 4
    assert transition_block(-torch.ones(6)) is None
    assert transition_block(torch.ones(6)) == 0


# ---------------------------------------------------------------------------
# dsm_lite-patched models (token merging shrinks N block by block)
# ---------------------------------------------------------------------------

def test_probe_on_patched_model():
    import dsm_lite

    if not hasattr(dsm_lite, "patch"):
        pytest.skip("dsm_lite.patch not available yet")
    model = small_vit(img_size=96, depth=4)  # 36 patches + cls
    x = images(3, size=96)
    with torch.no_grad():
        dense = model(x)
    dsm_lite.patch(model, method="tome", r=4)
    try:
        with torch.no_grad():
            merged = model(x)
        res = run_probe(model, x, what=("x_in", "x_mid", "x_out", "attn", "received"))
        assert len(res.blocks[1]["x_in"]) == 3
        torch.testing.assert_close(res.logits, merged)
        counts = [res.blocks[l]["x_in"].shape[1] for l in range(4)]
        assert counts == [37, 33, 29, 25]  # 36 patches + cls, r = 4 merged per block
        for l in range(4):
            b = res.blocks[l]
            n = b["x_in"].shape[1]
            assert b["attn"].shape[-2:] == (n, n)
            assert b["x_mid"].shape == b["x_in"].shape
            torch.testing.assert_close(b["attn"].sum(-1), torch.ones(b["attn"].shape[:-1]), atol=1e-5, rtol=0)
            torch.testing.assert_close(b["received"].sum(-1), torch.ones(3), atol=1e-5, rtol=0)
            assert b["x_out"].shape[1] <= n
            # the probabilities are the ones the patched model uses (incl. the size bias):
            # rebuilding the attention output from them gives the recorded branch output
            attn = model.blocks[l].attn
            with torch.no_grad():
                h = model.blocks[l].norm1(b["x_in"])
                v = torch.nn.functional.linear(h, attn.qkv.weight, attn.qkv.bias)
                v = v.reshape(3, n, 3, attn.num_heads, -1)[:, :, 2].transpose(1, 2)
                out = attn.proj((b["attn"] @ v).transpose(1, 2).reshape(3, n, -1))
            torch.testing.assert_close(out, b["x_mid"] - b["x_in"], atol=1e-5, rtol=1e-4)
    finally:
        dsm_lite.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), dense)
    assert no_hooks(model)


def test_small_helpers():
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    m = torch.tensor([[True, False, True, False], [False] * 4])
    out = probes.masked_mean(v, m)
    assert float(out[0]) == 2.0 and math.isnan(float(out[1]))
    ov = probes.topk_overlap(v, torch.tensor([[False, False, True, True], [True, False, False, True]]))
    assert ov.tolist() == [1.0, 0.5]
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, :16, 16:] = torch.randn(3, 16, 16)
    c = probes.patch_contrast(img, 16)
    assert c.shape == (1, 4) and float(c[0, 0]) == 0
    for k in range(4):  # row-major patches: sample std of the patch's 3 * 16 * 16 pixels
        r, col = divmod(k, 2)
        pix = img[0, :, 16 * r:16 * r + 16, 16 * col:16 * col + 16].flatten().tolist()
        mean = sum(pix) / len(pix)
        std = math.sqrt(sum((v - mean) ** 2 for v in pix) / (len(pix) - 1))
        assert math.isclose(float(c[0, k]), std, rel_tol=1e-5, abs_tol=1e-7)
    torch.testing.assert_close(probes.rank_percentile(torch.tensor([[3.0, 1.0, 2.0]])),
                               torch.tensor([[1.0, 0.0, 0.5]]))


def test_measure_sim():
    model = small_vit(**MODELS["registers"])
    x = images(5)
    full = run_probe(model, x, what=("x_in", "x_mid"))
    sim = probes.measure_sim(model, x, batch_size=2)
    torch.testing.assert_close(sim.sim_in, sim_per_block(full, "x_in"))
    torch.testing.assert_close(sim.sim_mid_patches, sim_per_block(full, "x_mid", include_prefix=False))
    torch.testing.assert_close(sim.delta(False), sim.sim_mid_patches - sim.sim_in_patches)
    want = [[naive_sim(full.blocks[l]["x_mid"][b]) - naive_sim(full.blocks[l]["x_in"][b]) for l in range(3)]
            for b in range(5)]
    torch.testing.assert_close(sim.delta(), torch.tensor(want, dtype=sim.delta().dtype), atol=1e-5, rtol=0)
    assert no_hooks(model)
