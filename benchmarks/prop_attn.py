"""What proportional attention costs on a GPU, and cheaper ways to compute it.

Proportional attention adds log(size) of each key to the attention logits. The engine passes
it to ``F.scaled_dot_product_attention`` as a float ``attn_mask`` of shape (B, 1, 1, N). On an
H100 (``gpu-h100-profile-fp16.txt``) ViT-B ToMe r=16 at batch 256 spent 21.8 ms in kernels
with the bias and 19.6 ms without it: half of merging's cost over the oracle. This script
times the ways to get the same output:

* ``mask``: the engine's way, a (B, 1, 1, N) bias in q's dtype;
* ``mask16``: the same bias in a buffer whose last dimension is padded to a multiple of 16
  (the fused kernels want 16-element-aligned mask strides and copy a misaligned mask);
* ``values``: no mask. softmax(l + log s)_j = s_j e^(l_j) / sum_k s_k e^(l_k), so attention
  without a bias over the values [s v, s] gives the numerator and the denominator at once:
  out = (A [s v])[:d] / (A s). q and k get 8 zero columns (dot products unchanged) so that
  q, k and v have one head size, which the flash kernels need;
* ``values-nopad``: the same with q and k left at d columns (only some kernels take a
  value head size different from the key's);
* ``none``: attention without the bias (not the same output: the floor);
* ``shipped``: whatever ``dsm_lite.patching.sized_sdpa`` does now (``mask16`` since this
  benchmark's first run).

Part 1 times each way alone (ViT-B's heads, N = 181 tokens, fp16) under every SDPA backend
that takes it, with its error against a float64 reference. Part 2 swaps each way into
``dsm_lite.patching.sized_sdpa`` and times whole ViT-B forwards patched with ToMe r=16,
replayed as CUDA graphs (kernels only), interleaved.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/prop_attn.py --batch-sizes 1 32 256
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable, Dict, Optional

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dsm_lite
import dsm_lite.patching as patching
from dsm_lite.measure import Autocast, CudaGraphed

PAD = 8  # extra head columns: keeps the head size a multiple of 8


def sdpa_mask(q, k, v, size, attn_mask=None, is_causal=False, dropout_p=0.0):
    """The engine's way (``dsm_lite.patching.sized_sdpa`` as shipped)."""
    b, n, _ = size.shape
    bias = size.log().view(b, 1, 1, n).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def sdpa_mask16(q, k, v, size, attn_mask=None, is_causal=False, dropout_p=0.0):
    """The bias written into a buffer with a 16-aligned last dimension, then sliced."""
    b, n, _ = size.shape
    buf = q.new_empty(b, 1, 1, -(-n // 16) * 16)
    buf[..., :n] = size.log().view(b, 1, 1, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=buf[..., :n])


def _size_values(v, size):
    b, h, n, d = v.shape
    s = size.view(b, 1, n, 1).to(v.dtype)
    v2 = v.new_zeros(b, h, n, d + PAD)
    torch.mul(v, s, out=v2[..., :d])
    v2[..., d:d + 1] = s
    return v2


def sdpa_values(q, k, v, size, attn_mask=None, is_causal=False, dropout_p=0.0):
    """No mask: attention over [s v, s], then divide; q and k zero-padded to v's width."""
    d = q.shape[-1]
    out = F.scaled_dot_product_attention(F.pad(q, (0, PAD)), F.pad(k, (0, PAD)), _size_values(v, size),
                                         scale=1.0 / math.sqrt(d))
    return out[..., :d] / out[..., d:d + 1]


def sdpa_values_nopad(q, k, v, size, attn_mask=None, is_causal=False, dropout_p=0.0):
    """As ``values``, q and k left at d columns."""
    d = q.shape[-1]
    out = F.scaled_dot_product_attention(q, k, _size_values(v, size))
    return out[..., :d] / out[..., d:d + 1]


def sdpa_none(q, k, v, size, attn_mask=None, is_causal=False, dropout_p=0.0):
    """No bias at all (a different output: the floor)."""
    return F.scaled_dot_product_attention(q, k, v)


def _sized_or_plain(way: Callable) -> Callable:
    """``way`` where there are sizes; plain attention before the first merge (size None)."""
    def sdpa(q, k, v, size, attn_mask=None, is_causal=False, dropout_p=0.0):
        return F.scaled_dot_product_attention(q, k, v) if size is None else way(q, k, v, size)
    return sdpa


WAYS: Dict[str, Callable] = {name: _sized_or_plain(way) for name, way in [
    ("mask", sdpa_mask), ("mask16", sdpa_mask16), ("values", sdpa_values),
    ("values-nopad", sdpa_values_nopad), ("none", sdpa_none)]}
WAYS["shipped"] = patching.sized_sdpa  # the engine's current way, whichever it is
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def reference(q, k, v, size) -> torch.Tensor:
    """Proportional attention in float64, written out."""
    q, k, v, s = q.double(), k.double(), v.double(), size.double()
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + s.log().transpose(1, 2)[:, None]
    return logits.softmax(-1) @ v


def time_us(fn: Callable, device: torch.device, reps: int) -> float:
    """Mean µs per call over ``reps`` calls, after 3 untimed ones (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def once_ms(f: Callable, x: torch.Tensor, device: torch.device) -> float:
    """Milliseconds of one call f(x), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    f(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def attention_kernels(fn: Callable, device: torch.device) -> str:
    """The names of the attention kernels one call launches (GPU only)."""
    if device.type != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    hits = sorted(n for n in names if any(w in n.lower() for w in ("sdpa", "flash", "fmha", "attention", "attn")))
    return "; ".join(h[:60] for h in hits) or "(no attention kernel by name)"


def part1(device: torch.device, dtype: torch.dtype, batches, heads: int, head_dim: int, n: int,
          reps: int) -> None:
    print(f"\n## Part 1: one attention call, H={heads}, N={n}, head_dim={head_dim}, {dtype}; "
          f"mean µs over {reps} calls; max |error| against float64")
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        q, k, v = (torch.randn(b, heads, n, head_dim, generator=gen).to(device, dtype) for _ in range(3))
        # sizes as after a few merges: mostly 1, some up to 30
        size = (1 + (torch.rand(b, n, 1, generator=gen) ** 6 * 30).round()).to(device)
        ref = reference(q, k, v, size)
        print(f"\nbatch {b}")
        print(f"{'way':<13} {'backend':<10} {'µs':>9} {'max err':>9}  kernels")
        for way, fn in WAYS.items():
            for backend, kind in BACKENDS.items():
                call = (lambda fn=fn: fn(q, k, v, size))
                try:
                    if kind is None:
                        out = call()
                        us = time_us(call, device, reps)
                        names = attention_kernels(call, device)
                    else:
                        with sdpa_kernel([kind]):
                            out = call()
                            us = time_us(call, device, reps)
                            names = ""
                except RuntimeError as e:
                    print(f"{way:<13} {backend:<10} {'n/a':>9} {'':>9}  {str(e).splitlines()[0][:70]}")
                    continue
                err = (out.double() - ref).abs().max().item()
                print(f"{way:<13} {backend:<10} {us:9.1f} {err:9.2e}  {names}")


def part2(device: torch.device, dtype: torch.dtype, model_name: str, r: int, batches, runs: int,
          ways) -> None:
    print(f"\n## Part 2: whole forwards, {model_name} ToMe r={r} (random weights), {dtype} autocast, "
          f"{'CUDA graphs' if device.type == 'cuda' else 'eager'}; median ms over {runs} interleaved runs")
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False).eval().to(device)
    models = {"dense": base}
    merged = dsm_lite.patch(copy.deepcopy(base), "tome", r=r)
    models["tome no prop-attn"] = dsm_lite.patch(copy.deepcopy(base), "tome", r=r, prop_attn=False)
    shipped = patching.sized_sdpa

    def with_way(fn: Callable, way: Optional[str]) -> Callable:
        def run(x):
            patching.sized_sdpa = WAYS[way] if way else shipped
            try:
                return fn(x)
            finally:
                patching.sized_sdpa = shipped
        return run

    for b in batches:
        x = torch.randn(b, 3, 224, 224, device=device)
        fns = {"dense": Autocast(base, device, dtype),
               "tome no prop-attn": Autocast(models["tome no prop-attn"], device, dtype)}
        for way in ways:
            fns[f"tome {way}"] = with_way(Autocast(merged, device, dtype), way)
        if device.type == "cuda":
            fns = {k: CudaGraphed(f, x) for k, f in fns.items()}
        with torch.no_grad():
            ref = fns["tome mask"](x).float().clone() if "tome mask" in fns else None
            diffs = {k: ((f(x).float() - ref).abs().max().item() if ref is not None else float("nan"))
                     for k, f in fns.items()}
            times: Dict[str, list] = {k: [] for k in fns}
            for step in range(runs + 2):
                for k, f in fns.items():
                    ms = once_ms(f, x, device)
                    if step >= 2:
                        times[k].append(ms)
        dense = statistics.median(times["dense"])
        print(f"\nbatch {b}")
        print(f"{'config':<20} {'ms':>8} {'vs dense':>9} {'max |logit diff| vs tome mask':>30}")
        for k in fns:
            m = statistics.median(times[k])
            print(f"{k:<20} {m:8.3f} {dense / m:9.3f} {diffs[k]:30.2e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32, 256])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--ways", nargs="+", default=["mask", "mask16", "values", "values-nopad", "shipped"])
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--skip-part2", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# benchmarks/prop_attn.py on {name}; torch {torch.__version__}, timm {timm.__version__}")
    if not args.skip_part1:
        part1(device, dtype, args.batch_sizes, 12, 64, 181, args.reps)
    if not args.skip_part2:
        part2(device, dtype, args.model, args.r, args.batch_sizes, args.runs, args.ways)


if __name__ == "__main__":
    main()
