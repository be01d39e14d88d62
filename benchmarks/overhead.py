"""Where a merged model's extra time goes at small batch (CPU, one thread, thread CPU time).

For one model, method and r it reports:

1. top-level aten ops per forward: the oracle (same token counts, no matching:
   ``dsm_lite.measure.TruncationOracle``) vs the merged model, and the ops per merging block;
2. the thread CPU time per merging block of the engine's steps *inside* a forward pass
   (matching, the size-weighted merge, the attention bias), against the oracle's whole
   forward, interleaved over rounds;
3. the same calls repeated in a tight loop on the same tensors (caches warm), to show how
   much of (2) is the cost of running small ops with caches just flushed by the block's
   large matrix products.

Thread CPU time (not wall time) keeps other processes of a shared machine out of the
numbers, as far as they do not share the core's caches.

Usage::

    python benchmarks/overhead.py --model deit_small_patch16_224 --method tome --r 13
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import timm
import torch

import dsm_lite
from dsm_lite import patching
from dsm_lite.measure import TruncationOracle

clock = time.thread_time


def top_level_ops(fn, x) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x)
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--method", default="tome")
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    oracle = TruncationOracle(model, dsm_lite.schedule(model, args.method, args.r))
    merged = dsm_lite.patch(timm.create_model(args.model).eval(), args.method, r=args.r)
    merging_blocks = sum(b.r > 0 for b in dsm_lite.schedule(merged).blocks)

    ops_o, ops_m = top_level_ops(oracle, x), top_level_ops(merged, x)
    print(f"{args.model}, {args.method} r={args.r}, batch {args.batch}, 1 thread; "
          f"{merging_blocks} merging blocks")
    print(f"top-level aten ops per forward: oracle {ops_o}, merged {ops_m} "
          f"({(ops_m - ops_o) / merging_blocks:.0f} more per merging block)")

    # (2) in situ: wrap the engine's steps with thread-time counters
    acc: collections.Counter = collections.Counter()
    calls = []

    def timed(fn, name, keep=False):
        def wrapper(*a, **k):
            t = clock()
            out = fn(*a, **k)
            acc[name] += clock() - t
            if keep and len(calls) < 64:
                state = a[0] if isinstance(a[0], patching.MergeState) else None
                snapshot = None if state is None else (state.size, state.anchors)
                calls.append((name, fn, a, k, state, snapshot))
            return out
        return wrapper

    saved = patching.MergeState.match, patching.merge_wavg, patching.MergeState.attn_bias
    patching.MergeState.match = timed(saved[0], "matching", keep=True)
    patching.merge_wavg = timed(saved[1], "merge_wavg", keep=True)
    patching.MergeState.attn_bias = timed(saved[2], "attn_bias")
    per = collections.defaultdict(list)
    try:
        with torch.no_grad():
            for step in range(args.rounds + 2):
                t = clock()
                oracle(x)
                t_oracle = clock() - t
                acc.clear()
                t = clock()
                merged(x)
                t_merged = clock() - t
                if step >= 2:
                    per["oracle forward"].append(t_oracle)
                    per["merged forward"].append(t_merged)
                    for k, v in acc.items():
                        per[k].append(v / merging_blocks)
    finally:
        patching.MergeState.match, patching.merge_wavg, patching.MergeState.attn_bias = saved
    med = {k: statistics.median(v) for k, v in per.items()}
    extra = med["merged forward"] - med["oracle forward"]
    print(f"forward: oracle {med['oracle forward'] * 1e3:.1f} ms, merged {med['merged forward'] * 1e3:.1f} ms "
          f"(+{extra * 1e3:.1f} ms, {extra / merging_blocks * 1e6:.0f} us per merging block; "
          f"oracle efficiency {med['oracle forward'] / med['merged forward']:.3f})")
    print("per merging block, in the forward pass vs the same call in a tight loop (warm caches):")
    for name in ("matching", "merge_wavg", "attn_bias"):
        warm = "-"
        sample = next((c[1:] for c in calls if c[0] == name), None)
        if sample is not None:
            fn, a, k, state, snapshot = sample
            ts = []
            with torch.no_grad():
                for i in range(55):
                    if state is not None:  # the state the call saw (sizes, anchors)
                        state.size, state.anchors = snapshot
                    t = clock()
                    fn(*a, **k)
                    if i >= 5:
                        ts.append(clock() - t)
            warm = f"{statistics.median(ts) * 1e6:7.0f} us"
        print(f"  {name:<11} {med.get(name, 0) * 1e6:7.0f} us in situ   {warm} warm")


if __name__ == "__main__":
    main()
