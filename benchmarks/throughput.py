"""Dense vs ToMe vs spatial vs DSM: speed-up against MAC reduction and against an oracle.

For each model and batch size, every configuration (dense, then each method at each r, and
for each of those its *oracle*) is timed round-robin (``dsm_lite.interleaved_throughput``:
one batch per configuration per round, warm-up rounds discarded, device synchronised), so
slow drifts of a shared machine hit all configurations alike. The oracle
(``dsm_lite.measure.TruncationOracle``) runs the same per-block token counts as the merged
model with no matching at all (it keeps the first tokens), so it separates what the smaller
shapes cost from what merging itself costs. It prints, per configuration:

    GMACs (the schedule's, equal to torchprofile's count), images/s (mean ± std over runs),
    speed-up = im/s / dense im/s, MAC reduction = dense MACs / MACs,
    MAC efficiency = speed-up / MAC reduction (1.0 when merging costs nothing beyond the
    MACs it saves), and oracle efficiency = merged im/s / oracle im/s (1.0 when matching and
    merging are free).

It then profiles one batch per method with ``torch.profiler`` and splits the time into the
transformer's own work and the merging overhead (similarity and matching, sorts, gathers
and scatters), so one can see where any shortfall goes.

``--compile`` times ``torch.compile``-d dense, merged and oracle models instead (each
configuration compiled once per batch size, ``fullgraph=True``, ``--compile-mode`` as in
``torch.compile``: ``reduce-overhead`` adds CUDA graphs on a GPU); ``--cuda-graph`` (GPU only)
captures each eager configuration once per batch size as a CUDA graph
(``dsm_lite.measure.CudaGraphed``) and times its replay, which removes the host's cost of
issuing many small ops, the limit of eager GPU runs at small batch; ``--amp fp16|bf16`` runs
everything under ``torch.autocast``; ``--device cuda`` on a GPU (inputs made on the device,
the device synchronised around every timed run, CUDA time in the profile).

Usage (numbers are machine-dependent; commit the output with the machine named):

    python benchmarks/throughput.py --models vit_tiny_patch16_224 deit_small_patch16_224 \
        --batch-sizes 1 8 32 --runs 30 20 10
    python benchmarks/throughput.py --device cuda --amp fp16 --batch-sizes 1 32 256 \
        --models vit_tiny_patch16_224 deit_small_patch16_224 vit_base_patch16_224
"""
from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict, List, Tuple

import timm
import torch

import dsm_lite
from dsm_lite.measure import Autocast, CudaGraphed, TruncationOracle, time_breakdown


def build(name: str, device: torch.device) -> torch.nn.Module:
    # random weights: speed does not depend on the values, and this runs anywhere
    return timm.create_model(name, pretrained=False).eval().to(device)


