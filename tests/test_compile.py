"""torch.compile on patched models: whole-graph capture for every option, inductor against
eager, recompilation when the patch changes, and the inputs a merged model refuses.

The compile tests are marked ``slow`` (deselect with ``-m "not slow"``) but run by default.
Dynamo's capture is checked with the ``eager`` backend (the captured graph run op by op),
which proves ``fullgraph=True`` for every option at a fraction of inductor's cost; one test
compiles with inductor (C++ on CPU) and compares logits with eager.
"""
from __future__ import annotations

import pytest
import torch

import dsm_lite
from dsm_lite import patch, unpatch

from reference import small_vit
from reference import single_thread  # noqa: F401  (autouse fixture)


def images(b=2, seed=0, size=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g).to(dtype)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def dsm_kw(method):
    return dict(delay=1) if method == "dsm" else {}


# every method, and every option across them (feature="random" is the documented exception):
# features k (default), q, v, x; pruning; no proportional attention; source tracing; ToMe's
# (r, inflection) schedule
OPTIONS = [
    ("tome", dict(r=8)), ("tome", dict(r=(8, 0.5), feature="x")),
    ("spatial", dict(r=8, feature="q", trace_source=True)), ("dsm", dict(r=8)),
    ("dsm", dict(r=8, reduction="prune")), ("dsm", dict(r=8, feature="v", prop_attn=False)),
]


@pytest.mark.slow
def test_fullgraph_capture_every_option():
    """No graph break for any method or option: fullgraph=True captures the whole forward
    (schedule, window layouts and matching included) and the graph reproduces eager."""
    model = small_vit(depth=2)
    x = images()
    for method, kw in OPTIONS:
        patch(model, method, **kw, **dsm_kw(method))
        torch._dynamo.reset()
        with torch.no_grad():
            want = model(x)
            got = torch.compile(model, backend="eager", fullgraph=True)(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{method} {kw}")


def test_compiled_forward_caches_no_traced_tensor():
    """Per-model caches hold tensors made in eager mode only: a tensor made inside a traced
    forward would be an output of the compiled graph, which torch.compile's CUDA graphs
    ("reduce-overhead") overwrite at the next replay (seen on an H100 with paper windows)."""
    model = small_vit(depth=2)
    patch(model, "dsm", r=8, delay=0, windows="paper")
    st = model._dsm_state
    with torch.no_grad():
        torch.compile(model, backend="eager", fullgraph=True)(images())
    assert st._square_ids == {} and st._prepared_cache == {}
    with torch.no_grad():
        model(images())  # eager: cached for the next call
    assert len(st._square_ids) > 0


@pytest.mark.slow
def test_avg_pool_and_no_class_token_capture():
    model = small_vit(depth=2, class_token=False, global_pool="avg")
    x = images()
    patch(model, "dsm", r=8, delay=1)
    with torch.no_grad():
        got = torch.compile(model, backend="eager", fullgraph=True)(x)
        torch.testing.assert_close(got, model(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_inductor_matches_eager():
    """Inductor (C++ kernels on CPU) compiles a merged model whole (a local and a global
    block, proportional attention, size-weighted merges) and matches eager to 1e-4."""
    model = small_vit(depth=2)
    x = images(b=3)
    patch(model, "spatial", r=6)
    assert [b.mode for b in dsm_lite.schedule(model).blocks] == ["local", "global"]
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_repatching_recompiles():
    """The schedule is baked into the compiled graph; dynamo's guards notice a new patch
    (another r or method, or unpatching) and recompile instead of running a stale graph."""
    model = small_vit(depth=2)
    x = images()
    patch(model, "tome", r=4)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        first = compiled(x)
        for method, r in (("tome", 12), ("dsm", 8)):
            patch(model, method, r=r, **dsm_kw(method))
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)
        assert not torch.allclose(compiled(x), first)
        unpatch(model)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_random_feature_is_not_fullgraph():
    """feature="random" draws from a per-forward seeded torch.Generator (reproducible
    ablations), which dynamo cannot trace: fullgraph fails; without it, it compiles with
    graph breaks and still matches eager."""
    model = small_vit(depth=2)
    x = images()
    patch(model, "tome", r=8, feature="random")
    with torch.no_grad(), pytest.raises(Exception, match="(?i)generator|opaque"):
        torch.compile(model, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), model(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("r", [torch.tensor(8), torch.tensor([8, 4]), [torch.tensor(8)] * 2])
def test_tensor_r_is_rejected(r):
    """r fixes every block's token count before any image is seen (batching and compiled
    graphs need that); a tensor r, per image or not, is one clear TypeError."""
    model = small_vit(depth=2)
    with pytest.raises(TypeError, match="Python int"):
        patch(model, "tome", r=r)
    assert not dsm_lite.is_patched(model)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_unsupported_dtype_is_one_clear_error(dtype):
    model = patch(small_vit(depth=2), "dsm", r=8, delay=1)
    with torch.no_grad(), pytest.raises(TypeError, match="bfloat16.*got images of dtype"):
        model(images().to(dtype))
