"""The fused Triton backend (dsm_lite.fused_merge) against the eager engine, on the CPU.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before anything loads them), on CPU tensors. There the kernels' arithmetic is
numpy's float32 and the eager engine's is torch's, so the tests ask for more than the
issue's "same decisions, same outputs to float32 rounding": the same index tensors (``src``,
``dst``, ``keep``, in the same order) and the same outputs to the bit, for every matching
mode, prefix length, dtype and option, on random and real inputs. One test constructs
exact ties (one-hot features, whose similarities are exactly 0 or 1 in any summation
order) to check the stable tie-break. On a GPU, ``benchmarks/fused_exactness.py`` repeats
the comparison with compiled kernels.

The bad inputs each get one clear error: no Triton, CPU tensors with the interpreter off
(in a subprocess, since the interpreter is chosen when the kernels load), float64, too
many tokens, an r out of range, an unknown backend.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dsm_lite
from dsm_lite import fused_merge as fused
from dsm_lite import merging, windows
from dsm_lite.fused_merge import GLOBAL, JOINT, PAPER, PRUNE, fused_merge

from reference import reference_tome_merge, small_vit
from reference import single_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not fused.triton_available(), reason="Triton does not import")
needs_interpreter = pytest.mark.skipif(
    not (fused.triton_available() and fused._kernels().INTERPRETED),
    reason="these tests run the kernels on CPU tensors, in Triton's interpreter")


def same_merge(got: merging.Merge, want: merging.Merge) -> None:
    for name in ("src", "dst", "keep"):
        w = getattr(want, name)
        if w is None:
            assert getattr(got, name) is None, name
        else:
            assert torch.equal(getattr(got, name), w), name


def check(x, size, metric, r, p, **kw):
    """fused_merge against the eager engine (fused_merge.eager_merge) for the same arguments:
    the same index tensors, outputs and sizes to the bit, and the survivors' anchors."""
    xo, so, got, anchors = fused_merge(x, size, metric, r, p, **kw)
    xe, se, want, kept = fused.eager_merge(x, size, metric, r, p, **kw)
    same_merge(got, want)
    assert (anchors is None) == (kept is None) == (kw.get("mode") != JOINT)
    if kept is not None:  # the survivors' anchors, as the eager block gathers them
        assert torch.equal(anchors, kept)
    assert xo.dtype == x.dtype and so.dtype == torch.float32
    assert torch.equal(xo, xe) and torch.equal(so, se)


def tokens(b=2, p=1, m=196, c=24, cm=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p + m, c, generator=g).to(dtype)
    metric = torch.randn(b, p + m, cm, generator=g)
    size = torch.randint(1, 5, (b, p + m, 1), generator=g).float()
    return x, size, metric


# --------------------------------------------------------------------------- matching modes
@needs_interpreter
@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("tome_order", [True, False])
def test_global_matching_is_the_eager_one(p, tome_order):
    """ToMe's bipartite matching over the sequence: every prefix length (A and B prefixes),
    ToMe's output order and sequence order, r from 1 to the clamp."""
    x, size, metric = tokens(p=p, m=76)
    for r in (1, 9, merging.max_reduction(x.shape[1], p)):
        check(x, size, metric, r, p, mode=GLOBAL, tome_order=tome_order)


@needs_interpreter
def test_global_matching_matches_the_token_by_token_reference():
    """Against the independent pure-Python reference too (not only the eager engine)."""
    x, size, metric = tokens(b=1, p=1, m=48)
    out, sz, _, _ = fused_merge(x, size, metric, 10, 1, mode=GLOBAL, tome_order=True)
    ref_x, ref_size, _ = reference_tome_merge(x, metric, 10, 1, size=size)
    assert torch.allclose(out.double(), ref_x, atol=1e-5) and torch.equal(sz.double(), ref_size.double())


