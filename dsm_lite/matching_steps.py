"""ToMe's bipartite soft matching, one step at a time, for teaching (book chapter 3).

:func:`block_metric` captures the similarity feature a real block merges with (keys
averaged over heads, as ``dsm_lite.patch`` uses by default); :func:`matching_steps` redoes
:func:`dsm_lite.bipartite_soft_matching` step by step, keeping every intermediate (and
checks that it picks exactly the same merges); :func:`plot_matching` draws a step on the
patch grid over the photo.

Shapes: ``N`` tokens (prefix first), ``P`` prefix tokens, ``C`` feature channels, a patch
grid of ``h x w`` patches of ``patch_size`` pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib.collections import LineCollection
from torch import Tensor, nn

from .devices import to_model
from .merging import Merge, bipartite_soft_matching, max_reduction
from .patching import attention_qkv
from .plots import denormalize, merge_overlay

__all__ = ["block_metric", "MatchingSteps", "matching_steps", "one_step_groups", "plot_matching"]


class _Stop(Exception):
    pass


@torch.no_grad()
def block_metric(model: nn.Module, images: Tensor, block: int = 0, feature: str = "k") -> Tensor:
    """The similarity feature of block ``block``: (B, N, C) keys (or ``q``/``v``) averaged over
    heads, computed with the block's own ``qkv`` (and ``k_norm``/``q_norm``) on the tokens
    entering its attention. Works on a dense or patched model (then N is the merged count);
    the forward pass stops at that block.

    ``images`` (B, 3, H, W) may be on any device: they are moved to the model's device, and
    the feature is returned there (pass it on to :func:`matching_steps` as it is).
    """
    attn = model.blocks[block].attn
    box = {}

    def hook(module, args):
        q, k, v = attention_qkv(module, args[0])
        box["metric"] = {"k": k, "q": q, "v": v}[feature].mean(dim=1)
        raise _Stop

    handle = attn.register_forward_pre_hook(hook)
    try:
        model(to_model(model, images))
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["metric"]


@dataclass
class MatchingSteps:
    """Every intermediate of one bipartite soft matching of one image.

    Attributes:
        a_pos: (Na,) sequence positions of the A tokens (even positions, counting the prefix).
        b_pos: (Nb,) sequence positions of the B tokens (odd positions).
        scores: (Na, Nb) cosine similarity of every A-B pair; -inf where a prefix token is
            involved (prefix tokens never merge).
        best_b: (Na,) for each A token, the index (into B) of its most similar B token.
        best_score: (Na,) that similarity: the weight of each A token's best edge.
        chosen: (r,) indices (into A) of the r A tokens whose best edges are merged, best first.
        merge: the :class:`Merge` of ``bipartite_soft_matching`` (identical src and dst), its
            index tensors on the CPU.
        num_protected: P, the prefix tokens.

    Everything is on the CPU (numpy arrays), whatever device the metric came from.
    """

    a_pos: np.ndarray
    b_pos: np.ndarray
    scores: np.ndarray
    best_b: np.ndarray
    best_score: np.ndarray
    chosen: np.ndarray
    merge: Merge
    num_protected: int

    @property
    def r(self) -> int:
        return len(self.chosen)

    @property
    def src(self) -> np.ndarray:
        """(r,) sequence positions merged away (A side)."""
        return self.a_pos[self.chosen]

    @property
    def dst(self) -> np.ndarray:
        """(r,) sequence positions they merge into (B side)."""
        return self.b_pos[self.best_b[self.chosen]]


def _step_tensors(m: Tensor, r: int, num_protected: int) -> Dict[str, Tensor]:
    """The tensor part of :func:`matching_steps`, with no host synchronisation: every
    intermediate of one matching of ``m`` (N, C), as tensors on ``m``'s device, keyed as the
    fields of :class:`MatchingSteps` plus ``src`` and ``dst`` (sequence positions)."""
    n = m.shape[0]
    feats = m.float() / m.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_pos = torch.arange(0, n, 2, device=m.device)
    b_pos = torch.arange(1, n, 2, device=m.device)
    scores = feats[a_pos] @ feats[b_pos].T
    na, nb = (num_protected + 1) // 2, num_protected // 2
    scores[:na, :] = -math.inf
    scores[:, :nb] = -math.inf
    best_score, best_b = scores.max(dim=-1)
    chosen = best_score.argsort(descending=True, stable=True)[:r]
    return dict(a_pos=a_pos, b_pos=b_pos, scores=scores, best_b=best_b, best_score=best_score,
                chosen=chosen, src=a_pos[chosen], dst=b_pos[best_b[chosen]])


@torch.no_grad()
def matching_steps(metric: Tensor, r: int, num_protected: int = 0) -> MatchingSteps:
    """Bipartite soft matching of ToMe on one image, step by step.

    1. split tokens into A (even sequence positions) and B (odd ones);
    2. score every A-B pair by cosine similarity (prefix pairs get -inf);
    3. each A token keeps only its best edge (most similar B token);
    4. the r A tokens with the highest best-edge scores are merged into their B partners.

    Args:
        metric: (N, C) or (1, N, C) similarity feature of one image (see :func:`block_metric`),
            on any device: the steps are computed there.
        r: tokens to merge away, clamped as in ``bipartite_soft_matching``.
        num_protected: prefix tokens that never merge.

    Returns:
        A :class:`MatchingSteps`, entirely on the CPU (numpy arrays; ``merge`` holds CPU
        tensors), ready for plotting.

    Raises:
        AssertionError: if the steps disagree with :func:`dsm_lite.bipartite_soft_matching`.
    """
    m = metric[0] if metric.dim() == 3 else metric
    if metric.dim() == 3 and metric.shape[0] != 1:
        raise ValueError("matching_steps takes one image: metric (N, C) or (1, N, C)")
    r = min(r, max_reduction(m.shape[0], num_protected))
    t = _step_tensors(m, r, num_protected)
    merge = bipartite_soft_matching(m[None], r, num_protected)
    t = {k: v.cpu() for k, v in t.items()}
    merge = Merge(*(None if v is None else v.cpu() for v in (merge.src, merge.dst, merge.keep)))
    if r > 0:
        assert torch.equal(merge.src[0], t["src"]) and torch.equal(merge.dst[0], t["dst"]), \
            "step-by-step matching differs from bipartite_soft_matching"
    return MatchingSteps(*(t[k].numpy() for k in ("a_pos", "b_pos", "scores", "best_b",
                                                 "best_score", "chosen")), merge, num_protected)


def one_step_groups(steps: MatchingSteps, grid: Tuple[int, int]) -> np.ndarray:
    """(h, w) group map after this one merge: each merged A patch joins its B partner's group."""
    p = steps.num_protected
    groups = np.arange(grid[0] * grid[1])
    groups[steps.src - p] = steps.dst - p
    return groups.reshape(grid)


