"""The benchmarking oracle: a schedule's token counts, no matching."""
from __future__ import annotations

import pytest
import torch

import dsm_lite
from dsm_lite.measure import TruncationOracle

from reference import small_vit
from reference import single_thread  # noqa: F401  (autouse fixture)


def images(b=2):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tokens_seen(model, fn, x):
    """Tokens entering each block's attention and MLP during fn(x)."""
    seen = []
    hooks = [blk.mlp.register_forward_pre_hook(lambda m, a: seen.append(("mlp", a[0].shape[1])))
             for blk in model.blocks]
    hooks += [blk.norm1.register_forward_pre_hook(lambda m, a: seen.append(("attn", a[0].shape[1])))
              for blk in model.blocks]
    try:
        with torch.no_grad():
            fn(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("method,r", [("tome", 8), ("spatial", 6), ("dsm", 12)])
def test_oracle_runs_the_merged_token_counts(method, r):
    model = small_vit()
    x = images()
    sched = dsm_lite.schedule(model, method, r, **(dict(delay=1) if method == "dsm" else {}))
    oracle = TruncationOracle(model, sched)
    want = [(k, n) for b in sched.blocks for k, n in (("attn", b.tokens_in), ("mlp", b.tokens_out))]
    assert tokens_seen(model, oracle, x) == want
    dsm_lite.patch(model, method, r=r, **(dict(delay=1) if method == "dsm" else {}))
    assert tokens_seen(model, model, x) == want  # the merged model, for comparison
    # patched or not, the oracle runs the plain modules: same output
    with torch.no_grad():
        patched = oracle(x)
        dsm_lite.unpatch(model)
        torch.testing.assert_close(oracle(x), patched, rtol=0, atol=0)


def test_oracle_without_reduction_is_the_dense_model():
    model = small_vit()
    x = images()
    with torch.no_grad():
        assert torch.equal(TruncationOracle(model, dsm_lite.schedule(model, "tome", 0))(x), model(x))


def test_oracle_rejects_a_schedule_of_another_model():
    model = small_vit()
    with pytest.raises(ValueError, match="blocks"):
        TruncationOracle(model, dsm_lite.schedule(small_vit(depth=2), "tome", 4))
    with pytest.raises(ValueError, match="tokens"):
        TruncationOracle(model, dsm_lite.schedule(small_vit(img_size=32), "tome", 4))
