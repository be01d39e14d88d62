"""Device handling, tested on a CPU-only machine with fake CUDA tensors (and on a real GPU when
there is one).

How: inside ``torch._subclasses.fake_tensor.FakeTensorMode`` tensors carry only metadata
(shape, dtype, device) and every op runs its meta kernel, which checks devices as the real
kernels do. A model whose parameters are fake ``cuda`` tensors therefore runs the package's
tensor paths as on a GPU, without one, and any cpu/cuda mix raises. Two gaps are closed here:

- fake tensors accept indexing a CPU tensor with CUDA indices (``cpu_tensor[cuda_index]``),
  which real CUDA rejects; :class:`CudaIndexRules` adds that rule;
- values are unknown, so ``.item()``, ``.tolist()`` and ``.numpy()`` raise: functions that end
  in numpy are split into a tensor part (tested here under fake CUDA) and a conversion on the
  CPU (tested on real CPU tensors), and the profiler and ``torchprofile`` are checked through
  monkeypatched stand-ins where they cannot run on fake tensors.

The model is a small random-weight ViT (4 blocks); the real-GPU tests at the end run only where
``torch.cuda.is_available()``.
"""
from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import timm
import torch
from torch.autograd import DeviceType

import dsm_lite
from dsm_lite import devices, evaluation, matching_steps, measure, models, probes, stats, windows
from dsm_lite.devices import DeviceMismatchError, DeviceUnavailableError

fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CUDA = torch.cuda.is_available()
aten = torch.ops.aten
METHODS = [  # every method, reduction and feature patch() offers
    dict(method="tome", r=8),
    dict(method="spatial", r=8, local_blocks=2),  # local then global blocks
    dict(method="dsm", r=8, local_blocks=2),  # none, local, global
    dict(method="dsm", r=8, reduction="prune"),
    dict(method="tome", r=8, reduction="prune", feature="x"),
    dict(method="dsm", r=8, feature="q"),
    dict(method="dsm", r=8, feature="v"),
    dict(method="spatial", r=8, feature="x"),
    dict(method="dsm", r=8, feature="random"),
    dict(method="tome", r=8, feature="random"),
    dict(method="tome", r=(8, -0.5), prop_attn=False, trace_source=True),
]


class CudaIndexRules(TorchDispatchMode):
    """Real CUDA's indexing rule, which fake tensors skip: an index tensor must be on the CPU or
    on the device of the tensor it indexes (``cpu_tensor[cuda_index]`` raises on a GPU)."""

    OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
           aten._index_put_impl_.default, aten._unsafe_index.Tensor}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            base, indices = args[0], args[1]
            for i in indices:
                if i is not None and i.device.type != "cpu" and i.device != base.device:
                    raise RuntimeError(f"indices should be either on cpu or on the same device as "
                                       f"the indexed tensor ({base.device}), got {i.device}")
        return func(*args, **kwargs)


class FakeCuda:
    """A FakeTensorMode (plus :class:`CudaIndexRules`) and models converted into it."""

    def __init__(self):
        self.mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=False)
        self._stack = contextlib.ExitStack()

    def convert(self, model: torch.nn.Module, device: str = "cuda") -> torch.nn.Module:
        """A deep copy of a real model with fake parameters and buffers on ``device``."""
        model = copy.deepcopy(model)
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for k, t in list(store.items()):
                    if t is not None:
                        f = self.mode.from_tensor(t.detach())
                        with self.mode:
                            store[k] = f.to(device)
        return model

    def __enter__(self) -> "FakeCuda":
        self._stack.enter_context(self.mode)
        self._stack.enter_context(CudaIndexRules())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def cpu_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4).eval()


@pytest.fixture
def fake() -> FakeCuda:
    return FakeCuda()


@pytest.fixture
def vit(fake: FakeCuda, cpu_vit) -> torch.nn.Module:
    """The small ViT with fake parameters on ``cuda`` (enter ``fake`` to run it)."""
    return fake.convert(cpu_vit, "cuda")


def is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def is_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


# --------------------------------------------------------------------------- the harness
def test_harness_catches_device_mixes(fake: FakeCuda, vit) -> None:
    """The checks the other tests rely on do fail: a CPU batch into the fake-CUDA model, an
    elementwise cpu/cuda op, and a CPU tensor indexed with CUDA indices."""
    with fake, torch.no_grad():
        assert is_cuda(next(vit.parameters())) and is_cuda(vit(torch.randn(1, 3, 224, 224, device="cuda")))
        with pytest.raises(RuntimeError, match="device"):
            vit(torch.randn(1, 3, 224, 224))
        with pytest.raises(RuntimeError, match="device"):
            torch.arange(3) + torch.arange(3, device="cuda")
        with pytest.raises(RuntimeError, match="indices should be either on cpu"):
            torch.arange(5)[torch.arange(2, device="cuda")]
        torch.arange(5, device="cuda")[torch.arange(2)]  # allowed on a real GPU too


