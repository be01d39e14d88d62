"""Throughput and time breakdown (dsm_lite.measure) with fake models on a fake clock and a fake
profiler: the reported images/s, spreads, ratios and shares follow exactly from the known fake
times, computed here by hand. Nothing asserts on real timing."""
from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsm_lite import measure
from dsm_lite.measure import Throughput, interleaved_throughput, measure_throughput, time_breakdown


class FakeClock:
    """A clock that only moves when a fake model runs (by binary fractions: exact sums)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeModel(nn.Module):
    """Takes ``durations[k]`` fake seconds on its k-th call; logs each call's input."""

    def __init__(self, name, clock, durations, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dtype=dtype))
        self.name, self.clock, self.durations, self.calls = name, clock, list(durations), []

    def forward(self, x):
        self.calls.append(x)
        self.clock.now += self.durations[len(self.calls) - 1]
        return x


def expected(times, batch):
    """The documented summary, written out: per-run images/s, their sample std, a normal 95%
    interval for their mean, and batch / mean time as the headline figure."""
    per_run = [batch / t for t in times]
    mean_run = sum(per_run) / len(per_run)
    std = statistics.stdev(per_run) if len(per_run) > 1 else 0.0
    half = 1.96 * std / math.sqrt(len(per_run))
    return dict(mean=batch / (sum(times) / len(times)), std=std, ci95=(mean_run - half, mean_run + half),
                per_run=per_run)


def assert_summary(tp: Throughput, times, batch):
    want = expected(times, batch)
    assert tp.runs == len(times) and tp.batch_size == batch and tp.device == "cpu"
    assert tp.mean == pytest.approx(want["mean"], rel=1e-12)
    assert tp.std == pytest.approx(want["std"], rel=1e-12)
    assert tp.ci95 == pytest.approx(want["ci95"], rel=1e-12)
    assert tp.per_run == pytest.approx(want["per_run"], rel=1e-12)


def test_interleaved_throughput_follows_fake_times():
    clock = FakeClock()
    warm = [1000.0, 2000.0]  # warm-up rounds: huge, and must not count
    fast = FakeModel("fast", clock, warm + [0.125, 0.25, 0.5, 0.0625])
    slow = FakeModel("slow", clock, warm + [0.5, 0.5, 0.5, 0.5])
    order, setups = [], [lambda: order.append("setup fast"), lambda: order.append("setup slow")]
    fast.register_forward_pre_hook(lambda m, a: order.append("fast"))
    slow.register_forward_pre_hook(lambda m, a: order.append("slow"))
    tp_fast, tp_slow = interleaved_throughput([fast, slow], batch_size=8, input_size=(3, 4, 5), runs=4, warmup=2,
                                              setups=setups, clock=clock)
    assert_summary(tp_fast, [0.125, 0.25, 0.5, 0.0625], 8)
    assert_summary(tp_slow, [0.5] * 4, 8)
    # by hand: 8 images in 0.9375 s over 4 runs -> 8 / 0.234375 = 512 / 15 im/s (not the mean of
    # per-run figures, 60); a constant 0.5 s -> 16 im/s with no spread
    assert tp_fast.mean == 512 / 15 and tp_fast.per_run == [64, 32, 16, 128]
    assert tp_fast.std == pytest.approx(math.sqrt(((4 ** 2) + 28 ** 2 + 44 ** 2 + 68 ** 2) / 3))
    assert tp_slow.mean == 16.0 and tp_slow.std == 0 and tp_slow.ci95 == (16.0, 16.0)
    assert tp_fast.mean / tp_slow.mean == pytest.approx(32 / 15)  # speed-up = mean times 0.5 / 0.234375
    # round robin, each model right after its own setup, warm-up rounds included
    assert order == ["setup fast", "fast", "setup slow", "slow"] * 6
    # one random batch, made once, the same tensor for every call of every model
    batches = fast.calls + slow.calls
    assert len(batches) == 12 and all(b is batches[0] for b in batches)
    assert batches[0].shape == (8, 3, 4, 5) and batches[0].dtype == torch.float32
    assert str(tp_slow) == "16.0 ± 0.0 im/s (4 runs, batch 8, cpu)"


def test_interleaved_throughput_plain_callables_and_dtype():
    clock = FakeClock()
    seen = []

    def plain(x):
        seen.append(x)
        clock.now += 0.5

    (tp,) = interleaved_throughput([plain], batch_size=2, input_size=(3, 2, 2), runs=3, warmup=0, clock=clock,
                                   device="cpu")
    assert_summary(tp, [0.5] * 3, 2)
    assert tp.mean == pytest.approx(4.0) and seen[0].dtype == torch.float32
    # the batch takes the dtype of the first module
    model = FakeModel("f64", clock, [1.0] * 2, dtype=torch.float64)
    (tp,) = interleaved_throughput([model], batch_size=3, input_size=(1, 1, 1), runs=1, warmup=1, clock=clock)
    assert model.calls[0].dtype == torch.float64 and tp.per_run == [3.0] and tp.std == 0


def test_measure_throughput_is_one_model_interleaved(monkeypatch):
    """measure_throughput passes its protocol on and returns the single model's summary: here
    on a fake clock, injected where it calls interleaved_throughput."""
    clock, calls = FakeClock(), []
    real = measure.interleaved_throughput

    def spy(models, *args, **kw):
        calls.append((list(models), args, kw))
        return real(models, *args, clock=clock, **kw)

    monkeypatch.setattr(measure, "interleaved_throughput", spy)
    model = FakeModel("m", clock, [9.0] + [0.25, 0.5, 0.125])
    tp = measure_throughput(model, batch_size=4, input_size=(3, 2, 2), runs=3, warmup=1)
    assert calls == [([model], (4, (3, 2, 2), 3, 1, None), {})]
    assert_summary(tp, [0.25, 0.5, 0.125], 4)
    assert tp.mean == 4 / (0.875 / 3) and tp.per_run == [16, 8, 32]


