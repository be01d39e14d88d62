"""Where a merged model's time goes on a GPU: host, kernels, synchronisation, CUDA graphs.

``benchmarks/throughput.py`` times whole forward passes. This script splits them, per model,
batch size and configuration (dense, merged, its truncation oracle), into:

* **host ms**: how long the Python call takes to return *without* waiting for the GPU, i.e.
  the time the host needs to issue every op (interpreter, dispatcher, kernel launches);
* **wall ms**: the same call followed by ``torch.cuda.synchronize()`` (what throughput sees);
* **kernel ms** and **kernels**: the GPU's busy time (the sum of the kernels' durations, from
  ``torch.profiler``) and how many kernels one forward launches;
* **graph ms**: the forward captured once as a CUDA graph (``dsm_lite.measure.CudaGraphed``)
  and replayed: the kernels alone, with the host cost gone.

and, per merged configuration, **extra kernels per merging block**: (its kernels minus its
oracle's) / merging blocks, which is what matching and merging launch (plus proportional
attention's bias and the similarity feature's head mean). ``--backend eager triton`` runs
each method on both backends of ``dsm_lite.patch`` side by side (before and after the fused
kernels).

When wall ≈ host > kernel, the forward is host-bound and more (small) ops cost time whatever
the batch; when wall ≈ kernel, it is GPU-bound. It also checks that one forward of every
method runs without a single host synchronisation (``torch.cuda.set_sync_debug_mode``), and
lists the kernels that take the most GPU time in the largest merged batch.

Everything runs under fp16 autocast, interleaved round-robin, medians over ``--runs``.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/gpu_profile.py --models vit_tiny_patch16_224 vit_base_patch16_224 \\
        --batch-sizes 1 32 256
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Callable, Dict, List

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import dsm_lite
from dsm_lite.measure import Autocast, CudaGraphed, TruncationOracle


def syncs(fn: Callable, x: torch.Tensor) -> List[str]:
    """Warnings for every host synchronisation one forward of ``fn`` makes."""
    with torch.no_grad():
        fn(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_stats(fn: Callable, x: torch.Tensor, gpu: bool = True):
    """(GPU busy ms, kernel count, {kernel name: ms}) of one forward. On the CPU (a rehearsal)
    the ops stand in for the kernels: their count and CPU time."""
    with torch.no_grad():
        fn(x)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            fn(x)
            sync()
    if not gpu:
        ops = [e for e in prof.events() if e.name.startswith(("aten::", "dsm_lite::"))
               and e.cpu_parent is None]
        return (sum(e.cpu_time_total for e in ops) / 1e3, len(ops),
                {e.name: e.cpu_time_total / 1e3 for e in ops})
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith("Memcpy") and not e.name.startswith("Memset")]
    by_name: Dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total / 1e3
    return sum(e.device_time_total for e in kernels) / 1e3, len(kernels), by_name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--methods", nargs="+", default=["tome", "spatial", "dsm"])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32, 256])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--amp", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--backend", nargs="+", choices=list(dsm_lite.patching.BACKENDS), default=["auto"],
                    help="merging backends to compare (dsm_lite.patch's backend)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only rehearses the script (no timings of note)")
    args = ap.parse_args(argv)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(dev) if gpu else 'CPU (rehearsal)'}; torch {torch.__version__}, "
          f"timm {timm.__version__}; {args.amp} autocast, r={args.r}, medians over {args.runs} interleaved runs; "
          f"backends {args.backend}")
    for name in args.models:
        base = timm.create_model(name, pretrained=False).eval().to(dev)
        configs = {"dense": base}
        oracle_of, blocks_of = {}, {}
        for method in args.methods:
            for backend in args.backend:
                key = method if len(args.backend) == 1 else f"{method} [{backend}]"
                configs[key] = dsm_lite.patch(copy.deepcopy(base), method, r=args.r, backend=backend)
                oracle_of[key] = f"{method} oracle"
                blocks_of[key] = sum(b.r > 0 for b in dsm_lite.schedule(base, method, args.r).blocks)
            configs[f"{method} oracle"] = TruncationOracle(base, dsm_lite.schedule(base, method, args.r))
        first = next(iter(oracle_of))
        configs[f"{first} no prop-attn"] = dsm_lite.patch(copy.deepcopy(base), args.methods[0], r=args.r,
                                                          prop_attn=False, backend=args.backend[0])
        fns = {k: Autocast(m, dev, amp) for k, m in configs.items()}
        x8 = torch.randn(8, 3, 224, 224, device=dev)
        for key in oracle_of:
            found = syncs(fns[key], x8) if gpu else []
            print(f"{name} {key}: {len(found)} host synchronisations in one forward"
                  + "".join(f"\n    {s}" for s in sorted(set(found))))
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, 224, 224, device=dev)
            graphs = {}
            if not args.no_graph and gpu:
                for k, fn in fns.items():
                    graphs[k] = CudaGraphed(fn, x)
                out_e, out_g = fns[first](x).float(), graphs[first](x).float()
                print(f"\n{name}, batch {batch}: graph vs eager logits, max |diff| "
                      f"{(out_e - out_g).abs().max().item():.2e}")
            host: Dict[str, list] = {k: [] for k in fns}
            wall: Dict[str, list] = {k: [] for k in fns}
            graph: Dict[str, list] = {k: [] for k in fns}
            with torch.no_grad():
                for step in range(args.runs + 3):
                    for k, fn in fns.items():
                        sync()
                        t0 = time.perf_counter()
                        fn(x)
                        t1 = time.perf_counter()
                        sync()
                        t2 = time.perf_counter()
                        if k in graphs:
                            graphs[k](x)
                            sync()
                            t3 = time.perf_counter()
                        if step >= 3:
                            host[k].append(t1 - t0)
                            wall[k].append(t2 - t0)
                            if k in graphs:
                                graph[k].append(t3 - t2)
            print(f"\n{name}, batch {batch}")
            print(f"{'config':<26} {'host ms':>8} {'wall ms':>8} {'kernel ms':>10} {'kernels':>8} "
                  f"{'per merging block':>18} {'graph ms':>9} {'im/s eager':>11} {'im/s graph':>11}")
            biggest, stats = None, {k: kernel_stats(fn, x, gpu) for k, fn in fns.items()}
            for k, fn in fns.items():
                busy, count, by_name = stats[k]
                h, w = statistics.median(host[k]) * 1e3, statistics.median(wall[k]) * 1e3
                g = statistics.median(graph[k]) * 1e3 if graph[k] else float("nan")
                extra = (f"{(count - stats[oracle_of[k]][1]) / blocks_of[k]:>18.1f}" if k in oracle_of
                         else f"{'':>18}")
                print(f"{k:<26} {h:>8.2f} {w:>8.2f} {busy:>10.2f} {count:>8d} {extra} {g:>9.2f} "
                      f"{batch / w * 1e3:>11.0f} {batch / g * 1e3:>11.0f}")
                if k == first:
                    biggest = by_name
            if batch == max(args.batch_sizes) and biggest:
                print(f"  GPU time by kernel, {first} r={args.r}, batch {batch} (top 15, ms):")
                for kname, t in sorted(biggest.items(), key=lambda kv: -kv[1])[:15]:
                    print(f"    {t:7.3f}  {kname[:110]}")
            del graphs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
