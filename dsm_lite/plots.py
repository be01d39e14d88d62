"""Figures for the dsm_lite book (plain functions): figures only, no analysis.

One visual language, set here once: :func:`book_style` (seaborn's theme, the ``tab10``
palette), one colour per method (:data:`METHOD_COLORS`) and per window
(:data:`WINDOW_COLORS`). Statistical figures (bands over photos, bars with intervals) are
drawn with seaborn; photo grids and diagrams with matplotlib.

Every function draws on a given ``ax`` (or creates a figure), labels its axes
and returns the axes / figure; none calls ``plt.show()``. Inputs are plain
tensors or arrays, usually per photo and per block, so that spread over photos
can be drawn as bands.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import LogNorm, Normalize
from matplotlib.patches import Patch, Rectangle

from .stats import percentile_band

__all__ = [
    "to_numpy",
    "denormalize",
    "band",
    "plot_percentile_band",
    "plot_mean_ci",
    "plot_sim_per_block",
    "plot_delta_sim",
    "plot_intervals",
    "plot_attention_shares",
    "plot_received_outliers_vs_rest",
    "plot_norm_ratio",
    "show_patch_marks",
    "show_grid_maps",
    "merge_overlay",
    "show_merges",
    "show_window_rules",
    "book_style",
    "METRIC_LABELS",
    "METHOD_COLORS",
    "OTHER_COLORS",
    "WINDOW_COLORS",
    "curve_colors",
    "draw_merging_block",
    "draw_phases",
    "draw_schedules",
    "PHASE_COLORS",
    "plot_tokens_per_block",
    "draw_import_graph",
    "plot_tradeoff",
    "plot_tradeoffs",
]


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def denormalize(img, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) array in [0, 1] for imshow."""
    x = to_numpy(img)
    x = x * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    return np.clip(x.transpose(1, 2, 0), 0, 1)


def band(values, low: float = 10, high: float = 90, axis: int = 0):
    """(median, low percentile, high percentile) of ``values`` over ``axis``, as NumPy arrays
    (:func:`dsm_lite.stats.percentile_band` of ``to_numpy(values)``)."""
    return percentile_band(to_numpy(values), low, high, axis)


def book_style() -> None:
    """The book's figure style, for every chapter: seaborn's ``ticks`` theme in the
    ``notebook`` context with the ``tab10`` palette (the colours of :data:`METHOD_COLORS`),
    no top and right spines, light grids where a plot asks for them.

    Sized for the page: the book's content column shows about 770 px, and a figure is at most
    9 in (900 px at 100 dpi) wide, so it is shown at 86% or more; its text is 10 pt or more
    (ticks 11, labels and titles 12), so it reads at about 9 pt or more on the page."""
    sns.set_theme(context="notebook", style="ticks", palette="tab10", font_scale=1.0,
                  rc={"axes.spines.top": False, "axes.spines.right": False, "grid.alpha": 0.3,
                      "figure.titlesize": 12, "axes.titlesize": 12, "legend.fontsize": 10})


def plot_percentile_band(ax, values, x=None, low: float = 10, high: float = 90, label=None,
                         color=None, marker="o", **kw):
    """Median line over photos (dim 0) with a shaded [low, high] percentile band.

    Drawn by ``seaborn.lineplot`` from the per-photo values in long form (estimator: the
    median; error band: the central ``high - low`` percent of photos), so the band is the
    spread over photos, not an interval for the median. Axis labels are left as they were.
    """
    v = to_numpy(values)
    x = np.arange(v.shape[1]) if x is None else np.asarray(x, dtype=float)
    xlabel, ylabel = ax.get_xlabel(), ax.get_ylabel()
    if not np.isclose(low + high, 100):  # seaborn's percentile interval is central
        med, lo, hi = band(v, low, high)
        line, = ax.plot(x, med, marker=marker, label=label, color=color, **kw)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        return ax
    long = pd.DataFrame({"x": np.tile(x, v.shape[0]), "value": v.reshape(-1)})
    sns.lineplot(data=long, x="x", y="value", estimator="median", errorbar=("pi", high - low),
                 marker=marker, label=label, color=color, ax=ax, legend=False,
                 err_kws={"alpha": 0.2, "linewidth": 0}, **kw)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    return ax


