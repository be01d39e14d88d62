"""Statistics over photos: the one home of every interval, test and verdict the book uses.

Shapes: ``N`` photos (the resampled axis), ``k`` comparisons, ``B`` bootstrap resamples.

- :func:`bootstrap_ci`, :func:`paired_bootstrap`: percentile-bootstrap intervals of a
  statistic (the mean by default) over photos, and of a difference between two methods on the
  same photos. :func:`bootstrap_indices` gives their resampling draws.
- :func:`wilson_ci`: the Wilson score interval of a rate.
- :func:`percentile_band`: median with a percentile band (spread over photos, not uncertainty).
- :func:`paired_pvalue`, :func:`holm`, :func:`simultaneous_band`: a family of comparisons,
  corrected for multiplicity (Holm's step-down, or a max-``|t|`` band over all of them at once).
- :func:`verdict`: what an interval says about a claim.
- :func:`ci_text`, :func:`percent`: intervals and shares as table text.

Every function computes in float64 with the library of its input: NumPy arrays (and lists)
with NumPy, tensors with torch on their own device. Resampling follows the same rule: NumPy's
``default_rng(seed)`` for arrays, a seeded CPU ``torch.Generator`` for tensors. The two
streams differ, so an array and the same values as a tensor give different (equally valid)
intervals; each is reproducible, and a seed gives the same interval on every device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BootstrapCI", "bootstrap_indices", "bootstrap_ci", "paired_bootstrap", "paired_pvalue",
    "wilson_ci", "normal_quantile", "percentile_band", "holm", "simultaneous_band",
    "VERDICTS", "verdict", "ci_text", "percent", "block_table",
]

Values = Union[np.ndarray, Tensor, Sequence[float]]


@dataclass
class BootstrapCI:
    """A point estimate with a confidence interval [lo, hi] at ``level``.

    The fields are floats for one statistic, or arrays / tensors of one shape for several
    (e.g. one per block, or one per comparison of :func:`simultaneous_band`).
    """

    estimate: Any
    lo: Any
    hi: Any
    level: float = 0.95
    n_boot: int = 0
    method: str = "percentile bootstrap"

    @property
    def excludes_zero(self) -> Any:
        """Whether the interval lies entirely on one side of 0 (a difference is detected);
        elementwise for arrays and tensors."""
        return (self.lo > 0) | (self.hi < 0)

    def __iter__(self):  # est, lo, hi = ci
        return iter((self.estimate, self.lo, self.hi))

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.lo:.4f}, {self.hi:.4f}]"


# --------------------------------------------------------------------------- bootstrap
def bootstrap_indices(n: int, n_boot: int = 2000, seed: int = 0, *, like: Any = None):
    """Photo indices of ``n_boot`` resamples with replacement.

    Args:
        n: photos (N).
        n_boot: resamples (B).
        seed: seed of the stream.
        like: a tensor to draw torch's stream for (a seeded CPU ``torch.Generator``, the indices
            moved to its device); anything else draws NumPy's ``default_rng(seed).integers``.

    Returns:
        (B, N) int64 indices, a NumPy array or a tensor.
    """
    if n <= 0 or n_boot <= 0:
        raise ValueError(f"need n > 0 photos and n_boot > 0 resamples, got n={n}, n_boot={n_boot}")
    if isinstance(like, Tensor):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, n, (n_boot, n), generator=g).to(like.device)
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _as_float64(values: Values, dim: int = 0):
    """float64 copy (or view) of ``values`` with ``dim`` moved to the front; checks it is non-empty."""
    if isinstance(values, Tensor):
        v = values.to(torch.float64).movedim(dim, 0)
    else:
        v = np.moveaxis(np.asarray(values, dtype=float), dim, 0)
    if v.ndim == 0 or v.shape[0] == 0:
        raise ValueError(f"need at least one photo along dim {dim}, got shape {tuple(v.shape)}")
    return v


def _point(v, stat: Optional[Callable]):
    """``stat`` over the photos (axis 0) of ``v``: a float for 1-D NumPy input."""
    if isinstance(v, Tensor):
        return v.mean(dim=0)
    stat = stat or np.mean
    return float(stat(v)) if v.ndim == 1 else stat(v, axis=0)


def _resampled(v, idx, stat: Optional[Callable]):
    """``stat`` of every resample: (B, ...) from ``v`` (N, ...) and ``idx`` (B, N)."""
    if isinstance(v, Tensor):
        return v[idx].mean(dim=1)
    stat = stat or np.mean
    try:
        return np.asarray(stat(v[idx], axis=1), dtype=float)
    except TypeError:  # a statistic without an axis argument
        return np.array([stat(v[i]) for i in idx], dtype=float)


def _percentiles(samples, level: float) -> Tuple[Any, Any]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``samples`` (B, ...) over B
    (linear interpolation); floats for 1-D NumPy input."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    a = (1 - level) / 2
    if isinstance(samples, Tensor):
        return torch.quantile(samples, a, dim=0), torch.quantile(samples, 1 - a, dim=0)
    lo, hi = np.quantile(samples, [a, 1 - a], axis=0)
    return (float(lo), float(hi)) if samples.ndim == 1 else (lo, hi)


def _check_stat(values, stat: Optional[Callable]) -> None:
    if isinstance(values, Tensor) and stat not in (None, np.mean):
        raise ValueError("for tensors only the mean is supported; pass a NumPy array for other statistics")


def bootstrap_ci(values: Values, n_boot: int = 2000, seed: int = 0, level: float = 0.95, *,
                 dim: int = 0, stat: Optional[Callable] = None) -> BootstrapCI:
    """Percentile-bootstrap confidence interval of a statistic over photos.

    Args:
        values: (N, ...) per-photo values with the photos along ``dim`` (bools count as 0/1);
            every other axis (blocks, say) gets its own interval from the same resamples.
        n_boot: resamples (B).
        seed: seed of the resampling (:func:`bootstrap_indices`).
        level: coverage of the interval.
        dim: the photo axis.
        stat: NumPy arrays only: a statistic taking ``axis=`` (np.mean, np.median), or any
            callable of a 1-D array (1-D input). Default: the mean.

    Returns:
        :class:`BootstrapCI` of the statistic: floats for 1-D NumPy input, else arrays or
        tensors of ``values``' shape without ``dim`` (tensors on ``values``' device).
    """
    _check_stat(values, stat)
    v = _as_float64(values, dim)
    idx = bootstrap_indices(v.shape[0], n_boot, seed, like=v)
    lo, hi = _percentiles(_resampled(v, idx, stat), level)
    return BootstrapCI(_point(v, stat), lo, hi, level, n_boot)


def _paired_resamples(a: Values, b: Values, n_boot: int, seed: int, stat: Optional[Callable]):
    """(estimate, (B, ...) resampled differences) of ``stat(a) - stat(b)``, photos resampled jointly."""
    _check_stat(a, stat)
    va, vb = _as_float64(a), _as_float64(b)
    if type(va) is not type(vb) or va.shape != vb.shape:
        raise ValueError(f"a and b must be arrays (or tensors) of one shape, got {tuple(va.shape)} and "
                         f"{tuple(vb.shape)}")
    idx = bootstrap_indices(va.shape[0], n_boot, seed, like=va)
    diffs = _resampled(va, idx, stat) - _resampled(vb, idx, stat)
    return _point(va, stat) - _point(vb, stat), diffs


def paired_bootstrap(a: Values, b: Values, n_boot: int = 2000, seed: int = 0, level: float = 0.95, *,
                     stat: Optional[Callable] = None) -> BootstrapCI:
    """Percentile-bootstrap interval of ``stat(a) - stat(b)`` for two methods on the *same* photos.

    Photos are resampled jointly, so photo-to-photo variation that both methods share cancels.
    Identical inputs give exactly [0, 0].

    Args:
        a, b: (N, ...) per-photo values of two methods, photos along axis 0 in the same order
            (e.g. ``EvalResult.correct1`` of two configs).
        n_boot, seed, level, stat: as in :func:`bootstrap_ci`.

    Returns:
        :class:`BootstrapCI` of the difference (floats for 1-D NumPy input).
    """
    est, diffs = _paired_resamples(a, b, n_boot, seed, stat)
    lo, hi = _percentiles(diffs, level)
    return BootstrapCI(est, lo, hi, level, n_boot, "paired percentile bootstrap")


def paired_pvalue(a: Values, b: Values, n_boot: int = 2000, seed: int = 0, *,
                  stat: Optional[Callable] = None) -> Any:
    """Two-sided bootstrap p-value of ``stat(a) - stat(b) = 0``, from the resamples of
    :func:`paired_bootstrap` (same ``seed``, same draws).

    ``p = min(1, 2 * min(P*(d <= 0), P*(d >= 0)))`` over the resampled differences ``d``: the
    ``1 - level`` at which an end of the percentile interval reaches 0, so ``p < 1 - level`` goes with an
    interval that excludes 0 (up to the quantile's interpolation). Feed a family to :func:`holm`.

    Args:
        a, b: (N, ...) per-photo values, as in :func:`paired_bootstrap`.

    Returns:
        p in [0, 1] (0: no resample reached 0, so p < 1 / n_boot): a float for 1-D NumPy input,
        else an array / tensor of the other axes.
    """
    _, diffs = _paired_resamples(a, b, n_boot, seed, stat)
    low, high = (diffs <= 0).sum(0), (diffs >= 0).sum(0)
    if isinstance(diffs, Tensor):
        return (2 * torch.minimum(low, high).double() / n_boot).clamp(max=1.0)
    p = np.minimum(1.0, 2 * np.minimum(low, high) / n_boot)
    return float(p) if np.ndim(p) == 0 else p


# --------------------------------------------------------------------------- rates
def normal_quantile(q: float) -> float:
    """Inverse standard normal CDF, ``statistics.NormalDist().inv_cdf``; q in (0, 1)."""
    return NormalDist().inv_cdf(q)


def wilson_ci(successes, n: Optional[int] = None, level: float = 0.95) -> BootstrapCI:
    """Wilson score interval of a rate.

    Args:
        successes: a count (with ``n``) or an (N,) 0/1 array (``n`` then its length).
        n: trials.
        level: coverage of the interval.

    Returns:
        :class:`BootstrapCI` of the rate ``successes / n`` (floats; 0 and 1 exactly at the ends).
    """
    if n is None:
        arr = np.asarray(successes, dtype=float)
        successes, n = float(arr.sum()), len(arr)
    if n <= 0:
        raise ValueError("n must be positive")
    z = normal_quantile(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return BootstrapCI(float(p), lo, hi, level, 0, "Wilson")


# --------------------------------------------------------------------------- spread
def percentile_band(values: Values, low: float = 10, high: float = 90, dim: int = 0, *,
                    ignore_nan: bool = False) -> Tuple[Any, Any, Any]:
    """(median, ``low``-th percentile, ``high``-th percentile) of ``values`` over ``dim``.

    Spread over photos, not uncertainty of a mean: use :func:`bootstrap_ci` for that.

    Args:
        values: (N, ...) values with the photos along ``dim``.
        low, high: percentiles in [0, 100] (linear interpolation).
        dim: the photo axis.
        ignore_nan: skip NaNs (a photo without a value); an all-NaN column gives NaN.

    Returns:
        Three float64 arrays (or tensors, on ``values``' device) of ``values``' shape without ``dim``.
    """
    if isinstance(values, Tensor):
        v = values.to(torch.float64)
        q = torch.tensor([0.5, low / 100, high / 100], dtype=torch.float64, device=v.device)
        med, lo, hi = (torch.nanquantile if ignore_nan else torch.quantile)(v, q, dim=dim)
        return med, lo, hi
    v = np.asarray(values, dtype=float)
    median, percentile = (np.nanmedian, np.nanpercentile) if ignore_nan else (np.median, np.percentile)
    return median(v, axis=dim), percentile(v, low, axis=dim), percentile(v, high, axis=dim)


# --------------------------------------------------------------------------- families
def holm(pvalues, alpha: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """Holm–Bonferroni step-down over a family of ``k`` tests.

    The i-th smallest p-value (1-based) is adjusted to ``max over j <= i of min(1, (k - j + 1) p_(j))``;
    a test is rejected when its adjusted p-value is at most ``alpha``. This controls the chance
    of any false rejection in the family at ``alpha``, whatever the tests' dependence.

    Args:
        pvalues: (k,) p-values in [0, 1].
        alpha: family-wise error rate.

    Returns:
        (adjusted p-values (k,), rejected (k,) bool), in the input's order.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or len(p) == 0 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"pvalues must be a non-empty 1-D array of values in [0, 1], got {p!r}")
    k = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((k - np.arange(k)) * p[order])
    adjusted = np.empty(k)
    adjusted[order] = np.minimum(1.0, stepped)
    return adjusted, adjusted <= alpha


def simultaneous_band(diffs, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> BootstrapCI:
    """Intervals for ``k`` mean differences that hold *together* with probability ``level``.

    Max-``|t|`` bootstrap: photos are resampled jointly for all columns (B resamples); each
    column's resampled means give its standard error ``se``; the ``level`` quantile ``c`` of
    ``max over columns of |mean* - mean| / se`` widens every interval to ``mean ± c * se``.
    The band is narrower than Bonferroni's when the comparisons are correlated (neighbouring
    GMACs, say). A column with no spread (``se = 0``) gets the interval [mean, mean]. Like any
    bootstrap interval it covers a little less than ``level`` with few photos (in simulation, all
    of 6 means together: 0.92 to 0.93 at N = 80, 0.93 to 0.95 at N = 300, for 0.95).

    Args:
        diffs: (N, k) per-photo paired differences, one column per comparison (e.g. method A
            minus method B at k matched budgets).
        n_boot: resamples (B).
        seed: seed of the resampling (NumPy's stream, :func:`bootstrap_indices`).
        level: simultaneous coverage.

    Returns:
        :class:`BootstrapCI` with (k,) float64 arrays ``estimate``, ``lo``, ``hi``.
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] == 0:
        raise ValueError(f"diffs must be (photos >= 2, comparisons >= 1), got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    est = d.mean(axis=0)
    idx = bootstrap_indices(d.shape[0], n_boot, seed)
    means = np.stack([d[idx, j].mean(axis=1) for j in range(d.shape[1])], axis=1)  # (B, k), memory B * N
    se = means.std(axis=0, ddof=1)
    live = se > 0
    half = np.zeros_like(est)
    if live.any():
        t_max = (np.abs(means[:, live] - est[live]) / se[live]).max(axis=1)
        half[live] = np.quantile(t_max, level) * se[live]
    return BootstrapCI(est, est - half, est + half, level, n_boot, "simultaneous max-|t| bootstrap")


# --------------------------------------------------------------------------- verdicts
#: every verdict :func:`verdict` can return
VERDICTS = ("supported", "contradicted", "equivalent", "not detectable", "bound")


def verdict(lo: float, hi: float, *, direction: int = 1, threshold: float = 0.0,
            margin: Optional[float] = None, censored: bool = False) -> str:
    """What a confidence interval of a difference says about a claimed difference.

    The claim: the difference exceeds ``threshold`` in ``direction`` (+1: larger, -1: smaller;
    ``threshold`` 0 means any difference). Rules, in this order:

    1. **supported**: the interval lies entirely beyond ``threshold`` in the claimed direction
       (``lo > threshold`` for +1, ``hi < -threshold`` for -1). Touching is not enough.
    2. **bound**: ``censored``, not supported: the estimate is only a bound (the grid ended
       before the effect showed in full; the true difference may lie further in the claimed
       direction than the interval says), so neither contradiction nor equivalence follows.
    3. **contradicted**: the interval lies entirely on the other side of ``threshold``
       (``hi < threshold`` for +1, ``lo > -threshold`` for -1).
    4. **equivalent**: an equivalence ``margin`` is given and the whole interval lies strictly
       inside ``(-margin, margin)``: no difference is detected and every plausible one is
       smaller than the margin. Without a margin, equivalence is never concluded.
    5. **not detectable**: anything else; the evidence is too weak to decide.

    For a family of comparisons, pass intervals already corrected for multiplicity (from
    :func:`simultaneous_band`, say); for a single pre-declared summary, its own interval.

    Args:
        lo, hi: the interval, ``lo <= hi``, in the units of ``threshold`` and ``margin``.
        direction: +1 or -1, the claimed sign of the difference.
        threshold: the size the claim says the difference exceeds (>= 0).
        margin: equivalence margin (> 0), or None.
        censored: the estimate is a bound in the claimed direction (see rule 2).

    Returns:
        One of :data:`VERDICTS`.
    """
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise ValueError(f"need a finite interval with lo <= hi, got [{lo}, {hi}]")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if margin is not None and not margin > 0:
        raise ValueError(f"margin must be positive, got {margin}")
    near, far = (lo, hi) if direction == 1 else (-hi, -lo)  # the interval, claimed direction positive
    if near > threshold:
        return "supported"
    if censored:
        return "bound"
    if far < threshold:
        return "contradicted"
    if margin is not None and -margin < lo and hi < margin:
        return "equivalent"
    return "not detectable"


def ci_text(estimate, lo, hi, digits: int = 1, scale: float = 1.0, signed: bool = True) -> List[str]:
    """Estimates with their intervals as table text, ``"+0.8 [-0.4, +2.0]"`` (``signed``: a
    difference) or ``"82.8 [80.5, 85.1]"``; every value is multiplied by ``scale`` first (100
    for shares in percent). ``estimate``, ``lo`` and ``hi`` are equal-length sequences."""
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    return [f"{f(scale * e)} [{f(scale * a)}, {f(scale * b)}]" for e, a, b in zip(estimate, lo, hi)]


def percent(shares, digits: int = 1) -> List[str]:
    """Shares in [0, 1] as percent text, ``0.8275 -> "82.8"``."""
    return [f"{100 * v:.{digits}f}" for v in shares]


def block_table(columns: Dict[str, Values], fmt: Union[str, Dict[str, str]] = "{:.3f}",
                first: str = "block") -> str:
    """Per-block values as plain text, one line per block: narrow enough for a book page at any
    depth, where one line of all blocks is not (24 blocks of 6 characters overflow it).

    Args:
        columns: header -> (L,) values, one per block (tensors, arrays or lists).
        fmt: the format of every value, e.g. ``"{:+.3f}"``, or one per header.
        first: the header of the block-index column.
    """
    fmts = fmt if isinstance(fmt, dict) else dict.fromkeys(columns, fmt)
    cells = {name: [fmts[name].format(float(v)) for v in _as_list(values)] for name, values in columns.items()}
    depth = {len(c) for c in cells.values()}
    if len(depth) != 1:
        raise ValueError(f"every column needs one value per block; got lengths {sorted(depth)}")
    widths = {name: max(len(name), *(len(v) for v in c)) for name, c in cells.items()}
    lines = [f"{first}  " + "  ".join(name.rjust(widths[name]) for name in cells)]
    for i in range(depth.pop()):
        lines.append(f"{i:>{len(first)}d}  " + "  ".join(c[i].rjust(widths[name]) for name, c in cells.items()))
    return "\n".join(lines)


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)