# --------------------------------------------------------------------------- patching
@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_patched_forward_runs_on_cuda(fake: FakeCuda, vit, kw, backend) -> None:
    """Every method, reduction and feature, including the random feature (CPU generator,
    draws moved to the tokens' device): all merging tensors are made on the tokens' device,
    by the eager engine and by the fused kernels ("auto" picks them for CUDA tensors; under
    fake tensors their op gives shapes only, see tests/test_fused_merge.py)."""
    dsm_lite.patch(vit, **kw, backend=backend)
    with fake, torch.no_grad():
        out = vit(torch.randn(2, 3, 224, 224, device="cuda"))
        st = vit._dsm_state
        assert is_cuda(out) and out.shape == (2, 1000)
        assert st.size is not None and is_cuda(st.size) and st.size.shape[1] < 197
        if kw.get("trace_source"):
            assert is_cuda(st.source)
        if st.anchors is not None:
            assert is_cuda(st.anchors)


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_half_precision_model_runs_on_cuda(fake: FakeCuda, cpu_vit, kw, dtype, backend) -> None:
    """A float16/bfloat16 model on the GPU (how half precision is served without autocast,
    which a CPU-only torch switches off for "cuda"): every method runs, the logits come out in
    the model's dtype, token sizes stay float32, all on the device."""
    vit = fake.convert(copy.deepcopy(cpu_vit).to(dtype), "cuda")
    dsm_lite.patch(vit, **kw, backend=backend)
    with fake, torch.no_grad():
        out = vit(torch.randn(2, 3, 224, 224, device="cuda", dtype=dtype))
        st = vit._dsm_state
        assert is_cuda(out) and out.dtype == dtype and out.shape == (2, 1000)
        assert is_cuda(st.size) and st.size.dtype == torch.float32 and st.size.shape[1] < 197


def test_trace_windows_on_cuda_returns_cpu(fake: FakeCuda, vit) -> None:
    """trace_windows (chapter 4's window rules) with a GPU model: CPU maps of the right shape."""
    dsm_lite.patch(vit, "spatial", r=8, windows="joint")
    with fake:
        traced = dsm_lite.patching.trace_windows(vit, torch.randn(2, 3, 224, 224))
        local = len(traced["blocks"])
        assert local > 0
        for k, dtype in (("window", torch.long), ("anchor", torch.bool), ("groups", torch.long)):
            assert is_cpu(traced[k]) and traced[k].shape == (local, 2, 14, 14) and traced[k].dtype == dtype


def test_trace_sources_moves_images_and_returns_cpu(fake: FakeCuda, vit) -> None:
    """trace_sources takes images anywhere (the book passes CPU photos to a GPU model) and
    returns logits and groups on the CPU."""
    dsm_lite.patch(vit, "spatial", r=8)
    with fake:
        for images, after in ((torch.randn(2, 3, 224, 224), None),
                              (torch.randn(2, 3, 224, 224, device="cuda"), 0)):
            logits, groups = dsm_lite.trace_sources(vit, images, after_block=after)
            assert is_cpu(logits) and logits.shape == (2, 1000)
            assert is_cpu(groups) and groups.shape == (2, 14, 14) and groups.dtype == torch.long
    dsm_lite.patch(vit, "dsm", r=8, delay=2)  # no merge before block 1: the arange branch
    with fake:
        _, groups = dsm_lite.trace_sources(vit, torch.randn(1, 3, 224, 224), after_block=0)
        assert is_cpu(groups)


# --------------------------------------------------------------------------- matching steps
def test_block_metric_and_matching_step_tensors_on_cuda(fake: FakeCuda, vit) -> None:
    """Chapter 3's path: block_metric (CPU photo, GPU model) then matching_steps. Its tensor
    part stays on the metric's device; indexing CPU positions with GPU indices would raise."""
    with fake:
        metric = matching_steps.block_metric(vit, torch.randn(1, 3, 224, 224), block=0)
        assert is_cuda(metric) and metric.shape == (1, 197, 64)
        for r, p in ((16, 1), (0, 1), (98, 0)):
            t = matching_steps._step_tensors(metric[0], r, p)
            assert all(is_cuda(v) for v in t.values()), {k: v.device for k, v in t.items()}
            assert t["src"].shape == t["dst"].shape == (r,)