@needs_interpreter
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("window,quota", [(7, 3), (5, 2), (3, 4), (2, 1)])
def test_paper_windows_are_the_eager_ones(p, window, quota):
    """The paper's windows: a square in sequence order, each window its own quota (capped
    at half its tokens); 196 tokens and a non-square 150."""
    for m in (196, 150):
        x, size, metric = tokens(p=p, m=m)
        layout = windows.square_layout(m, window)
        per_window = windows.window_quotas(layout.counts, quota)
        quotas = torch.tensor(per_window, dtype=torch.int32)
        check(x, size, metric, sum(per_window), p, mode=PAPER,
              window_ids=windows.square_window_ids(m, window), quotas=quotas,
              quota_starts=quotas.cumsum(0, dtype=torch.int32) - quotas)


@needs_interpreter
@pytest.mark.parametrize("p", [0, 1, 4])
@pytest.mark.parametrize("window", [7, 4, 2])
def test_joint_windows_are_the_eager_ones(p, window):
    """Joint windows: each image its own window ids (shuffled anchors, as after merges), the
    best r proposals over all windows of the image."""
    x, size, metric = tokens(b=3, p=p)
    g = torch.Generator().manual_seed(window)
    anchors = torch.stack([torch.randperm(196, generator=g) for _ in range(3)])
    table = windows.window_ids(torch.arange(196)[None], (14, 14), window)[0]
    count = windows.num_windows((14, 14), window)
    w = count[0] * count[1]
    for r in (1, 20, (196 - w) // 2):
        check(x, size, metric, r, p, mode=JOINT, anchors=anchors, window_table=table)


@needs_interpreter
@pytest.mark.parametrize("p", [0, 1, 3])
def test_pruning_is_the_eager_one(p):
    x, size, metric = tokens(p=p, m=100)
    for r in (1, 37, 100 - 1):
        check(x, size, metric, r, p, mode=PRUNE)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_size", [True, False])
def test_dtypes_and_missing_sizes(dtype, with_size):
    """Half precision sums the pulls in float32 and rounds each destination once (to nearest
    even, also under the interpreter, which truncates a plain bfloat16 cast); no sizes means
    all ones. Half-precision features are scored in float32."""
    x, size, metric = tokens(p=1, m=120, dtype=dtype)
    check(x, size if with_size else None, metric.to(dtype), 30, 1, mode=GLOBAL, tome_order=True)


@needs_interpreter
@pytest.mark.parametrize("mode", [GLOBAL, JOINT, PAPER])
def test_exact_ties_break_as_in_the_eager_engine(mode):
    """One-hot features: every similarity is exactly 0 or 1 in any summation order, so most
    proposals tie; the kernels break ties as the eager engine's stable sort does (proposals
    in position order; joint windows in (window, position) order; the first B of a row)."""
    b, p, m = 2, 1, 196
    g = torch.Generator().manual_seed(1)
    hot = torch.randint(0, 3, (b, p + m), generator=g)
    metric = torch.nn.functional.one_hot(hot, 16).float()
    x, size, _ = tokens(b=b, p=p, m=m)
    if mode == GLOBAL:
        check(x, size, metric, 60, p, mode=GLOBAL, tome_order=True)
    elif mode == PAPER:
        layout = windows.square_layout(m, 5)
        quotas = torch.tensor(windows.window_quotas(layout.counts, 3), dtype=torch.int32)
        check(x, size, metric, int(quotas.sum()), p, mode=PAPER,
              window_ids=windows.square_window_ids(m, 5), quotas=quotas,
              quota_starts=quotas.cumsum(0, dtype=torch.int32) - quotas)
    else:
        anchors = torch.stack([torch.randperm(m, generator=g) for _ in range(b)])
        table = windows.window_ids(torch.arange(m)[None], (14, 14), 4)[0]
        check(x, size, metric, 40, p, mode=JOINT, anchors=anchors, window_table=table)


@needs_interpreter
def test_strided_inputs():
    """Non-contiguous tokens and features (views) are read through their strides."""
    x, size, metric = tokens(p=1, m=80, c=48)
    check(x[..., ::2], size, metric.transpose(1, 2).contiguous().transpose(1, 2), 12, 1, mode=GLOBAL)


# --------------------------------------------------------------------------- patched models
CASES = [
    ("tome", 4, {}), ("tome", (6, -0.5), {}), ("spatial", 4, {}), ("dsm", 4, dict(delay=1)),
    ("spatial", 4, dict(window=3)), ("spatial", 6, dict(windows="joint", window=3)),
    ("dsm", 5, dict(windows="joint", delay=1, window=2)), ("tome", 4, dict(reduction="prune")),
    ("dsm", 4, dict(feature="x", delay=1)), ("tome", 4, dict(feature="random")),
    ("spatial", 4, dict(prop_attn=False, feature="v")),
]
PREFIXES = {"class": {}, "registers": dict(reg_tokens=2), "no-prefix": dict(class_token=False, global_pool="avg")}


@needs_interpreter
@pytest.mark.parametrize("prefix", PREFIXES)
def test_patched_model_same_logits_sizes_and_sources(prefix, monkeypatch):
    """Every method and option on a small ViT with a class token, with registers, and with no
    prefix: the fused backend gives the eager backend's logits, sizes and source maps to the
    bit, and every merging block did run the kernels."""
    model = small_vit(**PREFIXES[prefix])
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    calls = []
    real = fused.fused_merge
    monkeypatch.setattr(fused, "fused_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    for method, r, kw in CASES:
        runs = []
        for backend in ("eager", "triton"):
            dsm_lite.patch(model, method, r, backend=backend, trace_source=True, **kw)
            calls.clear()
            with torch.no_grad():
                logits = model(images)
            st = model._dsm_state
            runs.append((logits, st.size, st.source, len(calls)))
        (le, se, ce, n_eager), (lt, stz, ct, n_fused) = runs
        merging_blocks = sum(b.r > 0 for b in dsm_lite.schedule(model).blocks)
        assert n_eager == 0 and n_fused == merging_blocks > 0, (method, kw)
        assert torch.equal(le, lt) and torch.equal(se, stz) and torch.equal(ce, ct), (method, r, kw)
    dsm_lite.unpatch(model)


@needs_interpreter
def test_real_vit_ti_on_real_photos(ti, photos):
    """The pretrained ViT-Ti on real photos, float32: DSM (paper and joint windows) and ToMe
    make the same merges (source maps) with either backend, and the logits agree."""
    images = photos[:4].float()
    model = ti.float()
    for method, kw in (("tome", {}), ("dsm", {}), ("dsm", dict(windows="joint"))):
        out = {}
        for backend in ("eager", "triton"):
            dsm_lite.patch(model, method, r=16, backend=backend, **kw)
            out[backend] = dsm_lite.trace_sources(model, images)
        (le, ge), (lt, gt) = out["eager"], out["triton"]
        assert torch.equal(ge, gt), (method, kw)
        assert torch.allclose(le, lt, rtol=0, atol=1e-5), (method, kw, (le - lt).abs().max())


@needs_interpreter
def test_auto_is_eager_on_the_cpu(monkeypatch):
    """backend='auto' runs the eager engine on CPU tensors, even with the interpreter on."""
    model = small_vit()
    monkeypatch.setattr(fused, "fused_merge", lambda *a, **k: pytest.fail("kernels ran"))
    dsm_lite.patch(model, "dsm", 4, delay=1)
    assert dsm_lite.patching.patch_settings(model)["backend"] == "auto"
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))


