"""The fused Triton backend against the eager engine, on a GPU (or rehearsed on the CPU).

Two parts, each printed as a table as it finishes:

1. **Random tokens**, every matching mode of ``dsm_lite.fused_merge`` (ToMe's order and
   sequence order, the paper's windows, joint windows, pruning) in float32, float16 and
   bfloat16, ViT-B-sized (197 tokens, 768 channels, 64-channel feature): the share of
   images whose decisions (``src``, ``dst``, ``keep``) are identical, the largest
   difference of the merged tokens relative to their scale, and whether the sizes are equal.
2. **Real photos** (needs ``DSM_LITE_ASSETS``): the pretrained ViT-Ti, every method at
   r = 16 on both backends, float32 (TF32 off) and fp16 autocast: the share of photos with
   the same groups after the last block, top-1 agreement, and the largest logit difference.

On a GPU the eager engine's ``index_add_`` adds with atomics, in no fixed order, so the
outputs agree to rounding, not to the bit; the decisions should be identical except where two
proposals are equal to float32 rounding. On the CPU (``TRITON_INTERPRET=1``) the tests in
``tests/test_fused_merge.py`` already require bit-identical results; ``--quick`` here only
rehearses the script.

Usage::

    python benchmarks/fused_exactness.py --device cuda --images 64 --photos 256
    TRITON_INTERPRET=1 python benchmarks/fused_exactness.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import dsm_lite
from dsm_lite import fused_merge as fused
from dsm_lite import windows

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def mode_arguments(name: str, b: int, m: int, device: torch.device) -> dict:
    """fused_merge's keyword arguments (and r) for one named case on M = 196 patch tokens."""
    if name in ("tome", "sequence"):
        return dict(mode=fused.GLOBAL, tome_order=name == "tome", r=16)
    if name == "prune":
        return dict(mode=fused.PRUNE, r=16)
    if name == "paper":
        layout = windows.square_layout(m, 7)
        quotas = torch.tensor(windows.window_quotas(layout.counts, 4), dtype=torch.int32)
        return dict(mode=fused.PAPER, r=int(quotas.sum()), window_ids=windows.square_window_ids(m, 7).to(device),
                    quotas=quotas.to(device), quota_starts=(quotas.cumsum(0, dtype=torch.int32) - quotas).to(device))
    g = torch.Generator().manual_seed(0)
    anchors = torch.stack([torch.randperm(m, generator=g) for _ in range(b)]).to(device)
    table = windows.window_ids(torch.arange(m)[None], (14, 14), 7)[0].to(device)
    return dict(mode=fused.JOINT, r=16, anchors=anchors, window_table=table)


def random_tokens(args, device: torch.device) -> bool:
    b, p, m, c = args.images, 1, 196, args.channels
    print(f"\n1. random tokens: {b} images, {p + m} tokens, {c} channels, 64-channel feature")
    print(f"{'mode':<9} {'dtype':<5} {'same decisions':>15} {'max |diff| / scale':>19} {'sizes equal':>12}")
    ok = True
    for name in ("tome", "sequence", "paper", "joint", "prune"):
        kw = mode_arguments(name, b, m, device)
        r = kw.pop("r")
        for label, dtype in DTYPES.items():
            g = torch.Generator().manual_seed(1)
            x = torch.randn(b, p + m, c, generator=g).to(device, dtype)
            metric = torch.randn(b, p + m, 64, generator=g).to(device)
            size = torch.randint(1, 5, (b, p + m, 1), generator=g).float().to(device)
            xo, so, got, _ = fused.fused_merge(x, size, metric, r, p, **kw)
            xe, se, want, _ = fused.eager_merge(x, size, metric, r, p, **kw)
            same = torch.ones(b, dtype=torch.bool, device=device)
            for t_got, t_want in ((got.src, want.src), (got.dst, want.dst), (got.keep, want.keep)):
                if t_want is not None:
                    same &= (t_got == t_want).all(dim=1)
            diff = ((xo.float() - xe.float()).abs().max() / xe.float().abs().max()).item()
            share = same.float().mean().item()
            ok &= share == 1.0 or dtype != torch.float32
            print(f"{name:<9} {label:<5} {share:>15.3f} {diff:>19.2e} {str(torch.equal(so, se)):>12}", flush=True)
    return ok


def real_photos(args, device: torch.device) -> None:
    if not os.environ.get("DSM_LITE_ASSETS"):
        print("\n2. real photos: skipped (DSM_LITE_ASSETS is not set)")
        return
    model = dsm_lite.load_model(dsm_lite.DEFAULT_MODEL, device=device)
    photos = dsm_lite.load_images("imagenet-sample", model, n=args.photos, seed=0).images
    print(f"\n2. real photos: {dsm_lite.DEFAULT_MODEL}, {len(photos)} imagenet-sample photos, r = 16")
    print(f"{'method':<12} {'precision':<9} {'same groups':>12} {'top-1 agree':>12} {'max |logit diff|':>17}")
    cases = [("tome", {}), ("spatial", {}), ("dsm", {}), ("dsm", dict(windows="joint"))]
    for amp in ("fp32", "fp16"):
        if amp == "fp16" and device.type != "cuda":
            continue
        for method, kw in cases:
            out = {}
            for backend in ("eager", "triton"):
                dsm_lite.patch(model, method, r=16, backend=backend, **kw)
                logits, groups = [], []
                for chunk in photos.split(args.batch):
                    with torch.autocast(device.type, torch.float16, enabled=amp == "fp16"):
                        lg, gr = dsm_lite.trace_sources(model, chunk)
                    logits.append(lg.float()), groups.append(gr)
                out[backend] = torch.cat(logits), torch.cat(groups)
            (le, ge), (lt, gt) = out["eager"], out["triton"]
            same = (ge == gt).flatten(1).all(1).float().mean().item()
            agree = (le.argmax(1) == lt.argmax(1)).float().mean().item()
            label = method + (" joint" if kw else "")
            print(f"{label:<12} {amp:<9} {same:>12.3f} {agree:>12.3f} {(le - lt).abs().max().item():>17.2e}",
                  flush=True)
    dsm_lite.unpatch(model)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=64, help="random images per case")
    ap.add_argument("--channels", type=int, default=768)
    ap.add_argument("--photos", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="a CPU rehearsal: 2 images, 64 channels, 4 photos")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.channels, args.photos, args.batch = 2, 64, 4, 4
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fused.check_fused(torch.empty(1, 1, 1, device=device))  # a clear error where the kernels cannot run
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter"
    print(f"device: {name}; torch {torch.__version__}; dsm_lite {dsm_lite.__version__}; TF32 off")
    t0 = time.perf_counter()
    ok = random_tokens(args, device)
    real_photos(args, device)
    print(f"\n{'PASS' if ok else 'FAIL'}: float32 decisions identical on every random image; "
          f"{time.perf_counter() - t0:.0f} s")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
