"""Deliberately naive reference implementations, written from the algorithms' descriptions.

Everything here loops over images and tokens in plain Python (float64 arithmetic), so it shares
no code and no tensor tricks with ``dsm_lite.merging``. The tests compare the engine against it.

Conventions: ``x`` (B, N, C) and ``metric`` (B, N, C') tensors; ``size`` (B, N, 1) tensor or
None (all ones); ``sources`` a list (per image) of lists (per token) of sets of original token
indices, or None (token i holds {i}). Every function returns the merged ``x`` (float64 tensor),
``size`` (float64 tensor, (B, N - r, 1)) and the new ``sources``. The last section holds small
shared test helpers (model and photo loading, block hooks), not references.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

Sources = List[List[Set[int]]]

__all__ = [
    "cosine",
    "reference_tome_merge",
    "reference_window_merge",
    "reference_square_window_ids",
    "reference_quota_window_merge",
    "reference_prune",
    "reference_window_ids",
    "reference_parse_r",
    "reference_vit_forward",
    "reference_forward_for_schedule",
]


def cosine(u: Sequence[float], v: Sequence[float]) -> float:
    """Cosine similarity of two python vectors."""
    dot = sum(a * b for a, b in zip(u, v))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / (nu * nv)


def _rows(t: Tensor) -> List[List[List[float]]]:
    return t.detach().double().cpu().tolist()



def _emit_survivors(xs, sizes, srcs, groups, merged, n, outs) -> None:
    """Append one image's surviving tokens (in sequence order) to the four output lists."""
    out_x, out_size, out_src, out_kept = outs
    kept = [t for t in range(n) if t not in merged]
    combined = [_combine(xs, sizes, srcs, groups[t]) for t in kept]
    out_x.append([c[0] for c in combined])
    out_size.append([c[1] for c in combined])
    out_src.append([c[2] for c in combined])
    out_kept.append(kept)

def _combine(xs, sizes, srcs, members: List[int]):
    """Size-weighted average of ``members`` (features, size, union of sources)."""
    total = sum(sizes[i] for i in members)
    c = len(xs[members[0]])
    feat = [sum(sizes[i] * xs[i][k] for i in members) / total for k in range(c)]
    src = set().union(*(srcs[i] for i in members))
    return feat, total, src


def _defaults(x: Tensor, size: Optional[Tensor], sources: Optional[Sources]):
    b, n, _ = x.shape
    sizes = [[1.0] * n for _ in range(b)] if size is None else [[s[0] for s in img] for img in _rows(size)]
    srcs = [[{i} for i in range(n)] for _ in range(b)] if sources is None else sources
    return sizes, srcs


def _pack(out_x, out_size, out_src) -> Tuple[Tensor, Tensor, Sources]:
    return (torch.tensor(out_x, dtype=torch.float64),
            torch.tensor(out_size, dtype=torch.float64)[..., None], out_src)