def plot_mean_ci(ax, mean, lo, hi, x=None, label=None, color=None, marker="o", **kw):
    """Mean line with a shaded confidence interval [lo, hi]."""
    mean, lo, hi = to_numpy(mean), to_numpy(lo), to_numpy(hi)
    x = np.arange(len(mean)) if x is None else np.asarray(x)
    line, = ax.plot(x, mean, marker=marker, label=label, color=color, **kw)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    return ax


def _block_axis(ax, n_blocks: int, xlabel: str = "block l"):
    ax.set_xticks(range(n_blocks))
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def plot_sim_per_block(ax, sim_in_ci: Tuple, sim_mid_ci: Tuple, transition: Optional[int] = None,
                       title: Optional[str] = None):
    """Paper Figures 2/8: Sim of the tokens entering attention (X^l) and leaving
    it (X̄^l = X^l + MHA(X^l)) per block. Each ``*_ci`` is (mean, lo, hi) over
    photos, e.g. a :class:`dsm_lite.stats.BootstrapCI`."""
    mean_in, lo_in, hi_in = sim_in_ci
    plot_mean_ci(ax, mean_in, lo_in, hi_in, label=r"entering attention, Sim($X^l$)")
    plot_mean_ci(ax, *sim_mid_ci, label=r"leaving attention, Sim($\bar X^l$)", marker="s")
    n = len(to_numpy(mean_in))
    _block_axis(ax, n)
    ax.set_ylabel("Sim (mean pairwise cosine similarity)")
    if transition is not None:
        ax.axvline(transition - 0.5, color="k", ls="--", lw=1, label=f"transition (D = {transition})")
    ax.legend(fontsize=10)
    if title:
        ax.set_title(title)
    return ax


def plot_delta_sim(ax, delta_ci: Tuple, transition: Optional[int] = None, title: Optional[str] = None):
    """ΔSim = Sim(X̄^l) - Sim(X^l) per block as bars (red: divergent, < 0;
    blue: convergent, > 0) with error bars [lo, hi]."""
    mean, lo, hi = (to_numpy(v) for v in delta_ci)
    x = np.arange(len(mean))
    sign = np.where(mean > 0, "convergent", "divergent")
    sns.barplot(x=x, y=mean, hue=sign, palette={"convergent": "tab:blue", "divergent": "tab:red"},
                dodge=False, errorbar=None, alpha=0.8, saturation=1, legend=False, ax=ax)
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.axhline(0, color="k", lw=0.8)
    _block_axis(ax, len(mean))
    ax.set_ylabel(r"$\Delta$Sim = Sim($\bar X^l$) $-$ Sim($X^l$)")
    if transition is not None:
        ax.axvline(transition - 0.5, color="k", ls="--", lw=1)
    ax.legend(handles=[Patch(color="tab:red", label="divergent (< 0)"),
                       Patch(color="tab:blue", label="convergent (> 0)")], fontsize=10)
    if title:
        ax.set_title(title)
    return ax


def plot_intervals(ax, table, x: str, est: str, lo: str, hi: str, hue: Optional[str] = None,
                   scale: float = 1.0, palette=None, markers: Sequence[str] = ("o", "s", "D", "^"),
                   dodge: float = 0.3):
    """Estimates with their (already computed) intervals, one point per row of ``table``.

    Drawn by ``seaborn.pointplot``: each row is given to seaborn as its three values (``lo``,
    ``est``, ``hi``), the median of which is the estimate and whose range is the interval, so
    seaborn draws exactly the bootstrap intervals of :mod:`dsm_lite.stats` rather than
    computing its own. ``x`` is categorical (in the table's order); ``hue`` groups sit side by
    side (``dodge``).

    Args:
        table: a DataFrame with columns ``x``, ``est``, ``lo``, ``hi`` (and ``hue``).
        scale: multiplies the values (100: shares as percentages).
    """
    rows = []
    for _, row in table.iterrows():
        for col in (lo, est, hi):
            rows.append({x: row[x], "value": float(row[col]) * scale,
                         **({} if hue is None else {hue: row[hue]})})
    long = pd.DataFrame(rows)
    n_hue = 1 if hue is None else long[hue].nunique()
    sns.pointplot(data=long, x=x, y="value", hue=hue, estimator="median",
                  errorbar=lambda v: (float(np.min(v)), float(np.max(v))), order=list(dict.fromkeys(table[x])),
                  hue_order=None if hue is None else list(dict.fromkeys(table[hue])),
                  palette=palette, markers=list(markers[:n_hue]) if hue is not None else markers[0],
                  linestyle="none", capsize=0.12, dodge=dodge if hue is not None else False, ax=ax)
    ax.set_ylabel("")
    ax.grid(alpha=0.3)
    if hue is not None:
        ax.legend(fontsize=10)  # the groups, without seaborn's title (the column name)
    return ax


