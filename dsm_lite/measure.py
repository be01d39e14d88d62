"""Measurement: MACs (torchprofile), throughput (the paper's protocol, with spread), and where
the time of one forward pass goes (torch.profiler)."""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torchprofile import profile_macs

from .devices import DeviceMismatchError, check_available, check_same_device, model_device, same_device

__all__ = ["count_macs", "Throughput", "measure_throughput", "interleaved_throughput",
           "CATEGORIES", "time_breakdown", "split_self_time", "profiler_activities", "TruncationOracle",
           "CudaGraphed", "Autocast"]


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-accumulates for one image, through the model as currently patched.

    Traced with torchprofile, which follows the shrinking token counts of a merged model
    (the merges are a fixed number per block, so the trace is exact for every image). Ops it
    does not know (sorts, gathers, scatters) count as zero MACs, which is what they are, and
    so does integer index arithmetic, which torchprofile would otherwise count as
    multiplies.

    The traced input, one ``(1, *input_size)`` image of zeros, is made on the model's device in
    its dtype, so the count runs wherever the model is.
    """
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=model_device(model), dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_op = profile_macs(model, x, reduction=None)
        return int(sum(v for node, v in per_op.items() if not _integer_op(node)))
    finally:
        model.train(was_training)


def _integer_op(node) -> bool:
    return all(out.dtype in _INT_TYPES for out in node.outputs)


_INT_TYPES = {"long", "int", "short", "char", "byte", "bool"}


@dataclass
class Throughput:
    """Images per second over ``runs`` timed forward passes of one batch.

    ``mean`` is batch / mean time per run, the paper's figure; ``std`` the standard
    deviation of per-run throughput; ``ci95`` a normal-approximation 95% interval for the
    mean of per-run throughputs.
    """

    mean: float
    std: float
    ci95: Tuple[float, float]
    runs: int
    batch_size: int
    device: str
    per_run: List[float]

    def __str__(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f} im/s ({self.runs} runs, batch {self.batch_size}, {self.device})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summarise(times: Sequence[float], batch: int, device: str) -> Throughput:
    per_run = [batch / t for t in times]
    n = len(per_run)
    mean_run = sum(per_run) / n
    std = math.sqrt(sum((v - mean_run) ** 2 for v in per_run) / max(n - 1, 1))
    half = 1.96 * std / math.sqrt(n)
    mean = batch * n / sum(times)
    return Throughput(mean, std, (mean_run - half, mean_run + half), n, batch, device, per_run)


@torch.no_grad()
def interleaved_throughput(
    models: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    batch_size: int = 32,
    input_size: Tuple[int, int, int] = (3, 224, 224),
    runs: int = 50,
    warmup: int = 5,
    device: Optional[torch.device] = None,
    setups: Optional[Sequence[Callable[[], None]]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> List[Throughput]:
    """Throughput of several models measured round-robin, so drift hits all of them alike.

    Each round runs every model once on the same random batch (device synchronised around
    each run); ``warmup`` rounds are discarded. ``setups[i]`` (optional) is called before
    model i runs, e.g. to patch a shared model with different options. ``clock`` is wall
    time by default; ``time.thread_time`` (CPU time of the calling thread) keeps the time
    other processes hold the core out of the numbers, on a CPU with one intra-op thread.

    Devices: the batch is made on ``device``, which defaults to the device of the first
    model that is an ``nn.Module`` (else :func:`dsm_lite.pick_device`). Every ``nn.Module``
    among ``models`` must be on that device: a model elsewhere raises
    :class:`~dsm_lite.devices.DeviceMismatchError` rather than timing a copy (plain callables
    cannot be checked). A ``device`` this machine lacks raises
    :class:`~dsm_lite.devices.DeviceUnavailableError`.
    """
    modules = [m for m in models if isinstance(m, nn.Module)]
    if device is not None:
        device = check_available(device)
    elif modules:
        device = model_device(modules[0])
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for i, m in enumerate(models):
        if isinstance(m, nn.Module) and not same_device(model_device(m), device):
            raise DeviceMismatchError(f"interleaved_throughput: model {i} is on {model_device(m)} "
                                      f"but the batch is made on {device}; put every model on one "
                                      f"device (or pass device={str(model_device(m))!r})")
    # the batch in the first model's dtype (float32 unless it was cast), not the default dtype
    dtype = next(modules[0].parameters()).dtype if modules else torch.float32
    x = torch.randn(batch_size, *input_size, device=device, dtype=dtype)
    times: List[List[float]] = [[] for _ in models]
    for step in range(warmup + runs):
        for i, model in enumerate(models):
            if setups is not None:
                setups[i]()
            _sync(device)
            t0 = clock()
            model(x)
            _sync(device)
            if step >= warmup:
                times[i].append(clock() - t0)
    return [_summarise(t, batch_size, str(device)) for t in times]


def measure_throughput(model: nn.Module, batch_size: int = 32,
                       input_size: Tuple[int, int, int] = (3, 224, 224), runs: int = 50,
                       warmup: int = 5, device: Optional[torch.device] = None) -> Throughput:
    """Images per second of one model: fixed batch (32), warm-up discarded, ``runs`` timed
    runs (at least 50 in the paper's protocol), device synchronised. The batch is made on the
    model's device (see :func:`interleaved_throughput` for ``device``)."""
    return interleaved_throughput([model], batch_size, input_size, runs, warmup, device)[0]


# --------------------------------------------------------------------------- time breakdown
#: aten ops the merging code uses and the transformer blocks do not (or barely) use; every
#: other op counts as "transformer"
CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "sorts": ("aten::sort", "aten::argsort", "aten::topk"),
    # index_select/index_add_/take/cat: what the engine's fast paths use (cat packs features and
    # sizes into one gather; the transformer itself uses cat once per forward, for the class token)
    "gathers/scatters": ("aten::gather", "aten::scatter", "aten::scatter_", "aten::scatter_reduce",
                         "aten::index_copy_", "aten::index_copy", "aten::index_select",
                         "aten::index_add_", "aten::index_add", "aten::take", "aten::cat"),
    "similarity/matching": ("aten::bmm", "aten::matmul", "aten::linalg_vector_norm",
                            "aten::norm", "aten::max", "aten::masked_fill", "aten::one_hot",
                            "aten::cumsum", "aten::clamp_min", "aten::fill_", "aten::mean",
                            "aten::log", "aten::eq", "aten::remainder", "aten::floor_divide"),
    # the Triton backend: its custom op, which holds both kernels (dsm_lite.fused_merge)
    "fused matching/merge": ("dsm_lite::fused_merge",),
}
OTHER = "transformer"


