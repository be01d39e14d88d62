"""Check that a change to the merging engine leaves its results unchanged.

Runs every method with every option on real photos (the pretrained ViT-Ti, 16
imagenet-sample photos) and on random-weight variants with other prefixes (distilled:
two prefix tokens; no class token with average pooling: none), and records the logits and,
for every merging block, the merge it chose (``src``, ``dst``, ``keep`` indices). ``--save``
writes them to a file; ``--compare`` reruns and reports, per configuration, the largest
absolute logit difference and whether every matching decision is identical.

Usage (needs ``DSM_LITE_ASSETS``)::

    git stash; python benchmarks/regression.py --save /tmp/before.pt; git stash pop
    python benchmarks/regression.py --compare /tmp/before.pt
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Tuple

import timm
import torch

import dsm_lite
from dsm_lite import patching

CONFIGS: List[Tuple[str, dict]] = (
    [(m, dict(r=r)) for m in ("tome", "spatial", "dsm") for r in (4, 8, 16)]
    + [("tome", dict(r=(13, 0.5))), ("dsm", dict(r=8, window=2, window_growth=0)),
       ("spatial", dict(r=8, window=3)), ("dsm", dict(r=8, trace_source=True))]
    + [(m, dict(r=8, feature=f)) for m in ("tome", "spatial", "dsm") for f in ("q", "v", "x", "random")]
    + [(m, dict(r=8, reduction="prune")) for m in ("tome", "spatial", "dsm")]
    + [(m, dict(r=8, prop_attn=False)) for m in ("tome", "spatial", "dsm")]
)


def models() -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    distilled = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    torch.manual_seed(0)
    avg = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg").eval()
    return {"vit_tiny (pretrained)": dsm_lite.load_model(device="cpu"),
            "deit_tiny_distilled (random)": distilled, "vit_tiny avg, no cls (random)": avg}


def record(model, images) -> Dict[str, dict]:
    """Logits and per-block merges of every configuration."""
    out = {}
    merges: List[Tuple[torch.Tensor, ...]] = []
    original = patching.MergeState.match

    def match(self, index, x):
        m = original(self, index, x)
        merges.append(tuple(None if t is None else t.clone() for t in (m.src, m.dst, m.keep)))
        return m

    patching.MergeState.match = match
    try:
        with torch.no_grad():
            for method, kw in CONFIGS:
                dsm_lite.patch(model, method, **kw)
                merges.clear()
                logits = model(images)
                out[f"{method} {kw}"] = dict(logits=logits, merges=list(merges))
    finally:
        patching.MergeState.match = original
        dsm_lite.unpatch(model)
    return out


def run() -> Dict[str, Dict[str, dict]]:
    results = {}
    for name, model in models().items():
        images = dsm_lite.load_images("imagenet-sample", model=model, n=16, seed=0).images
        results[name] = record(model, images)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save")
    group.add_argument("--compare")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the same reduction order in every run
    results = run()
    if args.save:
        torch.save(results, args.save)
        print(f"saved {sum(map(len, results.values()))} configurations to {args.save}")
        return 0
    before = torch.load(args.compare)
    worst, all_same = 0.0, True
    for name, runs in results.items():
        print(name)
        for key, now in runs.items():
            old = before[name][key]
            diff = (now["logits"] - old["logits"]).abs().max().item()
            same = len(now["merges"]) == len(old["merges"]) and all(
                (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for ma, mb in zip(now["merges"], old["merges"]) for a, b in zip(ma, mb))
            worst, all_same = max(worst, diff), all_same and same
            print(f"  {key:<62} max |logit diff| {diff:.2e}  merges identical: {same}")
    print(f"overall: max |logit diff| {worst:.2e}; every matching decision identical: {all_same}")
    return 0 if all_same and worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