@needs_interpreter
def test_compiled_fullgraph_runs_the_kernels():
    """torch.compile(fullgraph=True) captures the custom op in one graph (no break), also as
    the first thing a fresh process does after patch (the op is registered at patch, not in
    the traced forward), and the compiled model gives the eager backend's logits."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        import dsm_lite
        from reference import small_vit
        model = small_vit()
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        for method, kw in (("tome", {}), ("dsm", dict(delay=1)), ("spatial", dict(windows="joint", window=3))):
            dsm_lite.patch(model, method, 4, backend="triton", **kw)
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            with torch.no_grad():
                got = compiled(images)
            dsm_lite.patch(model, method, 4, backend="eager", **kw)
            with torch.no_grad():
                want = model(images)
            assert torch.equal(got, want), method
            print("SAME", method)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("SAME") == 3


class KernelCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that launch a kernel (not views, not allocations)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if not func.is_view and not name.startswith(("empty", "new_empty", "_unsafe_view")) \
                and func.namespace != "dsm_lite":  # the op's own kernels are counted by launch
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@needs_interpreter
@pytest.mark.parametrize("method,kw", [("tome", {}), ("dsm", dict(delay=1)),
                                       ("spatial", dict(windows="joint", window=3)),
                                       ("tome", dict(reduction="prune"))], ids=str)
def test_a_merging_block_launches_two_kernels(method, kw, monkeypatch):
    """Matching and merge of one block: the fused backend launches its two Triton kernels and
    no aten kernel (at most 4 was the target); the eager engine launches dozens of ops. Joint
    windows included: the kernel looks the windows up and carries the anchors itself."""
    from dsm_lite import patching

    launches = []
    kernel_type = type(fused._kernels().match_kernel)
    run = kernel_type.run
    monkeypatch.setattr(kernel_type, "run", lambda self, *a, **k: launches.append(1) or run(self, *a, **k))
    per_block = {"eager": [], "triton": []}

    def counted(backend, fn):
        def wrapper(*args, **kwargs):
            launches.clear()
            with KernelCount() as count:
                out = fn(*args, **kwargs)
            per_block[backend].append(len(count.ops) + len(launches))
            return out
        return wrapper

    monkeypatch.setattr(patching.MergeState, "merge_fused", counted("triton", patching.MergeState.merge_fused))
    model = small_vit()
    for backend in ("eager", "triton"):
        if backend == "eager":  # the eager path: matching, then the weighted merge
            match, wavg = patching.MergeState.match, patching.merge_wavg
            monkeypatch.setattr(patching.MergeState, "match", counted("eager", match))
            monkeypatch.setattr(patching, "merge_wavg", counted("eager", wavg))
        dsm_lite.patch(model, method, 4, backend=backend, **kw)
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
        if backend == "eager":
            monkeypatch.setattr(patching.MergeState, "match", match)
            monkeypatch.setattr(patching, "merge_wavg", wavg)
    blocks = sum(b.r > 0 for b in dsm_lite.schedule(model).blocks)
    assert per_block["triton"] == [2] * blocks, per_block
    eager = [a + b for a, b in zip(per_block["eager"][::2], per_block["eager"][1::2])]
    assert len(eager) == blocks and min(eager) >= 10, per_block
    dsm_lite.unpatch(model)


@needs_interpreter
def test_time_breakdown_counts_the_fused_op_as_merging():
    """The profiler's split puts the custom op (both kernels) in its own merging category."""
    from dsm_lite.measure import time_breakdown

    model = dsm_lite.patch(small_vit(), "dsm", 4, delay=1, backend="triton")
    parts = time_breakdown(model, torch.randn(2, 3, 64, 64))
    assert parts["fused matching/merge"] > 0 and "sorts" not in parts
    dsm_lite.unpatch(model)