def plot_attention_shares(ax, shares: dict, uniform: Optional[float] = None, low=10, high=90,
                          log: bool = False):
    """Share of all attention taken by groups of tokens per block.

    ``shares``: {label: (photos, blocks) tensor}; drawn as median with a
    [low, high] percentile band. ``uniform``: reference share of one token
    under uniform attention (1/N)."""
    for label, v in shares.items():
        plot_percentile_band(ax, v, low=low, high=high, label=label)
    n = to_numpy(next(iter(shares.values()))).shape[1]
    if uniform is not None:
        ax.axhline(uniform, color="grey", ls=":", label=f"one token, uniform attention (1/N = {uniform:.4f})")
    _block_axis(ax, n)
    ax.set_ylabel("share of all attention (mean over heads, queries)")
    if log:
        ax.set_yscale("log")
    # below the axes: inside, it covers the curves wherever it goes (they span the whole height)
    ax.legend(fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return ax


def plot_received_outliers_vs_rest(ax, per_token_outlier, per_token_rest, uniform: Optional[float] = None,
                                   low=10, high=90, blocks: Optional[Sequence[int]] = None):
    """Paper Figure 1 (right): attention received *per token* by the outlier
    tokens vs by the other patch tokens, per block, log-scale y.
    Inputs: (photos, blocks) tensors (NaN where a photo has no outlier)."""
    x = np.arange(to_numpy(per_token_rest).shape[1]) if blocks is None else np.asarray(blocks)
    for v, label in ((per_token_outlier, "high-norm outlier token"), (per_token_rest, "other patch token")):
        a = to_numpy(v)
        keep = ~np.isnan(a).all(axis=0)  # blocks where some photo has a value
        med, lo, hi = percentile_band(a[:, keep], low, high, ignore_nan=True)
        line, = ax.plot(x[keep], med, marker="o", label=label)
        ax.fill_between(x[keep], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if uniform is not None:
        ax.axhline(uniform, color="grey", ls=":", label="uniform attention (1/N)")
    ax.set_yscale("log")
    _block_axis(ax, len(x))
    ax.set_ylabel("attention received per token (log scale)")
    ax.legend(fontsize=10)
    return ax


def plot_norm_ratio(ax, max_ratio, threshold: Optional[float] = None, emergence: Optional[int] = None,
                    low=10, high=90, label="largest patch-token norm / median"):
    """Largest patch-token norm divided by the median patch-token norm, per
    block, median over photos with a percentile band, log-scale y."""
    plot_percentile_band(ax, max_ratio, low=low, high=high, label=label)
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls=":", label=f"outlier threshold ({threshold:g}x median)")
    if emergence is not None:
        ax.axvline(emergence, color="k", ls="--", lw=1, label=f"outliers from block {emergence} on")
    ax.set_yscale("log")
    _block_axis(ax, to_numpy(max_ratio).shape[1], xlabel="block l (norms of its output tokens)")
    ax.set_ylabel("norm ratio (log scale)")
    ax.legend(fontsize=10)
    return ax


def show_patch_marks(images, masks, grid_size: Tuple[int, int], titles: Optional[Sequence[str]] = None,
                     ncols: int = 4, patch: int = 16, color="red", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                     figsize_per=2.6):
    """Photos with chosen patches outlined. ``masks``: (n, P) bool over patch
    tokens (row-major on ``grid_size``). Returns the figure."""

    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(figsize_per * ncols, figsize_per * nrows), squeeze=False)
    gw = grid_size[1]
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(denormalize(images[i], mean, std))
        idx = np.flatnonzero(to_numpy(masks[i]) > 0)
        for j in idx:
            r, c = divmod(int(j), gw)
            ax.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False,
                                   edgecolor=color, linewidth=2))
        if titles is not None:
            ax.set_title(titles[i], fontsize=10)
    return fig


