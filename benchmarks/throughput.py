"""Dense vs ToMe vs spatial vs DSM: throughput speed-up against MAC reduction, in one run.

For each model, every configuration (dense, then each method at each r) is timed
round-robin (``dsm_lite.interleaved_throughput``: one batch per configuration per round,
warm-up rounds discarded, device synchronised), so slow drifts of a shared machine hit all
configurations alike. It prints, per configuration:

    GMACs, images/s (mean ± std over runs), speed-up = im/s / dense im/s,
    MAC reduction = dense MACs / MACs, and efficiency = speed-up / MAC reduction
    (1.0 when merging costs nothing beyond the MACs it saves).

It then profiles one batch per method with ``torch.profiler`` and splits the time into the
transformer's own work and the merging overhead (similarity and matching, sorts, gathers
and scatters), so one can see where any shortfall goes.

Usage (numbers are machine-dependent; commit the output with the machine named):

    python benchmarks/throughput.py --models vit_tiny_patch16_224 deit_small_patch16_224
"""
from __future__ import annotations

import argparse
import platform
import sys
from collections import defaultdict
from typing import Dict, List

import timm
import torch

import dsm_lite
from dsm_lite.measure import time_breakdown


def build(name: str, device: torch.device) -> torch.nn.Module:
    # random weights: speed does not depend on the values, and this runs anywhere
    return timm.create_model(name, pretrained=False).eval().to(device)


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "deit_small_patch16_224"])
    ap.add_argument("--methods", nargs="+", default=["tome", "spatial", "dsm"])
    ap.add_argument("--r", nargs="+", type=int, default=[4, 8, 13, 16])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {where}; torch {torch.__version__}, timm {timm.__version__}; "
          f"batch {args.batch_size}, {args.runs} timed rounds after {args.warmup} warm-up rounds")
    for name in args.models:
        model = build(name, device)
        configs = [("dense", 0)] + [(m, r) for m in args.methods for r in args.r]
        setups, macs = [], []
        for method, r in configs:
            def setup(method=method, r=r):
                if method == "dense":
                    dsm_lite.unpatch(model)
                else:
                    dsm_lite.patch(model, method, r=r)
            setup()
            macs.append(dsm_lite.count_macs(model, (3,) + tuple(model.patch_embed.img_size)))
            setups.append(setup)
        results = dsm_lite.interleaved_throughput(
            [model] * len(configs), batch_size=args.batch_size,
            input_size=(3,) + tuple(model.patch_embed.img_size), runs=args.runs,
            warmup=args.warmup, device=device, setups=setups)
        dense_tp, dense_macs = results[0].mean, macs[0]
        print(f"\n{name}")
        print(f"{'method':<8} {'r':>3} {'GMACs':>7} {'im/s':>8} {'± std':>7} {'speed-up':>9} "
              f"{'MAC red.':>9} {'efficiency':>10}")
        worst = {}
        for (method, r), tp, mc in zip(configs, results, macs):
            speed, red = tp.mean / dense_tp, dense_macs / mc
            eff = speed / red
            print(f"{method:<8} {r:>3} {mc / 1e9:>7.3f} {tp.mean:>8.1f} {tp.std:>7.1f} "
                  f"{speed:>9.3f} {red:>9.3f} {eff:>10.3f}")
            if method != "dense":
                worst.setdefault(method, []).append((r, speed, eff))
        for method, rows in worst.items():
            slower = [r for r, s, _ in rows if s < 1.0]
            low = min(e for r, _, e in rows if r >= 8) if any(r >= 8 for r, _, _ in rows) else float("nan")
            print(f"  {method}: lowest efficiency at r>=8: {low:.3f}; "
                  f"slower than dense at r={slower if slower else 'none'}")
        x = torch.randn(args.batch_size, 3, *model.patch_embed.img_size, device=device)
        print("  where the time goes (share of profiled op time, one batch, largest r):")
        for method in args.methods:
            dsm_lite.patch(model, method, r=max(args.r))
            parts = time_breakdown(model, x)
            text = ", ".join(f"{k} {v:.1%}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
            print(f"    {method:<8} {text}")
        dsm_lite.unpatch(model)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