AMP = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def machine(device: torch.device) -> str:
    """The processor (lscpu's model name) or GPU, and the thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


Config = Tuple[str, str, int, str]  # (kind: dense/merged/oracle, method, r, backend)


def configurations(methods: List[str], rs: List[int], oracle: bool = True,
                   backends: Tuple[str, ...] = ("auto",)) -> List[Config]:
    """Dense, then per method and r: the merged model on each backend, and its oracle."""
    configs: List[Config] = [("dense", "-", 0, "-")]
    for method in methods:
        for r in rs:
            configs += [("merged", method, r, b) for b in backends]
            configs += [("oracle", method, r, "-")] if oracle else []
    return configs


def instantiate(base: torch.nn.Module, config: Config) -> torch.nn.Module:
    """The model of one configuration: its own patched copy (merged), or the shared dense
    weights (dense; oracle, which calls the unpatched modules)."""
    kind, method, r, backend = config
    if kind == "dense":
        return base
    if kind == "oracle":
        return TruncationOracle(base, dsm_lite.schedule(base, method, r))
    return dsm_lite.patch(copy.deepcopy(base), method, r=r, backend=backend)


def run_model(name: str, args, device: torch.device) -> None:
    base = build(name, device)
    size = (3,) + tuple(base.patch_embed.img_size)
    configs = configurations(args.methods, args.r, oracle=not args.no_oracle, backends=tuple(args.backend))
    macs = [dsm_lite.schedule(base, "tome", 0).macs if kind == "dense" else dsm_lite.schedule(base, m, r).macs
            for kind, m, r, _ in configs]
    if args.count_macs:  # torchprofile's count, through the patched model
        for (kind, m, r, _), mc in zip(configs, macs):
            if kind == "merged":
                assert dsm_lite.count_macs(dsm_lite.patch(base, m, r=r), size) == mc, (m, r)
                dsm_lite.unpatch(base)
    models = [instantiate(base, c) for c in configs]
    amp = AMP[args.amp]
    runs = args.runs + [args.runs[-1]] * (len(args.batch_sizes) - len(args.runs))
    for batch, nruns in zip(args.batch_sizes, runs):
        fns = [Autocast(m, device, amp) for m in models]
        label = "eager"
        if args.cuda_graph:
            label = "eager, CUDA graph"
            x = torch.randn(batch, *size, device=device)
            fns = [CudaGraphed(fn, x) for fn in fns]
        if args.compile:
            label = f"compiled (torch.compile, fullgraph=True, mode {args.compile_mode})"
            torch._dynamo.reset()
            x = torch.randn(batch, *size, device=device)
            compiled = []
            for config, fn in zip(configs, fns):
                t0 = time.perf_counter()
                cfn = torch.compile(fn, fullgraph=True, dynamic=False, mode=args.compile_mode)
                with torch.no_grad():
                    cfn(x)
                print(f"  compiled {config} at batch {batch} in {time.perf_counter() - t0:.0f} s", flush=True)
                compiled.append(cfn)
            fns = compiled
        t0 = time.perf_counter()
        results = dsm_lite.interleaved_throughput(fns, batch_size=batch, input_size=size, runs=nruns,
                                                  warmup=args.warmup, device=device,
                                                  clock=time.thread_time if args.clock == "cpu" else time.perf_counter)
        elapsed = time.perf_counter() - t0
        dense_tp, dense_macs = results[0].mean, macs[0]
        print(f"\n{name}, batch {batch}, {label}, amp {args.amp}: {nruns} timed rounds after "
              f"{args.warmup} warm-up rounds, {args.clock} time ({elapsed:.0f} s)")
        print(f"{'method':<8} {'backend':<7} {'r':>3} {'GMACs':>7} {'im/s':>9} {'± std':>8} {'speed-up':>9} "
              f"{'MAC red.':>9} {'MAC eff.':>9} {'oracle im/s':>12} {'oracle eff.':>12}")
        by_config = dict(zip(configs, zip(results, macs)))
        summary: Dict[Tuple[str, str], list] = defaultdict(list)
        for config in configs:
            kind, method, r, backend = config
            if kind == "oracle":
                continue
            tp, mc = by_config[config]
            speed, red = tp.mean / dense_tp, dense_macs / mc
            line = (f"{method if kind == 'merged' else 'dense':<8} {backend:<7} {r:>3} {mc / 1e9:>7.3f} "
                    f"{tp.mean:>9.1f} {tp.std:>8.1f} {speed:>9.3f} {red:>9.3f} {speed / red:>9.3f}")
            if kind == "merged" and ("oracle", method, r, "-") in by_config:
                oracle = by_config[("oracle", method, r, "-")][0].mean
                line += f" {oracle:>12.1f} {tp.mean / oracle:>12.3f}"
                summary[method, backend].append((r, speed, speed / red, tp.mean / oracle))
            elif kind == "merged":
                summary[method, backend].append((r, speed, speed / red, float("nan")))
            print(line)
        for (method, backend), rows in summary.items():
            big = [row for row in rows if row[0] >= 8]
            slower = [r for r, s, _, _ in rows if s < 1.0]
            mac_eff = min(e for _, _, e, _ in big) if big else float("nan")
            orc_eff = min(e for _, _, _, e in big) if big else float("nan")
            print(f"  {method} ({backend}): lowest at r>=8: MAC efficiency {mac_eff:.3f}, oracle "
                  f"efficiency {orc_eff:.3f}; slower than dense at r={slower if slower else 'none'}")
        if not args.no_profile:
            x = torch.randn(batch, *size, device=device)
            print(f"  where the time goes (share of profiled op time, one batch of {batch}, r={max(args.r)}):")
            for method in args.methods:
                for backend in args.backend:
                    i = configs.index(("merged", method, max(args.r), backend))
                    parts = time_breakdown(fns[i] if args.compile else Autocast(models[i], device, amp), x)
                    text = ", ".join(f"{k} {v:.1%}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
                    print(f"    {method:<8} {backend:<7} {text}")
        sys.stdout.flush()


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "deit_small_patch16_224"])
    ap.add_argument("--methods", nargs="+", default=["tome", "spatial", "dsm"])
    ap.add_argument("--r", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--batch-sizes", "--batch-size", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--runs", nargs="+", type=int, default=[50],
                    help="timed rounds, per batch size (the last value repeats)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", choices=sorted(AMP), default="none", help="torch.autocast dtype")
    ap.add_argument("--backend", nargs="+", choices=list(dsm_lite.patching.BACKENDS), default=["auto"],
                    help="where merging runs (dsm_lite.patch's backend); several are timed side by "
                         "side in the same interleaved run")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 in float32 matmuls and convolutions on a GPU (default: off, "
                         "the paper's float32)")
    ap.add_argument("--compile", action="store_true", help="time torch.compile-d models")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time CUDA-graph replays of the eager models (GPU only)")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    ap.add_argument("--count-macs", action="store_true",
                    help="also check the schedule's MACs against torchprofile's count")
    ap.add_argument("--no-profile", action="store_true", help="skip the time breakdown")
    ap.add_argument("--no-oracle", action="store_true",
                    help="skip the oracles (each compiled configuration takes minutes)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: wall time (the paper's protocol); cpu: CPU time of the timing thread, "
                         "for a shared CPU (needs --threads 1: other threads' work is not counted)")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and (args.threads != 1 or (args.device or "cpu") != "cpu"):
        ap.error("--clock cpu times the calling thread only: use it with --device cpu --threads 1")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and (device.type != "cuda" or args.compile):
        ap.error("--cuda-graph captures eager models on a CUDA device: use it with --device cuda, "
                 "without --compile (--compile-mode reduce-overhead is the compiled equivalent)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    print(f"device: {machine(device)}; torch {torch.__version__}, timm {timm.__version__}; "
          f"batch sizes {args.batch_sizes}, rounds {args.runs}, warm-up {args.warmup}; amp {args.amp}; "
          f"TF32 {'on' if args.tf32 else 'off'}; merging backends {args.backend}; "
          f"{'compiled' if args.compile else 'eager'}{', CUDA graphs' if args.cuda_graph else ''}; "
          f"{args.clock} clock")
    for name in args.models:
        run_model(name, args, device)


if __name__ == "__main__":
    main()