def show_grid_maps(maps, grid_size: Tuple[int, int], titles: Sequence[str], row_labels: Optional[Sequence[str]] = None,
                   images=None, log: bool = True, cmap="viridis", figsize_per=1.9, cbar_label="attention received",
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Grid of patch-grid heatmaps. ``maps``: (rows, cols, P) over patch
    tokens; optional ``images`` (rows, 3, H, W) drawn in a first column.
    One shared colour scale (log10 if ``log``). Returns the figure."""

    m = to_numpy(maps)
    rows, cols = m.shape[:2]
    extra = 1 if images is not None else 0
    fig, axes = plt.subplots(rows, cols + extra, figsize=(figsize_per * (cols + extra) + 0.8, figsize_per * rows),
                             squeeze=False)
    pos = m[m > 0]
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if log else Normalize(vmin=m.min(), vmax=m.max())
    im = None
    for r in range(rows):
        if images is not None:
            axes[r, 0].imshow(denormalize(images[r], mean, std))
            axes[r, 0].axis("off")
            if r == 0:
                axes[r, 0].set_title("photo", fontsize=10)
        for c in range(cols):
            ax = axes[r, c + extra]
            im = ax.imshow(m[r, c].reshape(grid_size), cmap=cmap, norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        if row_labels is not None:
            axes[r, extra].set_ylabel(row_labels[r], fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=cbar_label + (" (log scale)" if log else ""))
    return fig


# --------------------------------------------------------------------------- merged groups
def merge_overlay(image, groups, patch_size: int, alpha: float = 0.55, seed: int = 0) -> np.ndarray:
    """Colour each merged group over a photo, with group borders drawn.

    Args:
        image: (3, H, W) normalised tensor or (H, W, 3) array in [0, 1].
        groups: (h, w) group index per patch (e.g. from ``dsm_lite.trace_sources``); patches
            with the same index were merged into one token.
        patch_size: pixels per patch side (H = h * patch_size).
        alpha: opacity of the group colour over merged groups; patches left alone stay clear.

    Returns:
        (H, W, 3) float array in [0, 1].
    """
    img = denormalize(image) if np.asarray(to_numpy(image)).shape[0] == 3 else to_numpy(image)
    g = to_numpy(groups).astype(np.int64)
    px = np.kron(g, np.ones((patch_size, patch_size), dtype=np.int64))[: img.shape[0], : img.shape[1]]
    ids, inverse, counts = np.unique(px, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(px.shape)
    palette = np.random.default_rng(seed).uniform(0.15, 1.0, size=(len(ids), 3))
    merged = (counts > patch_size * patch_size)[inverse]  # groups of more than one patch
    out = img.copy()
    out[merged] = (1 - alpha) * img[merged] + alpha * palette[inverse][merged]
    out[_group_edges(px)] = 0.1
    return np.clip(out, 0, 1)


def _group_edges(px: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels where the group index changes from the pixel left or above."""
    edge = np.zeros(px.shape, dtype=bool)
    edge[:, 1:] |= px[:, 1:] != px[:, :-1]
    edge[1:, :] |= px[1:, :] != px[:-1, :]
    return edge


def _window_borders(ax, side: int, patch_size: int, height: int, width: int) -> None:
    """Red lines between windows of ``side`` patches, on an image of height x width pixels."""
    step = side * patch_size
    for k in range(step, height, step):
        ax.axhline(k - 0.5, color="red", lw=1.5)
    for k in range(step, width, step):
        ax.axvline(k - 0.5, color="red", lw=1.5)


def show_merges(images, groups, patch_size: int, titles: Sequence[str], row_labels: Optional[Sequence[str]] = None,
                windows: Optional[Sequence[Optional[int]]] = None, size: float = 2.6, transpose: bool = False):
    """A grid of merge overlays: ``groups[row][col]`` over ``images[col]``.

    ``windows[row]`` (patches, or None) draws that row's window borders in red, e.g. the
    windows of the first local block of spatial merging or DSM. ``transpose`` lays each
    ``groups`` row out as a column instead (photos down, rows across): wide rather than tall,
    for many rows of few photos.
    """
    rows, cols = len(groups), len(groups[0])
    shape = (cols, rows) if transpose else (rows, cols)
    fig, axes = plt.subplots(*shape, figsize=(size * shape[1], size * shape[0]), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[j][i] if transpose else axes[i][j]
            over = merge_overlay(images[j], groups[i][j], patch_size)
            ax.imshow(over)
            window = windows[i] if windows is not None else None
            if window:
                _window_borders(ax, window, patch_size, *over.shape[:2])
            ax.set_xticks([]), ax.set_yticks([])
            photo_label, row_label = titles[j], None if row_labels is None else row_labels[i]
            if transpose:
                if j == 0 and row_label is not None:
                    ax.set_title(row_label, fontsize=10)
                if i == 0:
                    ax.set_ylabel(photo_label, fontsize=10)
            else:
                if i == 0:
                    ax.set_title(photo_label, fontsize=10)
                if row_label is not None and j == 0:
                    ax.set_ylabel(row_label, fontsize=10)
    fig.tight_layout()
    return fig


def show_window_rules(images, traced: Dict[str, Any], patch_size: int, sides: Sequence[int],
                      titles: Sequence[str], size: float = 2.4):
    """Joint windows block by block: each patch coloured by the window its token is matched in.

    A merged token is matched in the window of its *anchor* patch (a dot), so a group whose
    patches straddle the red border of the block's windows still belongs to one window, and
    windows stop being squares once tokens have merged.

    Args:
        images: (B, 3, H, W) photos (normalised).
        traced: what :func:`dsm_lite.patching.trace_windows` returns for ``images``.
        patch_size: pixels per patch side.
        sides: window side of each traced block, in patches (the red borders).
        titles: one per photo (row labels).
    """
    wins, anchors, groups = (to_numpy(traced[k]).astype(np.int64) for k in ("window", "anchor", "groups"))
    blocks, photos = wins.shape[0], wins.shape[1]
    fig, axes = plt.subplots(photos, blocks, figsize=(size * blocks, size * photos), squeeze=False)
    palette = np.asarray(WINDOW_COLORS)
    for j in range(photos):
        img = denormalize(images[j])
        for t in range(blocks):
            ax = axes[j][t]
            grid = wins[t, j]
            tint = palette[grid % len(palette)]
            over = 0.45 * img + 0.55 * np.kron(tint, np.ones((patch_size, patch_size, 1)))
            over[_group_edges(np.kron(groups[t, j], np.ones((patch_size, patch_size), dtype=np.int64)))] = 0.1
            ax.imshow(np.clip(over, 0, 1))
            ys, xs = np.nonzero(anchors[t, j] & (np.bincount(groups[t, j].ravel(), minlength=grid.size)[groups[t, j]] > 1))
            ax.scatter((xs + 0.5) * patch_size - 0.5, (ys + 0.5) * patch_size - 0.5, s=6, c="k", linewidths=0)
            _window_borders(ax, sides[t], patch_size, *img.shape[:2])
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_title(f"block {int(to_numpy(traced['blocks'])[t])}: {sides[t]}x{sides[t]}", fontsize=10)
            if t == 0:
                ax.set_ylabel(titles[j], fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- plots
#: axis labels (with units) for sweep columns
METRIC_LABELS = {
    "gmacs": "GMACs per image",
    "throughput": "throughput (images/s, machine-dependent)",
    "tokens_out": "tokens leaving the last block",
    "r": "r (tokens merged per block)",
    "top1": "top-1 accuracy (%)",
    "top5": "top-5 accuracy (%)",
    "agreement": "top-1 agreement with dense model (%)",
    "kl": "mean KL(dense ‖ merged) (nats)",
    "d_top1": "top-1 change vs dense (percentage points)",
}
_PERCENT = {"top1", "top5", "agreement", "d_top1"}
#: one colour per method in every chapter's figures
METHOD_COLORS = {"dense": "k", "ToMe": "tab:blue", "spatial": "tab:orange", "spatial (paper)": "tab:orange",
                 "spatial (joint)": "#b35806", "DSM": "tab:green"}  # joint: a darker orange
#: one colour per window (a qualitative palette: neighbouring windows differ)
WINDOW_COLORS = tuple(tuple(c) for c in sns.color_palette("Set2", 8))
#: colours for curves that are none of the methods (variants, ablations), in this order
OTHER_COLORS = ("tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def curve_colors(names: Sequence[str], colors: Optional[Dict[Any, str]] = None) -> Dict[str, str]:
    """The book's colour for each curve name: ``colors`` first, then :data:`METHOD_COLORS`;
    any other name takes the next of :data:`OTHER_COLORS` that no named curve uses."""
    named = {**METHOD_COLORS, **(colors or {})}
    spare = itertools.cycle([c for c in OTHER_COLORS if c not in named.values()] or OTHER_COLORS)
    return {name: named[name] if name in named else next(spare) for name in dict.fromkeys(names)}


def plot_tradeoff(ax, df, x: str = "gmacs", y: str = "agreement", by: Union[str, Sequence[str]] = "label",
                  band: bool = True, annotate_r: bool = False, markers: Sequence[str] = "os^vDP",
                  colors: Optional[Dict[Any, str]] = None, legend: bool = True, **kw):
    """One curve of ``y`` versus ``x`` per group of ``by`` (the paper's Figure 4).

    Args:
        ax: matplotlib axes.
        df: a :func:`dsm_lite.sweeps.sweep` DataFrame (or concatenation of several).
        x: ``"gmacs"``, ``"throughput"``, ``"tokens_out"`` or ``"r"``.
        y: ``"top1"``, ``"top5"``, ``"agreement"``, ``"kl"`` or ``"d_top1"``; shares are drawn
            in percent.
        by: column(s) whose values make one curve each (default ``label``).
        band: shade ``<y>_lo``..``<y>_hi`` (bootstrap 95% CI over photos) when present.
        annotate_r: write each point's r beside it.
        colors: colour per curve name, on top of :data:`METHOD_COLORS` (the book's colour for
            each method); curves named in neither take the next of :data:`OTHER_COLORS`.
    Returns the axes.
    """
    by = [by] if isinstance(by, str) else list(by)
    scale = 100.0 if y in _PERCENT else 1.0
    groups = [(", ".join(map(str, key)) if isinstance(key, tuple) else str(key), g)
              for key, g in df.groupby(by, sort=False)]
    color_of = curve_colors([name for name, _ in groups], colors)
    for i, (name, g) in enumerate(groups):
        g = g.sort_values(x)
        style = dict(marker=markers[i % len(markers)], label=name, color=color_of[name])
        style.update(kw)
        line, = ax.plot(g[x], g[y] * scale, **style)
        if band and f"{y}_lo" in g and f"{y}_hi" in g:
            ax.fill_between(g[x], g[f"{y}_lo"] * scale, g[f"{y}_hi"] * scale,
                            color=line.get_color(), alpha=0.12, linewidth=0)  # light: bands overlap
        if annotate_r:  # below right: the curve rises to the right, so the label stays off it
            for xv, yv, r in zip(g[x], g[y] * scale, g["r"]):
                ax.annotate(f"r={r}", (xv, yv), textcoords="offset points", xytext=(6, -11),
                            fontsize=10, color=line.get_color())
    ax.set_xlabel(METRIC_LABELS.get(x, x))
    ax.set_ylabel(METRIC_LABELS.get(y, y))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=10)
    return ax


def plot_tradeoffs(df, ys: Sequence[str] = ("top1", "agreement", "kl"), x: str = "gmacs",
                   by: Union[str, Sequence[str]] = "label", title: Optional[str] = None,
                   size: Tuple[float, float] = (4.2, 3.4), **kw):
    """A row of :func:`plot_tradeoff` panels, one per metric in ``ys``; returns the figure."""
    fig, axes = plt.subplots(1, len(ys), figsize=(size[0] * len(ys), size[1]), squeeze=False)
    for j, (ax, y) in enumerate(zip(axes[0], ys)):
        plot_tradeoff(ax, df, x=x, y=y, by=by, legend=(j == 0), **kw)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the package
def draw_import_graph(ax, graph: Dict[str, Any], layers: Dict[str, int],
                      groups: Optional[Dict[str, str]] = None, colors: Optional[Dict[str, str]] = None):
    """A layered drawing of a package's modules: one column per layer (a module sits one layer
    right of the deepest module it imports), one arrow per import, boxes coloured by group.

    Args:
        graph: ``{module: modules it imports}``.
        layers: ``{module: layer}`` (``dsm_lite.package.layers``).
        groups: ``{module: group name}`` for the colours and the legend (default: one group).
        colors: ``{group name: colour}``.
    Returns the axes.
    """
    groups = groups or {m: "module" for m in graph}
    names = sorted(set(groups.values()))
    colors = colors or {g: f"C{i}" for i, g in enumerate(names)}
    cols: Dict[int, list] = {}
    for m in sorted(graph, key=lambda m: (layers[m], groups[m], m)):
        cols.setdefault(layers[m], []).append(m)
    pos = {m: (layer, -i + (len(ms) - 1) / 2) for layer, ms in cols.items() for i, m in enumerate(ms)}
    for m, deps in graph.items():
        for d in deps:
            ax.annotate("", xy=pos[d], xytext=pos[m], zorder=1,
                        arrowprops=dict(arrowstyle="->", color="0.6", lw=0.8, shrinkA=22, shrinkB=22))
    for m, (x, y) in pos.items():
        ax.text(x, y, m, ha="center", va="center", fontsize=10, zorder=2,
                bbox=dict(boxstyle="round,pad=0.3", fc=colors[groups[m]], ec="0.3", alpha=0.9))
    ax.set_xlim(-0.6, max(layers.values()) + 0.6)
    ax.set_ylim(min(y for _, y in pos.values()) - 0.8, max(y for _, y in pos.values()) + 0.8)
    ax.set_xticks(range(max(layers.values()) + 1))
    ax.set_xlabel("layer: 1 + the deepest layer a module imports (arrows point to what it imports)")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=[Patch(color=colors[g], label=g) for g in names], fontsize=10, loc="upper center",
              bbox_to_anchor=(0.5, -0.12), ncol=len(names), frameon=False)
    return ax


# --------------------------------------------------------------------------- schedules
#: shading of a schedule's phases: the delay (no merging), local (windowed) and global blocks
PHASE_COLORS = {"none": "0.55", "local": "gold", "global": "tab:cyan"}  # tints no method uses
PHASE_NAMES = {"none": "delay: no merging", "local": "local (windows)", "global": "global"}


def plot_tokens_per_block(ax, schedules: Dict[str, Any], shade: Optional[str] = None):
    """Tokens entering every block, one step line per schedule, with the phases of one shaded.

    Args:
        ax: matplotlib axes.
        schedules: ``{curve name: dsm_lite.Schedule}``; :data:`METHOD_COLORS` colours the
            methods' names.
        shade: the name of the schedule whose phases (its blocks' ``mode``: no merging, local,
            global) are shaded behind the curves.
    Returns the axes.
    """
    color_of = curve_colors(list(schedules))
    for name, s in schedules.items():
        tokens = s.tokens  # depth + 1 values: entering each block, then leaving the last
        ax.step(range(len(tokens)), tokens, where="post", marker="o", ms=3, color=color_of[name],
                label=f"{name}: {s.macs / 1e9:.3f} GMACs")
    if shade is not None:
        seen = set()
        for b in schedules[shade].blocks:
            label = None if b.mode in seen else f"{shade}: {PHASE_NAMES[b.mode]}"
            seen.add(b.mode)
            ax.axvspan(b.index, b.index + 1, color=PHASE_COLORS[b.mode], alpha=0.15, lw=0, label=label)
    depth = len(next(iter(schedules.values())).blocks)
    ax.set_xticks(range(depth + 1))
    ax.set_xlabel("block l (tokens entering it; the last tick: leaving the last block)")
    ax.set_ylabel("tokens (class token included)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    return ax


def draw_merging_block(ax):
    """One transformer block as a token-merging method runs it, bottom to top: merging sits
    between the attention (whose keys give the similarity) and the MLP, as in ToMe.

    Returns the axes.
    """
    steps = [("tokens in: N", "white"), ("LayerNorm", "0.92"),
             ("attention (+ log size bias)", "0.92"), ("+ residual", "white"),
             ("merge r pairs, most similar keys", "#f4c7c3"),
             ("LayerNorm", "0.92"), ("MLP", "0.92"), ("+ residual", "white"),
             ("tokens out: N - r", "white")]
    for y, (text, fc) in enumerate(steps):
        ax.text(0.5, y, text, ha="center", va="center", fontsize=10,
                bbox=dict(boxstyle="round,pad=0.3", fc=fc, ec="0.3"))
        if y:
            ax.annotate("", xy=(0.5, y - 0.3), xytext=(0.5, y - 0.7),
                        arrowprops=dict(arrowstyle="->", color="0.4", lw=1))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(steps) - 0.4)
    ax.axis("off")
    ax.set_title("inside one block: merging (red) is the only new step", fontsize=10)
    return ax


def draw_phases(ax, schedule, label: str = "DSM"):
    """The blocks of a schedule in a row, shaded by phase (:data:`PHASE_COLORS`: no merging,
    local, global), each with the tokens entering it and the tokens it removes.

    Args:
        schedule: a :class:`dsm_lite.Schedule`.
        label: the method's name, for the title.
    Returns the axes.
    """
    for b in schedule.blocks:
        ax.add_patch(Rectangle((b.index + 0.05, 0), 0.9, 1, fc=PHASE_COLORS[b.mode], alpha=0.45,
                               ec="0.3"))
        ax.text(b.index + 0.5, 0.62, str(b.tokens_in), ha="center", va="center", fontsize=10)
        ax.text(b.index + 0.5, 0.3, f"-{b.r}" if b.r else "0", ha="center", va="center", fontsize=10,
                color="tab:red" if b.r else "0.3")
    depth = len(schedule.blocks)
    ax.set_xlim(0, depth)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(np.arange(depth) + 0.5, [str(i) for i in range(depth)])
    ax.set_xlabel("block l (upper number: tokens entering it; lower: tokens it removes)")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    modes = list(dict.fromkeys(b.mode for b in schedule.blocks))
    ax.legend(handles=[Patch(color=PHASE_COLORS[m], alpha=0.45, label=PHASE_NAMES[m]) for m in modes],
              fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(modes), frameon=False)
    ax.set_title(f"{label}, r = {schedule.options.get('r')}: the three phases over the "
                 f"{depth} blocks ({schedule.macs / 1e9:.3f} GMACs)", fontsize=10)
    return ax


def draw_schedules(schedules: Dict[str, Any], width: float = 7.6, row_height: float = 1.25):
    """Several schedules one above the other, block by block (:func:`draw_phases` without its
    own legend and title): the book's picture of where each method merges.

    Args:
        schedules: label -> :class:`dsm_lite.Schedule`, all of one model.
        width: figure width in inches; the book's content column shows about 7.8 in at 100 dpi.
    Returns the figure.
    """
    fig, axes = plt.subplots(len(schedules), 1, figsize=(width, row_height * len(schedules) + 0.9),
                             sharex=True, squeeze=False)
    for ax, (label, s) in zip(axes[:, 0], schedules.items()):
        draw_phases(ax, s, label)
        ax.get_legend().remove()
        ax.set_xlabel("")
        ax.set_title("")  # draw_phases's centred title: replaced by a shorter one on the left
        ax.set_title(f"{label}, r = {s.options.get('r')}: {s.tokens[-1]} tokens at the end, "
                     f"{s.macs / 1e9:.2f} GMACs", fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("block l (upper number: tokens entering it; lower: tokens it removes)")
    modes = list(dict.fromkeys(b.mode for s in schedules.values() for b in s.blocks))
    fig.legend(handles=[Patch(color=PHASE_COLORS[m], alpha=0.45, label=PHASE_NAMES[m]) for m in modes],
               fontsize=10, loc="lower center", ncol=len(modes), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
