"""Half precision vs float32 on real photos: does autocast change what merging does?

For the pretrained ViT-Ti (offline assets) on ``--n`` imagenet-sample photos, each method at
each r runs twice, in float32 and under ``torch.autocast`` (bfloat16 on CPU by default), and
the script reports, for the merged model under autocast against the merged model in
float32:

- top-1 agreement (fraction of photos with the same predicted class) and the largest and
  mean absolute logit difference;
- matching agreement, from the final token groups (which patches ended up merged together,
  ``dsm_lite.trace_sources``): the fraction of patches whose group (the set of patches it
  shares a token with) is identical, and the fraction of photos where every group is;
- top-1 accuracy of both against the labels.

The dense model's own float32-vs-autocast agreement is the baseline: it is what half
precision does without any merging. Matching scores, token sizes and the log-size bias are
computed in float32 under autocast (see ``dsm_lite.merging``), so the remaining differences
come from the bfloat16 transformer itself (keys differ slightly, so near-tied merges can
flip).

Usage (needs ``DSM_LITE_ASSETS``)::

    python benchmarks/precision.py --n 256 --amp bf16 > benchmarks/results/precision-cpu-bf16.txt
"""
from __future__ import annotations

import argparse
import time
from typing import Tuple

import torch

import dsm_lite

AMP = {"fp16": torch.float16, "bf16": torch.bfloat16}


@torch.no_grad()
def run(model, images: torch.Tensor, amp, batch: int, trace: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, groups) over ``images`` in batches, under autocast when ``amp`` is a dtype."""
    device = next(model.parameters()).device
    logits, groups = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            if trace:
                out, grp = dsm_lite.trace_sources(model, x)
                groups.append(grp.cpu())
            else:
                out = model(x)
        logits.append(out.float().cpu())
    return torch.cat(logits), (torch.cat(groups) if groups else None)


def group_agreement(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """Groups (B, H, W) -> (fraction of patches with the same group, of photos with all)."""
    a, b = a.flatten(1), b.flatten(1)
    same_a = a[:, :, None] == a[:, None, :]  # (B, P, P): patches i and j share a token
    same_b = b[:, :, None] == b[:, None, :]
    row = (same_a == same_b).all(-1)  # (B, P): patch i has the same group in both
    return row.float().mean().item(), row.all(-1).float().mean().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--amp", choices=sorted(AMP), default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["tome", "spatial", "dsm"])
    ap.add_argument("--r", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", default=None,
                    help="a torch.save'd dict(images=, labels=) of preprocessed photos to use instead "
                         "(for a machine without the photo assets)")
    ap.add_argument("--save-images", default=None, help="save the photos used, as for --images")
    args = ap.parse_args(argv)
    amp = AMP[args.amp]
    t0 = time.time()
    model = dsm_lite.load_model(device=args.device)
    if args.images:
        saved = torch.load(args.images)
        images, labels = saved["images"][:args.n].float(), saved["labels"][:args.n]
    else:
        data = dsm_lite.load_images("imagenet-sample", model=model, n=args.n, seed=0)
        images, labels = data.images, data.labels
        if args.save_images:
            torch.save(dict(images=images.half(), labels=labels), args.save_images)
    print(f"{dsm_lite.models.DEFAULT_MODEL} on {len(labels)} imagenet-sample photos (seed 0), "
          f"{args.device}: float32 vs torch.autocast({args.amp}); torch {torch.__version__}")
    print(f"{'config':<14} {'top-1 agree':>11} {'max |dlogit|':>12} {'mean |dlogit|':>13} "
          f"{'same groups':>11} {'same photos':>11} {'acc fp32':>9} {'acc amp':>8}")

    def report(name, ref, got, same=None):
        """same: (patch agreement, photo agreement) or None."""
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        diff = (ref - got).abs()
        acc32 = (ref.argmax(-1) == labels).float().mean().item()
        acc16 = (got.argmax(-1) == labels).float().mean().item()
        patches, photos = ("-", "-") if same is None else (f"{same[0]:.3f}", f"{same[1]:.3f}")
        print(f"{name:<14} {agree:>11.3f} {diff.max().item():>12.3f} {diff.mean().item():>13.4f} "
              f"{patches:>11} {photos:>11} {acc32:>9.3f} {acc16:>8.3f}", flush=True)

    dense32, _ = run(model, images, None, args.batch, trace=False)
    dense16, _ = run(model, images, amp, args.batch, trace=False)
    report("dense", dense32, dense16)
    for method in args.methods:
        for r in args.r:
            dsm_lite.patch(model, method, r=r)
            ref, g32 = run(model, images, None, args.batch, trace=True)
            got, g16 = run(model, images, amp, args.batch, trace=True)
            report(f"{method} r={r}", ref, got, group_agreement(g32, g16))
    dsm_lite.unpatch(model)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