def category(op: str) -> str:
    """The :data:`CATEGORIES` key of a profiler event name, or ``"transformer"``."""
    return next((c for c, ops in CATEGORIES.items() if op in ops), OTHER)


def profiler_activities(device: Union[str, torch.device]) -> List[ProfilerActivity]:
    """What ``torch.profiler`` must record for a forward pass on ``device``: the CPU always
    (the ops and their launches), plus CUDA (the kernels) on a CUDA device."""
    acts = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    return acts


def split_self_time(events: Iterable, on_device: bool) -> Dict[str, float]:
    """Share of self time per category, from ``torch.profiler`` events (``key_averages()``).

    Args:
        events: profiler events with ``key``, ``device_type``, ``self_cpu_time_total`` and
            ``self_device_time_total``.
        on_device: count device (kernel) time, for a CUDA run; else CPU time. On the device,
            only the ops (CPU-side events) are counted: each op's self device time already
            holds the kernels it launched, which the profiler also lists as rows of their own,
            so counting those too would count every kernel twice, under its kernel name.

    Returns:
        ``{category: share}``, shares summing to 1 (all 0 when nothing was timed).
    """
    totals: Dict[str, float] = defaultdict(float)
    for ev in events:
        if on_device:
            if getattr(ev, "device_type", DeviceType.CPU) != DeviceType.CPU:
                continue
            t = ev.self_device_time_total
        else:
            t = ev.self_cpu_time_total
        totals[category(ev.key)] += t
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in totals.items()}