def test_matching_steps_returns_cpu_numpy(cpu_vit) -> None:
    """The conversion part, on real values: numpy arrays and a CPU merge that agree with
    bipartite_soft_matching (matching_steps asserts that itself)."""
    metric = matching_steps.block_metric(cpu_vit, torch.randn(1, 3, 224, 224), block=1)
    steps = matching_steps.matching_steps(metric, 16, 1)
    assert steps.r == 16 and steps.scores.shape == (99, 98)
    assert all(is_cpu(v) for v in (steps.merge.src, steps.merge.dst, steps.merge.keep))
    assert list(steps.src) == steps.merge.src[0].tolist()


# --------------------------------------------------------------------------- probes
def test_probes_on_cuda(fake: FakeCuda, vit) -> None:
    """run_probe / measure_sim on CPU photos and a GPU model (dense and patched, with the
    proportional-attention bias): logits and records come back on the CPU, or stay on the
    model's device with to_cpu=False; the pure statistics run on the device of their input."""
    with fake:
        images = torch.randn(3, 3, 224, 224)
        res = probes.run_probe(vit, images, what=probes.CAPTURABLE, batch_size=2)
        assert is_cpu(res.logits) and res.logits.shape == (3, 1000)
        for name in probes.CAPTURABLE:
            assert all(is_cpu(t) for t in res[name]), name
        kept = probes.run_probe(vit, images[:2], what=("attn", "norms"), to_cpu=False)
        assert is_cuda(kept["attn"][0]) and is_cpu(kept.logits)
        sim = probes.measure_sim(vit, images, batch_size=3)
        assert all(is_cpu(t) and t.shape == (3, 4) for t in (sim.sim_in, sim.sim_mid, sim.sim_in_patches))

        dsm_lite.patch(vit, "tome", r=8)
        res = probes.run_probe(vit, images[:2], what=("attn", "received", "x_out"))
        assert res["x_out"][-1].shape[1] < 197 and is_cpu(res["attn"][-1])
        dsm_lite.unpatch(vit)

        x = torch.randn(2, 4, 197, 192, device="cuda")  # (photos, blocks, tokens, channels)
        received = torch.rand(2, 4, 197, device="cuda")
        values = torch.randn(8, 4, device="cuda")
        outputs = [probes.token_similarity(x, 1, include_prefix=False),
                   probes.topk_share(received, 5, 1, include_prefix=False),
                   probes.prefix_share(received), probes.token_norm_ratio(received, 1),
                   probes.masked_mean(received[:, 0], received[:, 0] > 0.5),
                   probes.rank_percentile(received[:, 0]),
                   probes.patch_contrast(torch.randn(2, 3, 224, 224, device="cuda")),
                   *stats.percentile_band(values), *stats.bootstrap_ci(values, n_boot=50)]
        assert all(is_cuda(t) for t in outputs)


def test_probe_device_errors(fake: FakeCuda, vit) -> None:
    with fake:
        with pytest.raises(DeviceMismatchError, match=r"cpu.*cuda|cuda.*cpu"):
            probes.run_probe(vit, torch.randn(1, 3, 224, 224), device="cpu")
        if not CUDA:
            with pytest.raises(DeviceUnavailableError, match="cuda"):
                probes.run_probe(vit, torch.randn(1, 3, 224, 224), device="cuda")
        attn = vit.blocks[0].attn
        with pytest.raises(DeviceMismatchError, match=r"cuda:0.*cpu"):
            probes.attention_probs(attn, torch.randn(1, 197, 192))
        assert is_cuda(probes.attention_probs(attn, torch.randn(1, 197, 192, device="cuda")))


