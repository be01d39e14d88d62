"""Which reading of DSM's windows fits the paper's Table 2 MACs? (issue #11, part 1)

Table 2 of the paper gives ViT-B/16 GFLOPs (torchprofile MACs) of DSM at r = 4 ... 20. A
schedule that removes exactly r tokens per merging block cannot produce its irregular steps.
This script computes, for several readings of the paper's windows, the MACs per image of
ViT-B/16 at 224 px and their error against Table 2, and prints a markdown table.

Every variant: delay D (default depth / 6 = 2); before each local block the M patch tokens
are laid row-major, in sequence order, on a square (side ``side(M)``), cut into w x w windows
(``per_side(S, w)`` per side, padded at the bottom right); each window merges ``quota`` of
its tokens, at most ``cap(n)`` of its n real tokens; once ``switch(w, S)`` holds, merging is
global (r per block) for the rest of the network. The block MACs are dsm_lite's
(``schedules._block_macs``, torchprofile's counting), so the chosen reading must equal
``dsm_lite.schedule(model, "dsm", r).macs`` exactly, which the script asserts.

Run from the repository root: ``PYTHONPATH=$PWD python benchmarks/table2_fit.py`` (seconds).
"""
from __future__ import annotations

import math

import torch

PAPER = {4: 16.10, 8: 14.46, 12: 13.27, 16: 11.96, 20: 10.16}


def _layout_counts(m, w, side_rule, per_side_rule):
    s = side_rule(m)
    k = per_side_rule(s, w)
    counts = [0] * (k * k)
    for i in range(m):
        y, x = divmod(i, s)
        counts[min(y // w, k - 1) * k + min(x // w, k - 1)] += 1
    return k * k, counts


def schedule_macs(shape, r, delay=2, w0=7, growth=1, from_block0=True,
                  side=lambda m: math.isqrt(m - 1) + 1 if m else 0,
                  per_side=lambda s, w: -(-s // w),
                  quota=lambda r, nw: -(-r // nw),
                  cap=lambda n: n // 2,
                  switch=lambda w, s: w >= s):
    """MACs per image of one reading (see the module docstring)."""
    from dsm_lite.schedules import _block_macs

    p, n = shape.num_prefix, shape.num_prefix + shape.num_patches
    total, local = 0, True
    for i in range(shape.depth):
        got, mode, nw, w = 0, "none", 1, None
        if i >= delay:
            w = w0 + growth * (i if from_block0 else i - delay)
            m = n - p
            if local and not switch(w, side(m)):
                nw, counts = _layout_counts(m, w, side, per_side)
                q = quota(r, nw)
                got, mode = sum(min(q, cap(c)) for c in counts), "local"
            else:
                local = False
                got, mode, nw, w = min(r, (n - p) // 2), "global", 1, None
        total += _block_macs(shape, n, n - got, mode if got else "none", nw, w, "k", "merge")
        n -= got
    c = shape.dim
    stem = shape.num_patches * c * shape.in_chans * shape.patch[0] * shape.patch[1]
    head = n * c + c * shape.num_classes
    return stem + total + head


VARIANTS = {
    "chosen: w = 7 + block index (9 at block D=2), cap n//2": {},
    "lead: w = 7 at the first local block, cap n//2": dict(from_block0=False),
    "chosen, cap ceil(n/2)": dict(cap=lambda n: (n + 1) // 2 if n > 1 else 0),
    "chosen, cap (n-1)//2": dict(cap=lambda n: (n - 1) // 2),
    "chosen, no cap (quota if n >= 2)": dict(cap=lambda n: n if n >= 2 else 0),
    "lead, cap ceil(n/2)": dict(from_block0=False, cap=lambda n: (n + 1) // 2 if n > 1 else 0),
    "lead, cap (n-1)//2": dict(from_block0=False, cap=lambda n: (n - 1) // 2),
    "chosen, quota ceil(r/4) for any window count": dict(quota=lambda r, nw: -(-r // 4)),
    "chosen, quota ceil(r/4), global once w > S": dict(quota=lambda r, nw: -(-r // 4),
                                                       switch=lambda w, s: w > s),
    "lead, quota ceil(r/4), global once w > S": dict(from_block0=False, quota=lambda r, nw: -(-r // 4),
                                                     switch=lambda w, s: w > s),
    "chosen, windows per side floor(S/w)": dict(per_side=lambda s, w: max(s // w, 1)),
    "chosen, windows per side round(S/w)": dict(per_side=lambda s, w: max(int(s / w + 0.5), 1)),
    "chosen, global once w > S": dict(switch=lambda w, s: w > s),
    "lead, global once w > S": dict(from_block0=False, switch=lambda w, s: w > s),
    "lead, global once 2w > S (one window per side)": dict(from_block0=False, switch=lambda w, s: 2 * w > s),
    "chosen, side floor(sqrt M)": dict(side=lambda m: max(math.isqrt(m), 1)),
    "chosen, side round(sqrt M)": dict(side=lambda m: max(int(math.sqrt(m) + 0.5), 1)),
    "lead, side round(sqrt M)": dict(from_block0=False, side=lambda m: max(int(math.sqrt(m) + 0.5), 1)),
    "w = 8 at the first local block": dict(from_block0=False, w0=8),
    "w = 10 at the first local block": dict(from_block0=False, w0=10),
    "chosen, window growth 0 (w = 9 throughout)": dict(growth=0, w0=9, from_block0=False),
    "chosen, window growth 2": dict(growth=2, w0=7),
    "chosen, D = 1": dict(delay=1),
    "chosen, D = 3": dict(delay=3),
    "chosen, D = 4": dict(delay=4),
}


def main() -> None:
    import timm

    import dsm_lite
    from dsm_lite.schedules import ModelShape

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    shape = ModelShape.from_model(model)
    for r in PAPER:  # the chosen reading is the package's default
        assert schedule_macs(shape, r) == dsm_lite.schedule(model, "dsm", r).macs, r
    rows = dict(VARIANTS)
    print("| reading | " + " | ".join(f"r={r}" for r in PAPER) + " | max abs error |")
    print("|---|" + "---|" * (len(PAPER) + 1))
    print("| paper, Table 2 | " + " | ".join(f"{v:.2f}" for v in PAPER.values()) + " | |")

    def line(name, macs):
        errs = [100 * (macs[r] / 1e9 / PAPER[r] - 1) for r in PAPER]
        cells = " | ".join(f"{macs[r] / 1e9:.2f} ({e:+.1f}%)" for r, e in zip(PAPER, errs))
        print(f"| {name} | {cells} | {max(map(abs, errs)):.2f}% |")

    line("joint (dsm_lite before: top-r over all windows)",
         {r: dsm_lite.schedule(model, "dsm", r, windows="joint").macs for r in PAPER})
    for name, kw in rows.items():
        line(name, {r: schedule_macs(shape, r, **kw) for r in PAPER})


if __name__ == "__main__":
    main()
