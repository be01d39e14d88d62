"""dsm_lite.patch / unpatch on timm ViTs: exactness, a hand-written reference forward, token
counts, batch independence, SDPA, MACs, model variants, state reset and input validation."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

import dsm_lite
from dsm_lite import count_macs, is_patched, patch, schedule, unpatch

from reference import (record_blocks, reference_forward_for_schedule, reference_prune, reference_vit_forward,
                       small_vit, unpatched_during)
from reference import single_thread  # noqa: F401  (autouse fixture)

SMALL = (3, 64, 64)


def images(b=2, seed=0, size=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g).to(dtype)


def source_sets(source):
    return [[frozenset(torch.nonzero(row).flatten().tolist()) for row in img] for img in source]


# fixtures vit_ti, photos and ti (the real ViT-Ti, unpatched around each test): conftest.py
@pytest.fixture(scope="module")
def dense_logits(vit_ti, photos):
    assert not is_patched(vit_ti)
    with torch.no_grad():
        return vit_ti(photos)


@pytest.fixture(scope="module")
def vit_ti64(vit_ti):
    """The real ViT-Ti in float64: exact-comparison tests then test the engine, not float32
    rounding (logits reach ~20, where float32 noise alone is ~1e-5 after 12 blocks)."""
    return copy.deepcopy(vit_ti).double()


@pytest.fixture
def ti64(vit_ti64):
    yield from unpatched_during(vit_ti64)


# --------------------------------------------------------------------------- real ViT-Ti
def test_real_r0_and_unpatch_are_exact(ti, photos, dense_logits):
    classes = (type(ti), [type(b) for b in ti.blocks], [type(b.attn) for b in ti.blocks])
    state = {k: v.clone() for k, v in ti.state_dict().items()}
    with torch.no_grad():
        for method in ("tome", "spatial", "dsm"):
            patch(ti, method, r=0)
            assert torch.equal(ti(photos), dense_logits), method
        patch(ti, "tome", r=8)
        merged = ti(photos)
        assert not torch.allclose(merged, dense_logits)  # merging does something
        assert is_patched(ti)
        unpatch(ti)
        assert torch.equal(ti(photos), dense_logits)
    assert not is_patched(ti)
    assert (type(ti), [type(b) for b in ti.blocks], [type(b.attn) for b in ti.blocks]) == classes
    assert type(ti) is VisionTransformer and all(type(b) is Block and type(b.attn) is Attention for b in ti.blocks)
    assert not any(hasattr(m, "_dsm_state") for m in ti.modules())
    assert ti.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in ti.state_dict().items())
    assert unpatch(ti) is ti  # no-op on an unpatched model


@pytest.mark.parametrize("method,r", [("tome", 13), ("tome", (8, -1.0)), ("spatial", 8), ("dsm", 16)])
def test_real_token_counts_and_class_token(ti, photos, method, r):
    patch(ti, method, r=r, trace_source=True)
    with torch.no_grad(), record_blocks(ti) as log:
        logits = ti(photos)
    assert logits.shape == (8, 1000) and torch.isfinite(logits).all()
    assert log["tokens"] == schedule(ti).tokens
    assert log["tokens"][-1] < 197
    source = ti._dsm_state.source
    assert source.shape == (8, log["tokens"][-1], 197)
    assert torch.equal(source[:, 0], torch.eye(197)[0].expand(8, -1))  # class token: itself, first
    assert torch.equal(source.sum(1), torch.ones(8, 197))  # a partition of the input tokens
    assert torch.equal(source.sum(-1, keepdim=True), ti._dsm_state.size)
    _, groups = dsm_lite.trace_sources(ti, photos[:2])
    assert groups.shape == (2, 14, 14) and groups.max() < log["tokens"][-1] - 1


@pytest.mark.parametrize("method,r", [("tome", 13), ("spatial", 8), ("dsm", 16)])
def test_real_batch_independence(ti64, photos, method, r):
    photos = photos.double()
    patch(ti64, method, r=r)
    with torch.no_grad():
        batch = ti64(photos[:4])
        for i in range(4):
            torch.testing.assert_close(ti64(photos[i:i + 1]), batch[i:i + 1], rtol=0, atol=1e-5)
        # and with other companions in the batch
        torch.testing.assert_close(ti64(photos[[5, 2, 7]])[1], batch[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,r", [("tome", 13), ("dsm", 16)])
def test_real_sdpa_equals_explicit_attention(ti64, photos, method, r):
    patch(ti64, method, r=r)
    out = {}
    with torch.no_grad():
        for fused in (True, False):
            for blk in ti64.blocks:
                blk.attn.fused_attn = fused
            out[fused] = ti64(photos.double())
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- reference forward
VARIANTS = {
    "plain": {},
    "registers": dict(reg_tokens=4),
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "avg_pool_cls": dict(global_pool="avg"),
    "avg_pool_no_cls": dict(global_pool="avg", class_token=False),
    "no_embed_class_reg": dict(reg_tokens=2, no_embed_class=True),
    "pre_norm": dict(pre_norm=True),
    "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True, qkv_bias=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("r", [5, [9, 0, 4, 6], (5, -1.0)])
def test_tome_equals_naive_forward(variant, r):
    model = small_vit(seed=1, dtype=torch.float64, **VARIANTS[variant])
    x = images(3, seed=2, dtype=torch.float64)
    patch(model, "tome", r=r, trace_source=True)
    with torch.no_grad(), record_blocks(model) as log:
        got = model(x)
    r_list = schedule(model).r
    ref, counts, ref_src = reference_vit_forward(model, x, dsm_lite.parse_r(4, r))
    assert log["tokens"] == counts == schedule(model).tokens
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert source_sets(model._dsm_state.source) == [[frozenset(s) for s in img] for img in ref_src]
    p = model.num_prefix_tokens
    assert torch.equal(model._dsm_state.source[:, :p], torch.eye(model._dsm_state.source.shape[-1])[:p].expand(3, -1, -1))
    assert sum(r_list) > 0


@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_naive_forward_prop_attn_and_distilled(prop_attn):
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                       mlp_ratio=2.0, num_classes=10).eval().double()
    x = images(2, seed=4, dtype=torch.float64)
    patch(model, "tome", r=7, prop_attn=prop_attn, trace_source=True)
    with torch.no_grad():
        got = model(x)
    ref, _, ref_src = reference_vit_forward(model, x, [7] * 4, prop_attn=prop_attn)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert source_sets(model._dsm_state.source) == [[frozenset(s) for s in img] for img in ref_src]


def test_avg_pool_is_size_weighted():
    for kwargs in (dict(global_pool="avg"), dict(global_pool="avg", class_token=False, reg_tokens=2),
                   dict(global_pool="avg", pool_include_prefix=True, reg_tokens=1)):
        model = small_vit(seed=3, **kwargs)
        x = images(2, seed=5)
        patch(model, "tome", r=6)
        with torch.no_grad():
            logits = model(x)
            feats = model.forward_features(x)
            size = model._dsm_state.size
            p = 0 if kwargs.get("pool_include_prefix") else model.num_prefix_tokens
            assert size.shape[1] == feats.shape[1] and not (size == 1).all()
            pooled = (feats[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)
            manual = model.head(model.fc_norm(pooled))
            plain_mean = model.head(model.fc_norm(feats[:, p:].mean(1)))
        torch.testing.assert_close(logits, manual, rtol=0, atol=1e-6)
        assert not torch.allclose(logits, plain_mean, atol=1e-4)


def test_sdpa_equals_explicit_small():
    model = small_vit(seed=2, dtype=torch.float64, depth=6)
    x = images(3, seed=1, dtype=torch.float64)
    for method, r in (("tome", 6), ("dsm", 6), ("spatial", 5)):
        patch(model, method, r=r, window=3)
        out = []
        for fused in (True, False):
            for blk in model.blocks:
                blk.attn.fused_attn = fused
            with torch.no_grad():
                out.append(model(x))
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-10)


def test_attention_bias_is_log_size():
    model = small_vit(seed=0)
    patch(model, "tome", r=6)
    seen = []

    def hook(module, args):
        bias = dsm_lite.attention_bias(module)
        size = model._dsm_state.size
        seen.append(None if bias is None else (bias.shape, torch.equal(bias, size.log()[:, None, None, :, 0])))
        assert size is None or bias.shape[-1] == args[0].shape[1]

    handles = [b.attn.register_forward_pre_hook(hook) for b in model.blocks]
    with torch.no_grad():
        model(images(2))
    for h in handles:
        h.remove()
    assert seen[0] is None and all(s is not None and s[1] for s in seen[1:])
    patch(model, "tome", r=6, prop_attn=False)
    assert dsm_lite.attention_bias(model.blocks[2].attn) is None
    assert dsm_lite.attention_bias(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [5, 16, 181])
def test_sized_sdpa_bias_is_aligned_log_size(monkeypatch, n, dtype):
    """The size bias reaches SDPA as log(size) in q's dtype, (B, 1, 1, N), in rows padded to
    a multiple of 16 elements (the fused GPU kernels' alignment), and the attention equals
    softmax(q k^T / sqrt(d) + log s) v written out."""
    from dsm_lite.patching import sized_sdpa
    g = torch.Generator().manual_seed(n)
    b, h, d = 3, 2, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
    size = torch.randint(1, 40, (b, n, 1), generator=g).float()
    seen = {}
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen["mask"] = kwargs["attn_mask"]
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = sized_sdpa(q, k, v, size)
    mask = seen["mask"]
    assert mask.shape == (b, 1, 1, n) and mask.dtype == dtype
    assert all(s % 16 == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1
    assert torch.equal(mask, size.log().view(b, 1, 1, n).to(dtype))
    qd, kd, vd = q.double(), k.double(), v.double()
    logits = qd @ kd.transpose(-2, -1) / d ** 0.5 + mask.double()
    want = logits.softmax(-1) @ vd
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)
    # no sizes: plain attention, no mask at all
    sized_sdpa(q, k, v, None)
    assert seen["mask"] is None


# --------------------------------------------------------------------------- token counts, MACs
@pytest.mark.parametrize("kwargs", [
    dict(method="tome", r=0), dict(method="tome", r=3), dict(method="tome", r=100),
    dict(method="tome", r=[5, 0, 5]), dict(method="tome", r=(6, -0.5)),
    dict(method="spatial", r=4, window=3), dict(method="dsm", r=6, window=3),
    dict(method="dsm", r=6, window=3, local_blocks=1), dict(method="dsm", r=6, delay=0, window=2, window_growth=0),
    dict(method="tome", r=5, feature="q"), dict(method="tome", r=5, feature="v"),
    dict(method="dsm", r=5, feature="x", window=3), dict(method="tome", r=5, reduction="prune"),
    dict(method="dsm", r=5, reduction="prune"),
], ids=str)
def test_count_macs_equals_schedule_and_token_counts(kwargs):
    model = small_vit(seed=0)
    patch(model, **kwargs)
    sched = schedule(model)
    assert count_macs(model, SMALL) == sched.macs
    with torch.no_grad(), record_blocks(model) as log:
        out = model(images(2))
    assert torch.isfinite(out).all()
    assert log["tokens"] == sched.tokens
    assert sched.tokens == schedule(small_vit(seed=0), grid=None, **kwargs).tokens  # same plan unpatched


def test_count_macs_random_feature():
    """feature='random' draws a 64-channel metric: its matching matmul must be counted as such."""
    model = small_vit(seed=0)  # head_dim 16, so a 64-d random feature differs from head_dim
    for kwargs in (dict(method="tome", r=6), dict(method="dsm", r=6, window=3)):
        patch(model, feature="random", **kwargs)
        assert count_macs(model, SMALL) == schedule(model).macs, kwargs


def test_count_macs_anchors_deit_small():
    model = timm.create_model("deit_small_patch16_224").eval()
    dense = count_macs(model)
    assert abs(dense / 1e9 - 4.60) <= 0.01
    assert dense == schedule(model, "tome", 0).macs
    patch(model, "tome", r=13)
    tome = count_macs(model)
    assert abs(tome / 1e9 - 2.71) <= 0.01
    assert tome == schedule(model).macs
    patch(model, "dsm", r=16)
    assert count_macs(model) == schedule(model).macs


# --------------------------------------------------------------------------- variants
def test_distilled_deit_tiny():
    model = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    assert model.num_prefix_tokens == 2
    x = images(2, size=224)
    patch(model, "tome", r=13, trace_source=True)
    with torch.no_grad(), record_blocks(model) as log:
        out = model(x)
    ref, counts, _ = reference_forward_for_schedule(model, x[:1])  # both heads, averaged, by hand
    torch.testing.assert_close(out[:1], ref, rtol=0, atol=1e-5)
    assert log["tokens"] == schedule(model).tokens == counts and log["tokens"][0] == 198
    src = model._dsm_state.source
    assert torch.equal(src[:, :2], torch.eye(198)[:2].expand(2, -1, -1))  # class, dist tokens first
    patch(model, "dsm", r=16, trace_source=True)
    with torch.no_grad(), record_blocks(model) as log:
        model(x)
    assert log["tokens"] == schedule(model).tokens and schedule(model).local_blocks >= 1
    assert torch.equal(model._dsm_state.source[:, :2], torch.eye(198)[:2].expand(2, -1, -1))
    assert count_macs(model) == schedule(model).macs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["spatial", "dsm"])
def test_variants_run_spatial_methods(variant, method):
    model = small_vit(seed=0, depth=5, dtype=torch.float64, **VARIANTS[variant])
    patch(model, method, r=5, window=3, trace_source=True)
    p = model.num_prefix_tokens
    x = images(2, dtype=torch.float64)
    with torch.no_grad(), record_blocks(model) as log:
        out = model(x)
    ref, counts, ref_src = reference_forward_for_schedule(model, x)  # the hand-written forward
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert source_sets(model._dsm_state.source) == [[frozenset(s) for s in img] for img in ref_src]
    assert log["tokens"] == counts == schedule(model).tokens and schedule(model).local_blocks > 0
    src = model._dsm_state.source
    assert torch.equal(src[:, :p], torch.eye(src.shape[-1])[:p].expand(2, -1, -1))
    if method == "dsm":  # one MAC trace per variant (LayerScale, qk_norm, avg pool... are counted)
        assert count_macs(model, SMALL) == schedule(model).macs


def test_dynamic_img_size():
    """A dynamic-size ViT gets a schedule per grid."""
    model = small_vit(seed=0, dynamic_img_size=True)
    patch(model, "dsm", r=6, delay=1, window=3, trace_source=True)
    for hw in ((64, 64), (80, 56), (64, 64)):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad(), record_blocks(model) as log:
            model(x)
        sched = schedule(model)
        grid = (hw[0] // 8, hw[1] // 8)
        assert model._dsm_state.grid == grid and sched.shape.grid == grid
        assert log["tokens"] == sched.tokens and sched.tokens[0] == 1 + grid[0] * grid[1]
        assert sched.local_blocks >= 1 and check_partition(model, 2)
    assert count_macs(model, (3, 80, 56)) == schedule(model, "dsm", 6, grid=(10, 7), delay=1, window=3).macs


def test_count_macs_leaves_plain_schedule_on_dynamic_models():
    model = small_vit(seed=0, dynamic_img_size=True)
    patch(model, "dsm", r=6, delay=1, window=3)
    expected = schedule(model, "dsm", 6, grid=(10, 7), delay=1, window=3)
    count_macs(model, (3, 80, 56))
    after = schedule(model)  # the schedule of the last (traced) input
    assert all(type(v) is int for b in after.blocks for v in (b.tokens_in, b.tokens_out, b.macs)), after.blocks[1]
    assert after.tokens == expected.tokens and model._dsm_state.grid == (10, 7)


def check_partition(model, b):
    """Sizes and sources account for every input token exactly once."""
    st = model._dsm_state
    n0 = st.source.shape[-1]
    assert torch.equal(st.source.sum(1), torch.ones(b, n0))
    assert torch.equal(st.source.sum(-1, keepdim=True), st.size)
    return True


# --------------------------------------------------------------------------- state reset
@pytest.mark.parametrize("kwargs", [dict(global_pool="avg"), dict(reg_tokens=2)])
@pytest.mark.parametrize("method", ["tome", "dsm"])
def test_state_reset_between_calls(kwargs, method):
    base = small_vit(seed=4, **kwargs)
    xa, xb = images(2, seed=1), images(3, seed=2)

    def fresh(call, x):
        m = patch(copy.deepcopy(base), method, r=5, window=3, trace_source=True)
        with torch.no_grad():
            return call(m, x)

    calls = {
        "forward": lambda m, x: m(x),
        "features": lambda m, x: m.forward_features(x),
        "intermediates": lambda m, x: m.forward_intermediates(x, output_fmt="NLC"),
        "head_of_features": lambda m, x: m.forward_head(m.forward_features(x)),
        "get_intermediate_layers": lambda m, x: m.get_intermediate_layers(x, n=2),
    }
    expected = {(name, i): fresh(call, x) for name, call in calls.items() for i, x in enumerate((xa, xb))}
    model = patch(copy.deepcopy(base), method, r=5, window=3, trace_source=True)
    order = ["forward", "intermediates", "features", "forward", "get_intermediate_layers",
             "head_of_features", "intermediates", "forward", "features"]
    with torch.no_grad():
        for step, name in enumerate(order):
            i = step % 2
            got = calls[name](model, (xa, xb)[i])
            torch.testing.assert_close(got, expected[(name, i)], rtol=0, atol=0, msg=f"{name} at step {step}")


def test_forward_intermediates_nchw():
    model = small_vit(seed=0)
    x = images(2)
    with torch.no_grad():
        dense = model.forward_intermediates(x)  # NCHW
        patch(model, "tome", r=0)
        same = model.forward_intermediates(x)
        torch.testing.assert_close(same, dense, rtol=0, atol=0)
        patch(model, "tome", r=4)
        for call in (lambda: model.forward_intermediates(x), lambda: model.forward_intermediates(x, output_fmt="NCHW"),
                     lambda: model.get_intermediate_layers(x, n=2, reshape=True)):
            with pytest.raises(ValueError, match="NLC"):
                call()
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        assert [t.shape[1] for t in inter] == [t - 1 for t in schedule(model).tokens[1:]]
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input
def _fingerprint(model):
    return (type(model), [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()},
            sorted(k for k in vars(model) if k.startswith("_dsm")))


def _same(a, b):
    return a[0] is b[0] and a[1] == b[1] and a[3] == b[3] and a[2].keys() == b[2].keys() and \
        all(torch.equal(v, b[2][k]) for k, v in a[2].items())


def test_not_a_vit_is_rejected_unchanged():
    for model in (timm.create_model("resnet18").eval(), torch.nn.Linear(3, 3), small_vit(global_pool="max")):
        before = _fingerprint(model)
        with pytest.raises(TypeError, match="VisionTransformer|global_pool"):
            patch(model, "tome", r=4)
        assert not is_patched(model) and _same(_fingerprint(model), before)
    with pytest.raises(TypeError):
        schedule(timm.create_model("resnet18"), "tome", 4)


BAD_OPTIONS = [
    dict(method="bogus", r=4), dict(method="tome", r=4, feature="z"), dict(method="tome", r=-1),
    dict(method="tome", r=[1, -2]), dict(method="spatial", r=4, delay=2), dict(method="tome", r=4, reduction="drop"),
    dict(method="dsm", r=4, window=0), dict(method="dsm", r=4, delay=-1), dict(method="tome", r=[1] * 5),
]


@pytest.mark.parametrize("kwargs", BAD_OPTIONS, ids=str)
def test_bad_options_leave_unpatched_model_unchanged(kwargs):
    model = small_vit(seed=0)
    x = images(2)
    with torch.no_grad():
        dense = model(x)
    before = _fingerprint(model)
    with pytest.raises(ValueError):
        patch(model, **kwargs)
    assert not is_patched(model) and _same(_fingerprint(model), before)
    with torch.no_grad():
        assert torch.equal(model(x), dense)
    with pytest.raises(ValueError):
        schedule(model, **kwargs)


@pytest.mark.parametrize("kwargs", BAD_OPTIONS, ids=str)
def test_bad_options_keep_previous_patch(kwargs):
    model = small_vit(seed=0)
    x = images(2)
    patch(model, "dsm", r=5, window=3)
    with torch.no_grad():
        before_out = model(x)
    before = _fingerprint(model)
    before_sched = schedule(model)
    with pytest.raises(ValueError):
        patch(model, **kwargs)
    assert is_patched(model), "a rejected patch() call removed the previous patch"
    assert _same(_fingerprint(model), before) and schedule(model) is before_sched
    with torch.no_grad():
        assert torch.equal(model(x), before_out)


def test_repatch_replaces_options():
    model = small_vit(seed=0)
    x = images(2)
    patch(model, "tome", r=3)
    patch(model, "dsm", r=5, window=3)
    fresh = patch(small_vit(seed=0), "dsm", r=5, window=3)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert type(model).__mro__[1] is VisionTransformer  # patched once, not twice
    unpatch(model)
    assert type(model) is VisionTransformer


def test_trace_sources_after_block():
    model = small_vit(seed=0)
    x = images(2)
    patch(model, "dsm", r=6, delay=1, window=3, trace_source=True)
    with torch.no_grad(), record_blocks(model) as log:
        logits = model(x)
    p, (h, w) = 1, model.patch_embed.grid_size
    for k in range(4):
        out, groups = dsm_lite.trace_sources(model, x, after_block=k)
        assert torch.equal(out, logits) and groups.shape == (2, h, w)
        src = log["source_out"][k]
        if src is None:  # block 0 of DSM (delay 1) merges nothing
            assert torch.equal(groups.flatten(1), torch.arange(h * w).expand(2, -1))
            continue
        assert torch.equal(groups.flatten(1), src[:, p:, p:].argmax(1))
        assert groups.flatten(1).max() == src.shape[1] - p - 1
    assert torch.equal(dsm_lite.trace_sources(model, x)[1], dsm_lite.trace_sources(model, x, after_block=3)[1])
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="after_block"):
            dsm_lite.trace_sources(model, x, after_block=bad)
    assert model._dsm_state.trace_source is True
    unpatch(model)
    with pytest.raises(ValueError, match="patched"):
        dsm_lite.trace_sources(model, x)


def test_trace_sources_per_block_equals_one_trace_per_block():
    from dsm_lite.patching import trace_sources_per_block
    model = small_vit(seed=0)
    x = images(2)
    for method, kw in (("dsm", dict(delay=1, window=3)), ("tome", {})):
        patch(model, method, r=6, **kw)
        logits, groups = trace_sources_per_block(model, x)
        assert groups.shape == (len(model.blocks), 2, *model.patch_embed.grid_size)
        for k in range(len(model.blocks)):
            out, want = dsm_lite.trace_sources(model, x, after_block=k)
            assert torch.equal(out, logits) and torch.equal(groups[k], want)
        assert model._dsm_state.trace_source is False  # restored
    unpatch(model)
    with pytest.raises(ValueError, match="patched"):
        trace_sources_per_block(model, x)


# --------------------------------------------------------------------------- features, pruning
def test_random_feature_is_deterministic():
    model = small_vit(seed=0)
    x, y = images(2, seed=1), images(2, seed=2)
    patch(model, "tome", r=6, feature="random", seed=3)
    with torch.no_grad():
        a = model(x)
        model(y)
        b = model(x)
        c = patch(copy.deepcopy(model), "tome", r=6, feature="random", seed=3)(x)
        d = patch(copy.deepcopy(model), "tome", r=6, feature="random", seed=4)(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)


@pytest.mark.parametrize("feature", ["k", "q", "v", "x", "random"])
@pytest.mark.parametrize("method", ["tome", "dsm"])
def test_features_run(feature, method):
    """Each similarity feature: the forward of the hand-written reference merging on that
    feature (keys/queries/values averaged over heads, or the block input); the random
    feature, which only the engine can draw, must still partition the tokens."""
    model = small_vit(seed=0, dtype=torch.float64)
    patch(model, method, r=6, feature=feature, window=3, trace_source=True)
    x = images(2, dtype=torch.float64)
    with torch.no_grad(), record_blocks(model) as log:
        out = model(x)
    assert log["tokens"] == schedule(model).tokens
    if feature == "random":
        assert check_partition(model, 2)
        return
    ref, counts, ref_src = reference_forward_for_schedule(model, x, feature=feature)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert counts == log["tokens"]
    assert source_sets(model._dsm_state.source) == [[frozenset(s) for s in img] for img in ref_src]


def test_features_select_different_merges():
    """One merge of 20 tokens in block 0: the groups are the reference's for each feature
    (and the features do not all agree)."""
    model = small_vit(seed=0, dtype=torch.float64)
    x = images(2, dtype=torch.float64)
    groups = {}
    for feature in ("k", "q", "v", "x"):
        patch(model, "tome", r=[20], feature=feature)
        got = dsm_lite.trace_sources(model, x)[1].flatten(1)
        _, _, ref_src = reference_forward_for_schedule(model, x, feature=feature)
        for img, src in zip(got.tolist(), ref_src):  # the same partition of the 64 patches
            want = {frozenset(t - 1 for t in s) for s in src if 0 not in s}
            assert {frozenset(i for i, g in enumerate(img) if g == k) for k in set(img)} == want, feature
        groups[feature] = tuple(got.flatten().tolist())
    assert len(set(groups.values())) > 1


@pytest.mark.parametrize("method", ["tome", "spatial", "dsm"])
def test_prune_runs_and_drops(method):
    """Each block keeps exactly the tokens the naive pruning keeps: all but the r whose keys
    (averaged over heads, recomputed here head by head) have the lowest norm."""
    model = small_vit(seed=0)
    x = images(2)
    patch(model, method, r=7, reduction="prune", trace_source=True)
    normed = []
    hooks = [b.norm1.register_forward_hook(lambda m, a, out: normed.append(out)) for b in model.blocks]
    try:
        with torch.no_grad(), record_blocks(model) as log:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    st = model._dsm_state
    assert log["tokens"] == schedule(model).tokens
    for i, (blk, h, r) in enumerate(zip(model.blocks, normed, schedule(model).r)):
        c, nh = h.shape[-1], blk.attn.num_heads
        keys = h @ blk.attn.qkv.weight[c:2 * c].T + blk.attn.qkv.bias[c:2 * c]
        metric = sum(keys[..., j * (c // nh):(j + 1) * (c // nh)] for j in range(nh)) / nh
        kept = reference_prune(metric, r, 1)
        src_in = log["source_in"][i] if log["source_in"][i] is not None else torch.eye(65).expand(2, -1, -1)
        if r == 0:  # e.g. DSM's delay: nothing dropped yet
            assert log["source_out"][i] is None or torch.equal(log["source_out"][i], src_in)
            continue
        for b in range(2):
            assert torch.equal(log["source_out"][i][b], src_in[b, kept[b]]), (i, b)
    assert (st.size == 1).all()  # pruning drops, never merges
    assert torch.equal(st.source.sum(-1), torch.ones_like(st.source.sum(-1)))
    assert torch.equal(st.source[:, 0], torch.eye(65)[0].expand(2, -1))
    assert schedule(model).local_blocks == 0


def test_trace_windows_follows_anchors():
    """Every patch sits in the window of its token's anchor: a group is never split between
    windows, holds exactly one anchor, and at the first local block (nothing merged yet)
    the windows are the raster squares."""
    from dsm_lite.patching import trace_windows
    from dsm_lite.windows import window_ids

    model = small_vit(seed=0, depth=4)
    grid = tuple(model.patch_embed.grid_size)
    patch(model, "spatial", r=6, window=2, windows="joint")
    sched = schedule(model)
    local = [b for b in sched.blocks if b.mode == "local"]
    assert len(local) >= 2, "the test needs merges between two local blocks"
    images = torch.randn(3, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    traced = trace_windows(model, images)
    assert traced["blocks"].tolist() == [b.index for b in local]
    positions = torch.arange(grid[0] * grid[1])
    first = window_ids(positions[None], grid, local[0].window).view(*grid)
    assert torch.equal(traced["window"][0], first.expand(3, *grid)) and traced["anchor"][0].all()
    for t, step in enumerate(local):
        win, anchor, groups = traced["window"][t], traced["anchor"][t], traced["groups"][t]
        raster = window_ids(positions[None], grid, step.window).view(*grid)
        for i in range(3):
            for g in groups[i].unique():
                members = groups[i] == g
                assert win[i][members].unique().numel() == 1  # one window per token
                assert anchor[i][members].sum() == 1  # one anchor per token
                assert win[i][members & anchor[i]] == raster[members & anchor[i]]  # the anchor's window
    assert not torch.equal(traced["groups"][-1], traced["groups"][0])  # merges did happen


@pytest.mark.parametrize("kwargs", [dict(method="tome"), dict(method="spatial", windows="paper"), None])
def test_trace_windows_needs_joint_windows(kwargs):
    from dsm_lite.patching import trace_windows

    model = small_vit(seed=0)
    if kwargs is not None:
        patch(model, r=4, **kwargs)
    with pytest.raises(ValueError):
        trace_windows(model, torch.randn(1, 3, *model.patch_embed.img_size))


@pytest.mark.parametrize("method", ["tome", "spatial", "dsm"])
def test_training_step_through_a_patched_model(method):
    """A backward pass through every method (merging is trainable, as ToMe is): no in-place
    error, finite gradients that reach the first block."""
    model = small_vit(seed=0).train()
    patch(model, method, r=4)
    model(torch.randn(2, 3, *model.patch_embed.img_size)).logsumexp(-1).sum().backward()
    grad = model.blocks[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unpatched_is_temporarily_dense_and_restores_the_patch_even_on_error():
    """patching.unpatched: dense inside (bit for bit the unpatched model), the same patch
    (options and outputs) after, also when the block raises; a no-op on an unpatched model."""
    model = small_vit(seed=0)
    x = images(2)
    with torch.no_grad():
        dense = model(x)
    patch(model, "dsm", r=5, window=3, delay=1)
    settings = dsm_lite.patching.patch_settings(model)
    with torch.no_grad():
        merged = model(x)
        with dsm_lite.unpatched(model) as inside:
            assert inside is model and not dsm_lite.is_patched(model)
            assert torch.equal(model(x), dense)
        assert dsm_lite.patching.patch_settings(model) == settings and torch.equal(model(x), merged)
        with pytest.raises(RuntimeError, match="boom"):
            with dsm_lite.unpatched(model):
                raise RuntimeError("boom")
        assert dsm_lite.patching.patch_settings(model) == settings
    unpatch(model)
    with dsm_lite.unpatched(model):
        pass
    assert not dsm_lite.is_patched(model)


def test_patch_keywords_are_the_merge_options():
    """patch() spells its options out (for help() and type checkers) and builds MergeOptions
    from them: the two lists, and their defaults, are the same."""
    import dataclasses
    import inspect

    params = {k: p.default for k, p in inspect.signature(patch).parameters.items()
              if p.kind == p.KEYWORD_ONLY}
    fields = {f.name: f.default for f in dataclasses.fields(dsm_lite.MergeOptions)
              if f.name not in ("method", "r")}
    assert params == fields
    model = patch(small_vit(seed=0), "dsm", r=5, window=3, delay=1, feature="v", backend="eager")
    assert dsm_lite.patching.patch_settings(model) == dict(dsm_lite.MergeOptions(
        "dsm", 5, window=3, delay=1, feature="v", backend="eager").as_dict())