def reference_tome_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    num_protected: int = 0,
    size: Optional[Tensor] = None,
    sources: Optional[Sources] = None,
    order: str = "tome",
    return_kept: bool = False,
):
    """One step of ToMe's bipartite soft matching, token by token.

    - A = tokens at even positions, B = odd positions (prefix tokens included in the count).
    - Score of a pair = cosine similarity of ``metric``. Protected tokens (positions < P) are
      never sources (their A rows score -inf) and never destinations (B columns score -inf).
    - Every A token picks its best B (first B on ties).
    - The r A tokens with the highest best-score are merged (ties: lower A index first);
      r is clamped to (N - P) // 2.
    - A merged group is the destination plus every source pointing at it; its feature is the
      size-weighted average of all of them, its size the sum.
    - ``order="tome"``: P > 0: prefix tokens first (original order), then unmerged A tokens
      ascending, then B tokens ascending; P == 0: unmerged A tokens in the order of the
      ranking (best score first, ties by A index), then every B token.
      ``order="sequence"``: survivors in input order.

    With ``return_kept``, also returns, per image, the input position of the token each output
    token continues (the destination of a merged group, or the unmerged token itself).
    """
    b, n, _ = x.shape
    p = num_protected
    r = min(r, max((n - p) // 2, 0))
    xs_all, ms_all = _rows(x), _rows(metric)
    sizes_all, srcs_all = _defaults(x, size, sources)
    out_x, out_size, out_src, out_kept = [], [], [], []
    for img in range(b):
        xs, ms, sizes, srcs = xs_all[img], ms_all[img], sizes_all[img], srcs_all[img]
        if r <= 0:
            out_x.append(xs)
            out_size.append(list(sizes))
            out_src.append([set(s) for s in srcs])
            out_kept.append(list(range(n)))
            continue
        side_a = [i for i in range(n) if i % 2 == 0]
        side_b = [i for i in range(n) if i % 2 == 1]
        best = {}  # A position -> (score, B position)
        for a in side_a:
            best_score, best_b = None, None
            for bb in side_b:
                s = -math.inf if (a < p or bb < p) else cosine(ms[a], ms[bb])
                if best_score is None or s > best_score:
                    best_score, best_b = s, bb
            best[a] = (best_score, best_b)
        ranking = sorted(side_a, key=lambda a: (-best[a][0], a))
        merged = ranking[:r]
        for a in merged:
            assert best[a][0] > -math.inf, "reference: a protected token would merge"
        groups = {bb: [bb] for bb in side_b}
        for a in merged:
            groups[best[a][1]].append(a)
        survivors = {a: [a] for a in side_a if a not in merged}
        survivors.update(groups)
        if order == "sequence":
            out_order = sorted(survivors)
        elif order == "tome":
            unmerged = [a for a in ranking[r:]]
            if p > 0:
                prefix = list(range(p))
                out_order = prefix + sorted(a for a in unmerged if a >= p) + [bb for bb in side_b if bb >= p]
            else:
                out_order = unmerged + side_b
        else:
            raise ValueError(order)
        fx, fs, fsrc = [], [], []
        for t in out_order:
            feat, total, src = _combine(xs, sizes, srcs, survivors[t])
            fx.append(feat)
            fs.append(total)
            fsrc.append(src)
        out_x.append(fx)
        out_size.append(fs)
        out_src.append(fsrc)
        out_kept.append(list(out_order))
    packed = _pack(out_x, out_size, out_src)
    return packed + (out_kept,) if return_kept else packed


def reference_window_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    window_ids: Tensor,
    num_windows: int,
    num_protected: int = 0,
    size: Optional[Tensor] = None,
    sources: Optional[Sources] = None,
    return_kept: bool = False,
):
    """DSM's windowed bipartite matching, token by token (see ``window_soft_matching``).

    - Patch tokens (after the P prefix tokens) are grouped by ``window_ids``.
    - Inside a window, tokens are ranked 0, 1, ... in sequence order; rank k goes to B when
      (k + P) is odd, else to A (ToMe's parity, counting the prefix).
    - Each A token picks its most similar B token of the same window (first on ties); an A
      token with no B in its window scores -inf.
    - The r best proposals over all windows of the image are merged; ties are broken in
      (window, A rank) order; r is clamped to (M - num_windows) // 2, M patch tokens.
    - Survivors keep their sequence order; prefix tokens never merge.

    ``return_kept`` as in :func:`reference_tome_merge`.
    """
    b, n, _ = x.shape
    p = num_protected
    m = n - p
    r = min(r, max((m - num_windows) // 2, 0))
    xs_all, ms_all = _rows(x), _rows(metric)
    wids_all = window_ids.tolist()
    sizes_all, srcs_all = _defaults(x, size, sources)
    out_x, out_size, out_src, out_kept = [], [], [], []
    for img in range(b):
        xs, ms, sizes, srcs, wids = xs_all[img], ms_all[img], sizes_all[img], srcs_all[img], wids_all[img]
        proposals = []  # (score, window, A rank, A position, B position)
        for w in range(num_windows):
            members = [p + i for i in range(m) if wids[i] == w]
            side_a = [(k, t) for k, t in enumerate(members) if (k + p) % 2 == 0]
            side_b = [t for k, t in enumerate(members) if (k + p) % 2 == 1]
            for arank, (_, a) in enumerate(side_a):
                best_score, best_b = -math.inf, None
                for bb in side_b:
                    s = cosine(ms[a], ms[bb])
                    if best_b is None or s > best_score:
                        best_score, best_b = s, bb
                proposals.append((best_score, w, arank, a, best_b))
        proposals.sort(key=lambda e: (-e[0], e[1], e[2]))
        chosen = proposals[:r] if r > 0 else []
        merged = set()
        groups = {t: [t] for t in range(n)}
        for score, _, _, a, bb in chosen:
            assert bb is not None and score > -math.inf, "reference: clamp not satisfiable"
            groups[bb].append(a)
            merged.add(a)
        _emit_survivors(xs, sizes, srcs, groups, merged, n, (out_x, out_size, out_src, out_kept))
    packed = _pack(out_x, out_size, out_src)
    return packed + (out_kept,) if return_kept else packed


def reference_square_window_ids(num_tokens: int, window: int) -> List[int]:
    """Paper windows: lay positions 0..M-1 row by row on an S x S square, S = ceil(sqrt(M)),
    then walk the square window by window (raster order over w x w windows) and label them."""
    side = 0
    while side * side < num_tokens:
        side += 1
    per_side = -(-side // window) if side else 0
    table = {}
    wid = 0
    for wy in range(per_side):
        for wx in range(per_side):
            for y in range(wy * window, (wy + 1) * window):
                for x in range(wx * window, (wx + 1) * window):
                    if y < side and x < side and y * side + x < num_tokens:
                        table[y * side + x] = wid
            wid += 1
    return [table[i] for i in range(num_tokens)]


def reference_quota_window_merge(
    x: Tensor,
    metric: Tensor,
    window_ids: Sequence[int],
    quota,
    num_protected: int = 0,
    size: Optional[Tensor] = None,
    sources: Optional[Sources] = None,
    return_kept: bool = False,
):
    """Paper DSM's windowed matching, window by window (see ``window_quota_matching``).

    - Patch tokens (after the P prefix tokens) are grouped by ``window_ids`` (one list for
      every image).
    - Inside a window, tokens are ranked 0, 1, ... in sequence order; rank k goes to B when
      (k + P) is odd, else to A.
    - Each A token picks its most similar B token of the same window (first on ties).
    - Window w merges its best ``min(quota_w, n_w // 2)`` proposals (ties: lower A rank
      first), n_w its tokens; ``quota`` is an int (every window) or one int per window.
    - Survivors keep their sequence order; prefix tokens never merge.

    ``return_kept`` as in :func:`reference_tome_merge`.
    """
    b, n, _ = x.shape
    p = num_protected
    m = n - p
    window_ids = list(window_ids)
    assert len(window_ids) == m
    num_windows = max(window_ids) + 1 if window_ids else 0
    quotas = [quota] * num_windows if isinstance(quota, int) else list(quota)
    xs_all, ms_all = _rows(x), _rows(metric)
    sizes_all, srcs_all = _defaults(x, size, sources)
    out_x, out_size, out_src, out_kept = [], [], [], []
    for img in range(b):
        xs, ms, sizes, srcs = xs_all[img], ms_all[img], sizes_all[img], srcs_all[img]
        groups = {t: [t] for t in range(n)}
        merged = set()
        for w in range(num_windows):
            members = [p + i for i in range(m) if window_ids[i] == w]
            side_a = [t for k, t in enumerate(members) if (k + p) % 2 == 0]
            side_b = [t for k, t in enumerate(members) if (k + p) % 2 == 1]
            proposals = []  # (score, A rank, A position, B position)
            for arank, a in enumerate(side_a):
                best_score, best_b = -math.inf, None
                for bb in side_b:
                    s = cosine(ms[a], ms[bb])
                    if best_b is None or s > best_score:
                        best_score, best_b = s, bb
                proposals.append((best_score, arank, a, best_b))
            proposals.sort(key=lambda e: (-e[0], e[1]))
            for score, _, a, bb in proposals[: min(quotas[w], len(members) // 2)]:
                assert bb is not None and score > -math.inf
                groups[bb].append(a)
                merged.add(a)
        _emit_survivors(xs, sizes, srcs, groups, merged, n, (out_x, out_size, out_src, out_kept))
    packed = _pack(out_x, out_size, out_src)
    return packed + (out_kept,) if return_kept else packed


def reference_prune(metric: Tensor, r: int, num_protected: int = 0) -> List[List[int]]:
    """Indices kept (in order) when dropping the r lowest-L2-norm non-prefix tokens.

    Ties: the lower index is dropped first. r is clamped so at least one patch token stays.
    """
    b, n, _ = metric.shape
    p = num_protected
    r = min(r, max(n - p - 1, 0))
    kept = []
    for rows in _rows(metric):
        norms = [(math.sqrt(sum(v * v for v in row)), i) for i, row in enumerate(rows) if i >= p]
        dropped = {i for _, i in sorted(norms)[: max(r, 0)]}
        kept.append([i for i in range(n) if i not in dropped])
    return kept


def reference_window_ids(anchors: Tensor, grid: Tuple[int, int], window: int) -> List[List[int]]:
    """Window id of each anchor with a double loop over the padded grid of windows."""
    h, w = grid
    per_col = -(-h // window)
    per_row = -(-w // window)
    table = {}
    wid = 0
    for wy in range(per_col):
        for wx in range(per_row):
            for y in range(wy * window, (wy + 1) * window):
                for x in range(wx * window, (wx + 1) * window):
                    if y < h and x < w:
                        table[y * w + x] = wid
            wid += 1
    return [[table[a] for a in row] for row in anchors.tolist()]


def reference_parse_r(num_layers: int, r) -> List[int]:
    """ToMe's ``parse_r`` (tome/utils.py), re-typed from the official repository's logic."""
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    elif isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


@torch.no_grad()
def reference_vit_forward(
    model,
    images: Tensor,
    r_per_block: Sequence[int],
    prop_attn: bool = True,
    order: str = "tome",
    feature: str = "k",
    windows: Optional[Sequence[Optional[int]]] = None,
    paper_windows: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
) -> Tuple[Tensor, List[int], Sources]:
    """A timm ViT forward written out by hand, merging with the references above.

    Uses only the model's submodules (patch_embed, pos embed, norm1, attn.qkv, q/k_norm,
    attn.proj, ls1, norm2, mlp, ls2, norm, fc_norm, head); attention is an explicit softmax
    with + log(size) on the logits (proportional attention).

    ``windows[i]`` (optional): block i merges inside windows of that many original patches
    (``reference_window_merge``, windows read from each token's anchor: the patch of the
    token it continues), else globally (``reference_tome_merge`` with ``order``).
    ``paper_windows[i]`` (optional): ``(w, quota)``, block i merges inside paper windows w
    tokens wide laid on the square of the tokens entering it (``reference_square_window_ids``),
    each window giving ``quota`` (``reference_quota_window_merge``); r_per_block[i] is then
    ignored.

    Returns the logits, the number of tokens entering each block (then leaving the last) and
    the final sources.
    """
    p = model.num_prefix_tokens
    grid = tuple(model.patch_embed.grid_size)
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    b, n, c = x.shape
    size = torch.ones(b, n, 1, dtype=x.dtype)
    sources: Optional[Sources] = None
    anchors = [list(range(n - p)) for _ in range(b)]
    counts = []
    for i, (blk, r) in enumerate(zip(model.blocks, r_per_block)):
        counts.append(x.shape[1])
        attn = blk.attn
        block_input = x
        h = blk.norm1(x)
        n = x.shape[1]
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = torch.einsum("bhid,bhjd->bhij", q, k) * attn.head_dim ** -0.5
        if prop_attn:
            logits = logits + size[:, None, None, :, 0].log()
        weights = torch.exp(logits - logits.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2).reshape(b, n, -1)
        out = attn.proj(attn.norm(out))
        x = x + blk.ls1(out)
        paper = None if paper_windows is None else paper_windows[i]
        if r > 0 or paper:
            metric = block_input if feature == "x" else {"k": k, "q": q, "v": v}[feature].mean(dim=1)
            window = None if windows is None else windows[i]
            if paper:
                wid = reference_square_window_ids(n - p, paper[0])
                x, size, sources, kept = reference_quota_window_merge(
                    x, metric, wid, paper[1], p, size, sources, return_kept=True)
            elif window:
                wid = torch.tensor(reference_window_ids(torch.tensor(anchors), grid, window))
                nw = (-(-grid[0] // window)) * (-(-grid[1] // window))
                x, size, sources, kept = reference_window_merge(
                    x, metric, r, wid, nw, p, size, sources, return_kept=True)
            else:
                x, size, sources, kept = reference_tome_merge(
                    x, metric, r, p, size, sources, order=order, return_kept=True)
            anchors = [[anc[t - p] for t in kp if t >= p] for anc, kp in zip(anchors, kept)]
            x, size = x.to(h.dtype), size.to(h.dtype)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    counts.append(x.shape[1])
    x = model.norm(x)
    if getattr(model, "head_dist", None) is not None:  # DeiT distilled: mean of both heads
        return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2, counts, sources
    if model.global_pool == "avg":
        w = size[:, p:]
        x = (x[:, p:] * w).sum(1) / w.sum(1)
    elif model.global_pool == "token":
        x = x[:, 0]
    x = model.fc_norm(x)
    return model.head(x), counts, sources


def reference_forward_for_schedule(model, images: Tensor, feature: str = "k"):
    """:func:`reference_vit_forward` with the merges ``model``'s patch plans (its schedule):
    ToMe's output order for ToMe, sequence order for spatial merging and DSM, and their local
    blocks in paper or joint windows as the options say. Returns the same triple."""
    from dsm_lite import schedule

    sched = schedule(model)
    local = [b if b.mode == "local" else None for b in sched.blocks]
    kw = dict(order="tome" if sched.method == "tome" else "sequence", feature=feature,
              prop_attn=sched.options.get("prop_attn", True))
    if sched.options.get("windows") == "joint":
        kw["windows"] = [b and b.window for b in local]
    elif any(local):
        kw["paper_windows"] = [b and (b.window, b.quota) for b in local]
    return reference_vit_forward(model, images, sched.r, **kw)


# --------------------------------------------------------------------------- shared test helpers
# (not references: small utilities the engine tests share)
VIT_TI = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def small_vit(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """A small random-weight timm VisionTransformer (64 px, 8 px patches: 8 x 8 grid)."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=2.0,
               num_classes=10)
    cfg.update(kwargs)
    torch.manual_seed(seed)
    model = VisionTransformer(**cfg).eval().to(dtype)
    with torch.no_grad():  # random init leaves some parameters at 0/1; make every one count
        for name, prm in model.named_parameters():
            if name.endswith(("bias", "gamma")) or "norm" in name:
                prm.add_(0.05 * torch.randn_like(prm))
    return model


def assets_or_skip() -> Path:
    """$DSM_LITE_ASSETS with the ViT-Ti weights, or skip the test."""
    import pytest

    root = os.environ.get("DSM_LITE_ASSETS")
    if not root:
        pytest.skip("DSM_LITE_ASSETS is not set (point it at the offline assets folder, ../shared/assets)")
    weights = Path(root) / "weights" / f"{VIT_TI}.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} not found: DSM_LITE_ASSETS must be the offline assets folder")
    return Path(root)


def load_vit_ti():
    import timm

    root = assets_or_skip()
    model = timm.create_model(VIT_TI, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(root / "weights" / f"{VIT_TI}.safetensors")))
    return model.eval()


def load_photos(model, n: int = 8) -> Tensor:
    """n real photos of imagenet-sample, preprocessed for ``model``."""
    root = assets_or_skip()
    try:
        from dsm_lite.data import load_images
    except ImportError:
        load_images = None
    if load_images is not None:
        return load_images("imagenet-sample", model, n=n, seed=0).images
    import timm.data
    from PIL import Image

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    files = sorted((root / "imagenet-sample").glob("*.JPEG"))[::125][:n]
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def unpatched_during(model):
    """Generator body of a fixture: ``model`` unpatched, yielded, then unpatched again with
    timm's default fused-attention setting restored on every block."""
    import timm

    from dsm_lite import unpatch

    unpatch(model)
    yield model
    unpatch(model)
    for blk in model.blocks:
        blk.attn.fused_attn = timm.layers.use_fused_attn()


@contextlib.contextmanager
def record_blocks(model):
    """Record, per forward, the token count entering every block and leaving the last one,
    and (when the model tracks them) the sources/anchors entering and leaving each block."""
    log = dict(tokens=[], source_in=[], source_out=[], anchors_in=[])
    handles = []

    def pre(module, args):
        if module is model.blocks[0]:
            for v in log.values():
                v.clear()
        log["tokens"].append(args[0].shape[1])
        st = getattr(model, "_dsm_state", None)
        log["source_in"].append(None if st is None or st.source is None else st.source.clone())
        log["anchors_in"].append(None if st is None or st.anchors is None else st.anchors.clone())

    def post(module, args, out):
        st = getattr(model, "_dsm_state", None)
        log["source_out"].append(None if st is None or st.source is None else st.source.clone())
        if module is model.blocks[-1]:
            log["tokens"].append(out.shape[1])

    for blk in model.blocks:
        handles.append(blk.register_forward_pre_hook(pre))
        handles.append(blk.register_forward_hook(post))
    try:
        yield log
    finally:
        for h in handles:
            h.remove()


def _single_thread():
    import pytest

    @pytest.fixture(autouse=True, scope="module")
    def single_thread():
        """Run the engine tests on one intra-op thread: the models are small, and on a shared
        2-core machine OpenMP workers spinning against other processes made the suite ~8x
        slower. Restored after the module, so other test files are unaffected."""
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(old)

    return single_thread


single_thread = _single_thread()