def time_breakdown(model: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """Where the time of one forward pass goes: share of op self time per category.

    One untimed forward pass first (warm-up), then one under ``torch.profiler``, both under
    ``no_grad`` and in the model's current mode. On a CUDA device the profiler records CUDA
    activity too and the shares are of kernel time; on the CPU they are of CPU time.

    Args:
        model: a timm ViT, patched by ``dsm_lite.patch`` or not.
        x: (B, 3, H, W) batch, on the model's device. Nothing is moved: a copy would be
            profiled too, and a batch on the wrong device is a bug of the caller.

    Returns:
        ``{category: share of self time}``: the keys of :data:`CATEGORIES` that occurred plus
        ``"transformer"`` (every other op); shares sum to 1.

    Raises:
        DeviceMismatchError: ``x`` is not on the model's device.
    """
    device = check_same_device(model, x, what="x", where="time_breakdown")
    with torch.no_grad():
        model(x)
        _sync(device)
        with profile(activities=profiler_activities(device)) as prof:
            model(x)
            _sync(device)
    return split_self_time(prof.key_averages(), on_device=device.type == "cuda")


def _call_plain(module: nn.Module, *args, name: str = "forward"):
    """Call ``module``'s method as its original (unpatched) class defines it. The function is
    called with ``module`` as its first argument rather than bound with ``__get__``, which
    torch.compile (dynamo) cannot trace in every torch version."""
    cls = getattr(type(module), "_dsm_original", type(module))
    return getattr(cls, name)(module, *args)


class TruncationOracle(nn.Module):
    """A benchmarking oracle: a ViT that runs a schedule's token counts with no matching.

    Block i attends over ``tokens_in`` tokens, then simply keeps the first ``tokens_out``
    (prefix first, then patches in raster order) and runs its MLP on them, exactly where a
    merged block merges. No similarity, sorting, gathering, size weighting or proportional
    attention: the time of this model is what the smaller shapes alone cost, so
    ``oracle time / merged time`` is the efficiency of the merging itself (1.0 when matching
    and merging are free). Its outputs are meaningless as predictions.

    The oracle shares ``model``'s parameters and calls its modules' original (unpatched)
    forwards, so it works whether or not ``model`` is patched at the time, and it can be
    ``torch.compile``-d like the model.

    Args:
        model: a timm ``VisionTransformer`` (patched or not).
        schedule: the :class:`~dsm_lite.schedules.Schedule` whose per-block token counts to
            run, e.g. ``dsm_lite.schedule(model, "dsm", 16)``; its grid must be the model's.
    """

    def __init__(self, model: nn.Module, schedule) -> None:
        super().__init__()
        if len(schedule.blocks) != len(model.blocks):
            raise ValueError(f"schedule has {len(schedule.blocks)} blocks, model {len(model.blocks)}")
        n = model.num_prefix_tokens + math.prod(model.patch_embed.grid_size)
        if schedule.blocks[0].tokens_in != n:
            raise ValueError(f"schedule starts with {schedule.blocks[0].tokens_in} tokens, "
                             f"the model with {n}")
        self.model = model
        self.tokens_out = tuple(b.tokens_out for b in schedule.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, classes) logits (of the truncated model)."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        for block, n in zip(m.blocks, self.tokens_out):
            x = x + block.drop_path1(block.ls1(_call_plain(block.attn, block.norm1(x))))
            x = x[:, :n]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return _call_plain(m, m.norm(x), name="forward_head")


class Autocast(nn.Module):
    """``module`` run under ``torch.autocast(device_type, dtype)``, or as it is for dtype None.

    What the benchmarks time and capture for half precision: autocast is entered inside the
    call, so a :class:`CudaGraphed` or compiled wrapper records the half-precision kernels.

    Args:
        module: a module or callable on (B, 3, H, W) images.
        device: the device (or its type, "cpu" or "cuda") autocast applies to.
        dtype: torch.float16 or torch.bfloat16; None runs ``module`` unchanged.
    """

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], device: Union[torch.device, str],
                 dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, torch.device(device).type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with ctx:
            return self.module(x)


class CudaGraphed:
    """``fn`` on one fixed-shape batch, captured once as a CUDA graph and replayed.

    At small batch sizes a GPU forward pass is bound by the host: every op costs the
    Python interpreter, the dispatcher and a kernel launch, whatever its size, and merging
    adds a few dozen small ops per block. A CUDA graph records the kernels of one forward
    pass and replays them with a single launch, so only the kernels' own time is left. The
    merging engine is free of host synchronisation and of data-dependent shapes (r is fixed
    per block), so a patched model can be captured as it is.

    Calls copy the batch into the captured input and return the captured output tensor,
    which the next call overwrites (clone it to keep it).

    Args:
        fn: a module or callable on (B, 3, H, W) images, on a CUDA device.
        example: a batch of the shape and dtype every later call will pass.
        warmup: untimed calls on a side stream before the capture (kernel selection, the
            patched model's per-shape caches).

    Raises:
        ValueError: ``example`` is not on a CUDA device.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor,
                 warmup: int = 3) -> None:
        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA batch; got one on {example.device}")
        self.fn = fn
        self.static_input = example.clone()
        stream = torch.cuda.Stream(example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_output = fn(self.static_input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape:
            raise ValueError(f"this graph was captured for a batch of shape "
                             f"{tuple(self.static_input.shape)}, got {tuple(x.shape)}")
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output