# --------------------------------------------------------------------------- bad input
def test_unknown_backend_is_refused_and_nothing_changes():
    model = small_vit()
    with pytest.raises(ValueError, match="backend must be one of"):
        dsm_lite.patch(model, "tome", 4, backend="cuda")
    assert not dsm_lite.is_patched(model)


def test_triton_without_triton_is_refused_at_patch(monkeypatch):
    """backend='triton' where Triton does not import: one clear error, the model untouched
    (its earlier patch kept)."""
    model = dsm_lite.patch(small_vit(), "tome", 2)
    monkeypatch.setattr(fused, "triton_available", lambda: False)
    with pytest.raises(fused.TritonUnavailableError, match="needs Triton"):
        dsm_lite.patch(model, "dsm", 4, backend="triton")
    assert dsm_lite.patching.patch_settings(model)["method"] == "tome"
    x = torch.zeros(1, 9, 8)
    with pytest.raises(fused.TritonUnavailableError, match="needs Triton"):
        fused.check_fused(x)


@needs_interpreter
def test_float64_is_refused():
    model = dsm_lite.patch(small_vit(dtype=torch.float64), "tome", 4, backend="triton")
    with pytest.raises(TypeError, match="float64 runs on backend='eager'"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    x, size, metric = tokens(p=1, m=20)
    with pytest.raises(TypeError, match="similarity feature"):
        fused_merge(x, size, metric.double(), 4, 1)


@needs_interpreter
def test_too_many_tokens_and_r_out_of_range_are_refused():
    x = torch.zeros(1, fused.MAX_TOKENS + 1, 8)
    with pytest.raises(ValueError, match=f"at most {fused.MAX_TOKENS} tokens"):
        fused.check_fused(x)
    x, size, metric = tokens(p=1, m=20)
    for r in (0, 21):
        with pytest.raises(ValueError, match="removes 1 to N - P = 20 tokens"):
            fused_merge(x, size, metric, r, 1)


def test_cpu_tensors_without_the_interpreter_are_refused():
    """With the interpreter off (a fresh process), the compiled kernels cannot take CPU
    tensors: backend='triton' says so at the forward pass; 'auto' runs eager there."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        import dsm_lite
        from dsm_lite.fused_merge import TritonUnavailableError
        from reference import small_vit
        model = small_vit()
        x = torch.randn(1, 3, 64, 64)
        dsm_lite.patch(model, "tome", 4)
        model(x)  # auto: eager on the CPU
        dsm_lite.patch(model, "tome", 4, backend="triton")
        try:
            model(x)
        except TritonUnavailableError as e:
            print("REFUSED", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_fake_cuda_runs_the_triton_op():
    """With the interpreter off and fake CUDA tensors (no GPU needed): backend='auto' picks
    the kernels for a CUDA model, the op is the triton_op ``dsm_lite::fused_merge`` (which
    torch.compile traces into), and its outputs have the merged shapes, on the device."""
    code = textwrap.dedent("""
        import copy, sys, torch
        from torch._subclasses import fake_tensor
        sys.path.insert(0, "tests")
        import dsm_lite
        from dsm_lite import fused_merge as fused
        from reference import small_vit
        assert not fused._kernels().INTERPRETED
        cpu = small_vit()
        mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=False)
        model = copy.deepcopy(cpu)
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for k, t in list(store.items()):
                    if t is not None:
                        f = mode.from_tensor(t.detach())
                        with mode:
                            store[k] = f.to("cuda")
        calls = []
        real = fused.fused_merge
        fused.fused_merge = lambda *a, **k: calls.append(a[0].device.type) or real(*a, **k)
        for method, kw in (("tome", {}), ("dsm", dict(delay=1)), ("spatial", dict(windows="joint", window=3))):
            dsm_lite.patch(model, method, 4, **kw)
            with mode, torch.no_grad():
                out = model(torch.randn(2, 3, 64, 64, device="cuda"))
                st = model._dsm_state
                assert out.device.type == "cuda" and out.shape == (2, 10)
                assert st.size.device.type == "cuda" and st.size.shape[1] == dsm_lite.schedule(model).tokens[-1]
        print("CALLS", len(calls), set(calls))
        from torch._library.triton import triton_ops_to_kernels
        print("TRITON_OP", "dsm_lite::fused_merge" in triton_ops_to_kernels)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CALLS" in out.stdout and "{'cuda'}" in out.stdout
    assert int(out.stdout.split("CALLS ")[1].split()[0]) > 0
    assert "TRITON_OP True" in out.stdout