def _centre(pos: np.ndarray, p: int, grid: Tuple[int, int], patch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    row, col = np.divmod(pos - p, grid[1])
    return (col + 0.5) * patch_size - 0.5, (row + 0.5) * patch_size - 0.5


def plot_matching(ax, image, steps: MatchingSteps, grid: Tuple[int, int], patch_size: int,
                  stage: str = "split", cmap: str = "viridis", title: Optional[str] = None):
    """Draw one stage of the matching over the photo on the patch grid.

    Args:
        image: (3, H, W) normalised tensor (mean = std = 0.5) or (H, W, 3) array in [0, 1].
        stage: ``"split"`` A patches blue, B patches orange; ``"edges"`` every A token's best
            edge, an arrow A -> B coloured by cosine similarity; ``"chosen"`` the r merged
            edges in red over the others in grey; ``"merged"`` the merged pairs as groups.
    Returns the mappable of the edge colours for ``"edges"`` (for a colorbar), else None.
    """
    img = denormalize(image) if np.shape(image)[0] == 3 else np.asarray(image)
    p = steps.num_protected
    h, w = grid
    mappable = None
    ax.set_xticks([]), ax.set_yticks([])
    if stage == "merged":
        ax.imshow(merge_overlay(img, one_step_groups(steps, grid), patch_size, alpha=0.7))
    else:
        ax.imshow(img * 0.6 + 0.4 if stage != "split" else img)
    if stage == "split":
        tint = np.zeros((h, w, 4))
        is_a = np.zeros(h * w, dtype=bool)
        is_a[steps.a_pos[steps.a_pos >= p] - p] = True
        tint[is_a.reshape(h, w)] = mcolors.to_rgba("tab:blue", 0.45)
        tint[~is_a.reshape(h, w)] = mcolors.to_rgba("tab:orange", 0.45)
        ax.imshow(np.kron(tint, np.ones((patch_size, patch_size, 1)))[: img.shape[0], : img.shape[1]])
    elif stage in ("edges", "chosen"):
        valid = steps.a_pos >= p
        ax_, ay = _centre(steps.a_pos[valid], p, grid, patch_size)
        bx, by = _centre(steps.b_pos[steps.best_b[valid]], p, grid, patch_size)
        score = steps.best_score[valid]
        segs = np.stack([np.stack([ax_, ay], 1), np.stack([bx, by], 1)], 1)
        if stage == "edges":
            norm = mcolors.Normalize(vmin=float(score.min()), vmax=float(score.max()))
            lc = LineCollection(segs, cmap=cmap, norm=norm, linewidths=1.6)
            lc.set_array(score)
            ax.add_collection(lc)
            ax.scatter(ax_, ay, s=6, c="tab:blue", zorder=3)
            mappable = lc
        else:
            chosen = np.zeros(len(steps.a_pos), dtype=bool)
            chosen[steps.chosen] = True
            chosen = chosen[valid]
            ax.add_collection(LineCollection(segs[~chosen], colors="0.5", linewidths=0.8, alpha=0.6))
            ax.add_collection(LineCollection(segs[chosen], colors="red", linewidths=2.2))
            ax.scatter(ax_[chosen], ay[chosen], s=10, c="red", zorder=3)
    elif stage != "merged":
        raise ValueError(f"stage must be split, edges, chosen or merged, got {stage!r}")
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    if title:
        ax.set_title(title, fontsize=10)
    return mappable