# --------------------------------------------------------------------------- evaluation, models
def test_forward_helpers_return_cpu_logits(fake: FakeCuda, vit, monkeypatch) -> None:
    """predict (with and without a progress bar), dense_logits and evaluate's forward passes: CPU photos in,
    GPU model, CPU logits out; evaluate hands CPU tensors to its numpy conversion."""
    dsm_lite.patch(vit, "dsm", r=8)
    with fake:
        images = torch.randn(3, 3, 224, 224)
        for logits in (dsm_lite.predict(vit, images, batch_size=2),
                       dsm_lite.predict(vit, images, batch_size=2, progress=True),
                       evaluation.dense_logits(vit, images, batch_size=3, progress=False)):
            assert is_cpu(logits) and logits.shape == (3, 1000) and logits.dtype == torch.float32
        assert dsm_lite.is_patched(vit)  # dense_logits restores the patch
        dense = torch.randn(3, 1000, device="cuda")
        t = evaluation._metric_tensors(torch.randn(3, 1000, device="cuda"), dense,
                                       torch.arange(3, device="cuda"))
        assert all(is_cpu(v) for v in t.values())
        seen = {}
        monkeypatch.setattr(evaluation, "per_image_metrics",
                            lambda lg, dn, lb, keep: seen.update(t=evaluation._metric_tensors(lg, dn, lb)))
        evaluation.evaluate(vit, images, torch.arange(3), dense=dense, batch_size=3, progress=False)
        assert all(is_cpu(v) for v in seen["t"].values())


# --------------------------------------------------------------------------- measurement
def test_count_macs_traces_on_the_model_device(fake: FakeCuda, vit, monkeypatch) -> None:
    """torchprofile traces with torch.jit, which cannot run on fake tensors; a stand-in
    records what count_macs hands it: the model and an input on the model's device."""
    seen = {}

    def profile_macs(model, x, reduction=None):
        seen.update(device=x.device, dtype=x.dtype, shape=tuple(x.shape))
        return {}

    monkeypatch.setattr(measure, "profile_macs", profile_macs)
    with fake:
        assert dsm_lite.count_macs(vit, (3, 64, 48)) == 0
    assert seen == dict(device=torch.device("cuda:0"), dtype=torch.float32, shape=(1, 3, 64, 48))


def test_interleaved_throughput_batch_on_model_device(fake: FakeCuda, vit, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(measure, "_sync", synced.append)
    with fake:
        tp = dsm_lite.measure_throughput(vit, batch_size=2, runs=1, warmup=0)
        assert tp.device == "cuda:0" and synced and all(d.type == "cuda" for d in synced)
        with pytest.raises(DeviceMismatchError, match=r"cuda:0.*cpu"):
            dsm_lite.interleaved_throughput([vit], batch_size=1, runs=1, warmup=0, device="cpu")
        if not CUDA:
            with pytest.raises(DeviceUnavailableError, match="cuda"):
                dsm_lite.interleaved_throughput([vit], runs=1, warmup=0, device="cuda")


def test_time_breakdown_profiles_cuda_on_the_model_device(fake: FakeCuda, vit, monkeypatch) -> None:
    """The profiler records CPU activity only on fake tensors (no CUDA runtime), so a
    stand-in records which activities time_breakdown asks for, then profiles the CPU side."""
    import torch.profiler as tp

    real_profile, asked, synced = tp.profile, [], []

    def profile(activities):
        asked.append(set(activities))
        return real_profile(activities=[tp.ProfilerActivity.CPU])

    monkeypatch.setattr(measure, "profile", profile)
    monkeypatch.setattr(measure, "_sync", synced.append)
    dsm_lite.patch(vit, "tome", r=8)
    with fake:
        with pytest.raises(DeviceMismatchError, match=r"cuda:0.*cpu"):
            measure.time_breakdown(vit, torch.randn(2, 3, 224, 224))
        assert not asked  # raised before profiling anything
        parts = measure.time_breakdown(vit, torch.randn(2, 3, 224, 224, device="cuda"))
    assert asked == [{tp.ProfilerActivity.CPU, tp.ProfilerActivity.CUDA}]
    assert synced and all(d.type == "cuda" for d in synced)
    assert set(parts) <= set(measure.CATEGORIES) | {"transformer"}
    assert measure.profiler_activities("cpu") == [tp.ProfilerActivity.CPU]


def test_split_self_time_counts_each_kernel_once() -> None:
    """On CUDA the profiler lists each kernel twice: inside the op that launched it (the op's
    self device time) and as a row of its own. Only ops count; names map to CATEGORIES."""
    def ev(key, cpu, dev, kind=DeviceType.CPU):
        return SimpleNamespace(key=key, self_cpu_time_total=cpu, self_device_time_total=dev, device_type=kind)

    events = [ev("aten::argsort", 10, 30), ev("aten::gather", 20, 10), ev("aten::addmm", 70, 60),
              ev("sm90_gemm_kernel", 0, 60, DeviceType.CUDA), ev("sort_kernel", 0, 30, DeviceType.CUDA)]
    assert measure.split_self_time(events, on_device=True) == {
        "sorts": 0.3, "gathers/scatters": 0.1, "transformer": 0.6}
    assert measure.split_self_time(events, on_device=False) == {
        "sorts": 0.1, "gathers/scatters": 0.2, "transformer": 0.7}
    assert measure.split_self_time([], on_device=True) == {}


def test_time_breakdown_on_cpu(cpu_vit) -> None:
    """The real profiler on real tensors (CPU): shares of a patched model sum to 1 and show
    the merging's sorts and gathers."""
    model = dsm_lite.patch(copy.deepcopy(cpu_vit), "tome", r=8)
    parts = measure.time_breakdown(model, torch.randn(1, 3, 224, 224))
    assert abs(sum(parts.values()) - 1) < 1e-9
    assert {"transformer", "sorts", "gathers/scatters"} <= set(parts)


# --------------------------------------------------------------------------- bad input
def test_device_errors_name_both_devices(fake: FakeCuda, vit) -> None:
    with fake:
        x = torch.randn(1, 3, 224, 224)
        with pytest.raises(DeviceMismatchError) as err:
            devices.check_same_device(vit, x, where="f")
    msg = str(err.value)
    assert "cuda:0" in msg and "cpu" in msg and msg.startswith("f:")
    assert issubclass(DeviceMismatchError, ValueError) and issubclass(DeviceUnavailableError, ValueError)
    assert devices.model_device(vit).type == "cuda"
    assert devices.same_device("cuda", "cuda:0") and not devices.same_device("cuda:1", "cuda:0")
    assert not devices.same_device("cpu", "cuda")
    with pytest.raises(ValueError, match="no parameters"):
        devices.model_device(torch.nn.ReLU())


@pytest.mark.skipif(CUDA, reason="needs a machine without a GPU")
def test_asking_for_cuda_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("loaded a model"))
    for call in (lambda: dsm_lite.pick_device("cuda"), lambda: models.load_model(device="cuda"),
                 lambda: dsm_lite.pick_device("cuda:1")):
        with pytest.raises(DeviceUnavailableError, match=r"'cuda(:1)?'.*no CUDA GPU"):
            call()
    assert dsm_lite.pick_device("cpu") == torch.device("cpu") and dsm_lite.pick_device().type == "cpu"