# --------------------------------------------------------------------------- time breakdown
class FakeProfile:
    """Stands in for torch.profiler.profile: knows whether it is open, returns fixed events."""

    instances = []

    def __init__(self, activities):
        self.activities, self.open = activities, False
        FakeProfile.instances.append(self)

    def __enter__(self):
        self.open = True
        return self

    def __exit__(self, *exc):
        self.open = False

    def key_averages(self):
        ev = lambda key, cpu: SimpleNamespace(key=key, self_cpu_time_total=cpu, self_device_time_total=0,  # noqa: E731
                                              device_type=torch.autograd.DeviceType.CPU)
        return [ev("aten::argsort", 6.0), ev("aten::topk", 4.0), ev("aten::gather", 5.0), ev("aten::cat", 5.0),
                ev("aten::bmm", 10.0), ev("aten::addmm", 50.0), ev("aten::softmax", 20.0)]


def test_time_breakdown_shares_from_fake_profiler(monkeypatch):
    import torch.profiler

    FakeProfile.instances = []
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(measure, "profile", FakeProfile, raising=False)  # where measure imports it
    runs = []

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            prof = FakeProfile.instances[-1] if FakeProfile.instances else None
            runs.append(dict(profiled=bool(prof and prof.open), grad=torch.is_grad_enabled(),
                             training=self.training, x=x))
            return self.lin(x)

    model = Model().train()
    x = torch.randn(3, 2)
    parts = time_breakdown(model, x)
    # total self time 100: sorts 6 + 4, gathers/scatters 5 + 5, matching 10, the rest 70
    assert parts == pytest.approx({"sorts": 0.10, "gathers/scatters": 0.10, "similarity/matching": 0.10,
                                   "transformer": 0.70})
    assert [r["profiled"] for r in runs] == [False, True]  # one warm-up, then one profiled pass
    assert all(not r["grad"] and r["training"] and r["x"] is x for r in runs)  # no_grad, mode kept
    assert FakeProfile.instances[0].activities == [torch.profiler.ProfilerActivity.CPU]


def test_cuda_graph_needs_a_cuda_batch():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA batch"):
        measure.CudaGraphed(nn.Identity(), torch.zeros(1, 3, 8, 8))


def test_throughput_script_refuses_cuda_graph_off_gpu(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--cuda-graph", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--cuda-graph captures eager models on a CUDA device" in capsys.readouterr().err


def test_autocast_wrapper_runs_the_module_in_half_precision_or_as_it_is():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8)  # CPU
    with torch.no_grad():
        half = measure.Autocast(net, torch.device("cpu"), torch.bfloat16)(x)
        plain = measure.Autocast(net, "cpu", None)(x)
        want = net(x)
    assert half.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.equal(plain, want)
    assert 0 < (half.float() - want).abs().max() < 0.1  # rounded to bf16, not another result
    assert not torch.is_autocast_enabled("cpu")  # left as it was


def test_prop_attn_script_ways_agree_on_cpu(capsys):
    """benchmarks/prop_attn.py's ways of computing proportional attention (a mask, an aligned
    mask, attention over size-weighted values) agree with a float64 reference, and the
    engine's way swapped into a whole model leaves its logits unchanged on the CPU."""
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prop_attn.py"
    spec = importlib.util.spec_from_file_location("prop_attn_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--device", "cpu", "--dtype", "fp32", "--batch-sizes", "2", "--model",
                 "vit_tiny_patch16_224", "--reps", "1", "--runs", "1",
                 "--ways", "mask", "mask16", "values", "shipped"])
    out = capsys.readouterr().out
    errors = {(m[0], m[1]): float(m[2]) for m in re.findall(r"^(\S+)\s+(default|math)\s+[\d.]+\s+(\S+)", out, re.M)}
    for way in ("mask", "mask16", "values", "values-nopad", "shipped"):
        assert errors[(way, "default")] < 1e-5 and errors[(way, "math")] < 1e-5, (way, errors)
    assert errors[("none", "default")] > 1e-2  # the floor is a different output
    diffs = dict(re.findall(r"^tome (mask|mask16|values|shipped)\s+[\d.]+\s+[\d.]+\s+(\S+)$", out, re.M))
    assert float(diffs["mask16"]) == 0.0 and float(diffs["shipped"]) == 0.0
    assert float(diffs["values"]) < 1e-4


def test_read_throughput_table_parses_the_committed_files():
    from pathlib import Path
    from dsm_lite.compare import read_throughput_table
    text = """Device: CPU (x86_64, 2 threads); batch 32
vit_tiny_patch16_224
method     r   GMACs     im/s   ± std  speed-up  MAC red. efficiency
dense      0   1.255     59.8     1.8     1.000     1.000      1.000
tome       8   0.930     85.1     3.1     1.422     1.349      1.054
  tome: lowest efficiency at r>=8: 1.054; slower than dense at r=none
"""
    t = read_throughput_table(text)
    assert t.method.tolist() == ["dense", "tome"] and t.r.tolist() == [0, 8]
    assert t.iloc[1].to_dict() == dict(model="vit_tiny_patch16_224", method="tome", r=8, gmacs=0.930, ims=85.1, std=3.1,
                                       speedup=1.422, mac_reduction=1.349, efficiency=1.054)
    with pytest.raises(ValueError, match="no throughput table"):
        read_throughput_table("nothing here")
    shipped = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-2core-vit_tiny.txt"
    t = read_throughput_table(shipped.read_text())
    assert len(t) == 13 and (t.speedup / t.mac_reduction - t.efficiency).abs().max() < 2e-3