# --------------------------------------------------------------------------- a real GPU
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_real_gpu_end_to_end(cpu_vit) -> None:
    """The same paths on real CUDA tensors: CPU photos into a GPU model everywhere."""
    model = copy.deepcopy(cpu_vit).cuda()
    images = torch.randn(3, 3, 224, 224)
    dense_gpu = dsm_lite.predict(model, images)
    assert torch.allclose(dense_gpu, dsm_lite.predict(cpu_vit, images), atol=1e-3)
    for kw in METHODS:
        dsm_lite.patch(model, **kw)
        logits, groups = dsm_lite.trace_sources(model, images)
        assert is_cpu(logits) and is_cpu(groups) and groups.shape == (3, 14, 14)
        assert windows.group_contiguity(groups)[0].shape == (3,)
        parts = measure.time_breakdown(model, images.cuda())
        assert abs(sum(parts.values()) - 1) < 1e-6 and parts["transformer"] < 1, (kw, parts)
    dsm_lite.unpatch(model)
    steps = matching_steps.matching_steps(matching_steps.block_metric(model, images[:1]), 16, 1)
    assert steps.r == 16
    res = probes.run_probe(model, images, what=probes.CAPTURABLE, device="cuda")
    assert is_cpu(res.logits) and all(is_cpu(t) for t in res["attn"])
    assert is_cpu(probes.measure_sim(model, images).delta())
    assert 0 <= dsm_lite.topk_accuracy(dense_gpu.cuda(), torch.arange(3))[1] <= 1
    assert dsm_lite.interleaved_throughput([model], batch_size=2, runs=2, warmup=1)[0].device == "cuda:0"
    with pytest.raises(DeviceMismatchError):
        measure.time_breakdown(model, images)
    result = evaluation.evaluate(dsm_lite.patch(model, "dsm", r=8), images, torch.arange(3),
                                 dense=dense_gpu.cuda(), progress=False)
    assert len(result) == 3
    pytest.importorskip("torchprofile")
    on_cpu = dsm_lite.patch(copy.deepcopy(cpu_vit), "dsm", r=8)
    assert dsm_lite.count_macs(model) == dsm_lite.count_macs(on_cpu) == dsm_lite.schedule(model).macs
