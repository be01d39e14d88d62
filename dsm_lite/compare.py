"""Methods compared at equal compute: the analysis of :func:`dsm_lite.sweeps.sweep` tables.

A *sweep table* is the DataFrame of :func:`~dsm_lite.sweeps.sweep`: one row per config with
``label``, ``r``, ``gmacs`` and ``result`` (the per-photo :class:`~dsm_lite.evaluation.EvalResult`).
*Sweeps* map a photo-set name to its table, all run with the same configs; the photo sets are
pooled (concatenated, in the mapping's order) wherever per-photo values are compared. A
*curve* is one method's rows with the dense model (label ``"dense"``, r = 0) as its
zero-merging end, sorted by GMACs.

- :func:`curve`, :func:`at_gmacs`, :func:`pooled`: per-photo values of a method at an r, or
  interpolated linearly in GMACs to any budget on its curve.
- :func:`equal_gmacs`, :func:`matched_differences`: a method minus a reference method at the
  GMACs of each of its points (paired bootstrap per point, or the per-photo differences for
  :func:`dsm_lite.stats.simultaneous_band`).
- :func:`paired_columns`, :func:`vs`: paired differences between rows, as table columns;
  :func:`merge_vs_prune`, :func:`by_delay`: two ablations' tables.
- :func:`read_throughput_table`: the speed of the methods, as ``benchmarks/throughput.py``
  measured it (the book reads its committed results instead of timing in a notebook).
- :func:`saved_within`, :func:`saved_within_ci`: the share of dense GMACs a method saves before
  a metric falls a given drop below dense; :func:`saved_difference_ci`: two methods' savings,
  one minus the other, on the same resamples (paired).

Metrics are sweep columns with per-photo values: ``top1``, ``top5``, ``agreement``, ``kl``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .evaluation import EvalResult
from .stats import bootstrap_indices, holm, paired_bootstrap, paired_pvalue

__all__ = ["curve", "at_gmacs", "pooled", "equal_gmacs", "matched_differences",
           "paired_columns", "vs", "saved_within", "saved_within_ci", "saved_difference_ci",
           "merge_vs_prune", "by_delay", "read_throughput_table"]

Sweeps = Mapping[str, pd.DataFrame]


def curve(df: pd.DataFrame, label: str) -> pd.DataFrame:
    """One method's rows of a sweep table and the dense row (its r = 0 end), sorted by GMACs."""
    return pd.concat([df[df.label == "dense"], df[df.label == label]]).sort_values("gmacs")


def at_gmacs(pts: pd.DataFrame, g: float, metric: str) -> Optional[np.ndarray]:
    """Per-photo values of a curve at ``g`` GMACs, linear in GMACs between its two nearest points.

    Args:
        pts: a :func:`curve` (at least two rows, sorted by GMACs).
        g: GMACs per image.
        metric: a sweep column with per-photo values.

    Returns:
        (N,) float64 values, or None when ``g`` lies outside the curve (beyond 1e-9 GMACs).
    """
    x = pts.gmacs.to_numpy()
    if len(x) < 2:
        raise ValueError(f"a curve needs at least two points, got {len(x)}")
    if not x[0] - 1e-9 <= g <= x[-1] + 1e-9:
        return None
    i = int(np.clip(np.searchsorted(x, g), 1, len(x) - 1))
    a, b = pts.iloc[i - 1], pts.iloc[i]
    w = (g - a.gmacs) / (b.gmacs - a.gmacs)
    return (1 - w) * a.result.per_photo(metric) + w * b.result.per_photo(metric)


def pooled(sweeps: Sweeps, label: str, metric: str, *, g: Optional[float] = None,
           r: Optional[int] = None) -> Optional[np.ndarray]:
    """Per-photo values of one method over all photo sets, concatenated.

    Args:
        sweeps: photo-set name -> sweep table.
        label: the method's label.
        metric: a sweep column with per-photo values.
        g: GMACs to interpolate to along the method's :func:`curve`; or None, then
        r: the row with this r.

    Returns:
        (N_total,) float64 values, or None when ``g`` lies outside the curve of some set.
    """
    out = []
    for df in sweeps.values():
        if g is None:
            rows = df[(df.label == label) & (df.r == r)]
            if rows.empty:
                raise KeyError(f"no row with label {label!r} and r = {r}")
            out.append(rows.iloc[0].result.per_photo(metric))
        else:
            out.append(at_gmacs(curve(df, label), g, metric))
    return None if any(o is None for o in out) else np.concatenate(out).astype(float)


def _gmacs(sweeps: Sweeps, label: str, r: int) -> float:
    """GMACs of (label, r), read from the first set (they depend on the schedule, not the photos)."""
    df = next(iter(sweeps.values()))
    rows = df[(df.label == label) & (df.r == r)]
    if rows.empty:
        raise KeyError(f"no row with label {label!r} and r = {r}")
    return float(rows.gmacs.iloc[0])


def equal_gmacs(sweeps: Sweeps, methods: Mapping[str, Sequence[int]], ref: str = "ToMe",
                metrics: Sequence[str] = ("top1", "agreement"), n_boot: int = 2000,
                seed: int = 0) -> pd.DataFrame:
    """Each method minus ``ref`` at equal GMACs, photo sets pooled, one paired bootstrap per point.

    At every point (label, r) of ``methods``, the reference's per-photo values are interpolated
    to that point's GMACs (:func:`pooled`); points beyond the reference's curve are skipped.

    Args:
        sweeps: photo-set name -> sweep table (with ``ref`` and every method in ``methods``).
        methods: label -> the r values to compare.
        ref: label of the reference method.
        metrics: sweep columns with per-photo values.
        n_boot, seed: of :func:`dsm_lite.stats.paired_bootstrap`.

    Returns:
        One row per matched (method, r, metric): ``method, r, gmacs, metric, diff, lo, hi``
        (shares, 95% percentile interval).
    """
    rows = []
    for label, rs in methods.items():
        for r in rs:
            g = _gmacs(sweeps, label, r)
            for metric in metrics:
                base = pooled(sweeps, ref, metric, g=g)
                if base is None:
                    continue
                d = paired_bootstrap(pooled(sweeps, label, metric, r=r), base, n_boot, seed)
                rows.append(dict(method=label, r=r, gmacs=g, metric=metric, diff=d.estimate, lo=d.lo, hi=d.hi))
    return pd.DataFrame(rows)


def matched_differences(sweeps: Sweeps, label: str, rs: Sequence[int], metric: str,
                        ref: str = "ToMe") -> Tuple[np.ndarray, np.ndarray]:
    """Per-photo differences, ``label`` minus ``ref`` at equal GMACs, at every matched r.

    Feed them to :func:`dsm_lite.stats.simultaneous_band` for intervals that hold for all the
    matched points together.

    Args:
        sweeps, ref, metric: as in :func:`equal_gmacs`.
        label: the method.
        rs: its r values; those beyond the reference's curve are left out.

    Returns:
        (matched r values (k,), differences (N_total, k) float64).
    """
    kept, cols = [], []
    for r in rs:
        base = pooled(sweeps, ref, metric, g=_gmacs(sweeps, label, r))
        if base is not None:
            kept.append(r)
            cols.append(pooled(sweeps, label, metric, r=r) - base)
    if not cols:
        raise ValueError(f"no r of {label!r} lies within the GMACs of {ref!r}")
    return np.asarray(kept), np.stack(cols, axis=1)


def paired_columns(a: EvalResult, b: EvalResult, metrics: Sequence[str] = ("top1", "agreement"),
                   n_boot: int = 2000, seed: int = 0, scale: float = 100.0) -> Dict[str, float]:
    """``a`` minus ``b`` on the same photos, per metric: ``d_<m>, d_<m>_lo, d_<m>_hi``.

    Args:
        a, b: per-photo results of two configs on the same photos, in the same order.
        metrics: sweep columns with per-photo values.
        n_boot, seed: of :func:`dsm_lite.stats.paired_bootstrap`.
        scale: multiplies every value (100: shares in percentage points).
    """
    out: Dict[str, float] = {}
    for m in metrics:
        d = paired_bootstrap(a.per_photo(m), b.per_photo(m), n_boot, seed)
        out.update({f"d_{m}": d.estimate * scale, f"d_{m}_lo": d.lo * scale, f"d_{m}_hi": d.hi * scale})
    return out


def vs(df: pd.DataFrame, ref_mask, metric: str = "agreement", n_boot: int = 2000,
       seed: int = 0) -> pd.DataFrame:
    """Every row of a sweep table minus its reference row, on the same photos, in points.

    Args:
        df: a sweep table.
        ref_mask: boolean mask of ``df`` whose first True row is the reference.
        metric: a sweep column with per-photo values.
        n_boot, seed: of :func:`dsm_lite.stats.paired_bootstrap`.

    Returns:
        Columns ``d_<metric>, lo, hi`` (percentage points for shares), ``df``'s index.
    """
    ref = df[ref_mask].iloc[0].result
    cols = [paired_columns(x, ref, (metric,), n_boot, seed) for x in df.result]
    return pd.DataFrame({f"d_{metric}": [c[f"d_{metric}"] for c in cols],
                         "lo": [c[f"d_{metric}_lo"] for c in cols],
                         "hi": [c[f"d_{metric}_hi"] for c in cols]}, index=df.index)


def saved_within(sweeps: Sweeps, label: str, metric: str, drop: float = 0.01,
                 idx: Optional[np.ndarray] = None) -> Tuple[np.ndarray, bool]:
    """Share of dense GMACs saved where ``metric`` first falls ``drop`` below dense (pooled photos).

    Along the method's :func:`curve` (GMACs from the first set), from dense towards fewer
    GMACs, the mean over pooled photos is compared with the dense mean minus ``drop``; the
    crossing is interpolated linearly in GMACs between the last point above and the first
    below. A curve that never falls that far gives its last point: a bound, not an estimate.

    Args:
        sweeps: photo-set name -> sweep table.
        label: the method.
        metric: a sweep column with per-photo values (a share: higher is better).
        drop: the allowed fall, in the metric's units (0.01: one percentage point), > 0.
        idx: (B, N_total) bootstrap indices into the pooled photos, or None for the estimate.

    Returns:
        (saved share of dense GMACs: (1,) for the estimate, (B,) with ``idx``; censored: the
        curve's mean never falls ``drop`` below dense, so the saving is a lower bound).
    """
    if not drop > 0:
        raise ValueError(f"drop must be positive, got {drop}")
    pts = curve(next(iter(sweeps.values())), label).sort_values("gmacs", ascending=False)
    vals = np.stack([pooled(sweeps, lab, metric, r=r) for lab, r in zip(pts.label, pts.r)])  # (points, N)
    if idx is None:
        m = vals.mean(1)[:, None]                                          # (points, 1)
    else:
        m = np.stack([v[idx].mean(-1) for v in vals])                     # (points, B)
    g = pts.gmacs.to_numpy()
    thr = m[0] - drop
    below = m < thr
    out = np.full(m.shape[1], g[-1])
    cols = np.nonzero(below.any(axis=0))[0]
    k = below[:, cols].argmax(axis=0)                                      # first point below
    w = (m[k - 1, cols] - thr[cols]) / (m[k - 1, cols] - m[k, cols])
    out[cols] = g[k - 1] + w * (g[k] - g[k - 1])
    mean = vals.mean(1)
    return 1 - out / g[0], bool(not (mean < mean[0] - drop).any())


def saved_within_ci(sweeps: Sweeps, label: str, metric: str, drop: float = 0.01, n_boot: int = 2000,
                    seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """:func:`saved_within` with a percentile-bootstrap interval over the pooled photos.

    The resamples are :func:`dsm_lite.stats.bootstrap_indices` (N_total photos, ``n_boot``,
    ``seed``), the same for every method and metric. The interval's quantiles are
    ``(1 -+ level) / 2`` rounded to 12 decimals (0.95: exactly 0.025 and 0.975).

    Returns:
        dict ``est, lo, hi`` (shares of dense GMACs) and ``censored`` (see :func:`saved_within`).
    """
    est, censored = saved_within(sweeps, label, metric, drop)
    n = sum(len(next(iter(df.result))) for df in sweeps.values())
    boot, _ = saved_within(sweeps, label, metric, drop, idx=bootstrap_indices(n, n_boot, seed))
    lo, hi = np.quantile(boot, np.round([(1 - level) / 2, (1 + level) / 2], 12))
    return dict(est=float(est[0]), lo=float(lo), hi=float(hi), censored=censored)


def saved_difference_ci(sweeps: Sweeps, label: str, ref: str, metric: str = "top1", drop: float = 0.01,
                        n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """``label``'s saving minus ``ref``'s (:func:`saved_within`), paired: both on the same resamples.

    Each bootstrap resample of the pooled photos redoes both walks down the curves, so photos
    that are hard for both methods move both savings together and cancel in the difference.

    Returns:
        dict ``est, lo, hi`` (difference of shares of dense GMACs; positive: ``label`` saves more)
        and ``censored_label``, ``censored_ref`` (either saving is a bound: then so is the
        difference, in the direction of the censored method).
    """
    a, ca = saved_within(sweeps, label, metric, drop)
    b, cb = saved_within(sweeps, ref, metric, drop)
    n = sum(len(next(iter(df.result))) for df in sweeps.values())
    idx = bootstrap_indices(n, n_boot, seed)
    boot = saved_within(sweeps, label, metric, drop, idx=idx)[0] - saved_within(sweeps, ref, metric, drop, idx=idx)[0]
    lo, hi = np.quantile(boot, np.round([(1 - level) / 2, (1 + level) / 2], 12))
    return dict(est=float(a[0] - b[0]), lo=float(lo), hi=float(hi), censored_label=ca, censored_ref=cb)


def merge_vs_prune(mp: pd.DataFrame, metrics: Sequence[str] = ("top1", "agreement"), n_boot: int = 2000,
                   seed: int = 0) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """Merging against pruning, feature by feature (the paper's Table 4), on one photo set.

    Args:
        mp: a sweep table with one ``reduction="merge"`` and one ``"prune"`` row per ``feature``.

    Returns:
        (one row per feature: ``feature`` (upper case), ``gmacs_merge, gmacs_prune``, each metric
        for both in points, ``d_<metric>`` merge minus prune with its paired interval,
        ``p_agreement``, ``holm_p``, ``holm_reject`` (Holm over the features);
        the best merge against the best prune by agreement: ``merge, prune, d, lo, hi`` (points),
        ``n_sig`` / ``n_sig_prune`` (features where merging / pruning is detectably better)).
    """
    rows = []
    for f in dict.fromkeys(mp.feature):
        a = mp[(mp.feature == f) & (mp.reduction == "merge")].iloc[0]
        b = mp[(mp.feature == f) & (mp.reduction == "prune")].iloc[0]
        row = dict(feature=f.upper(), gmacs_merge=a.gmacs, gmacs_prune=b.gmacs)
        for m in metrics:
            row.update({f"{m}_merge": a[m] * 100, f"{m}_prune": b[m] * 100},
                       **paired_columns(a.result, b.result, (m,), n_boot, seed))
        row["p_agreement"] = paired_pvalue(a.result.agree, b.result.agree, n_boot, seed)
        rows.append(row)
    mvp = pd.DataFrame(rows)
    mvp["holm_p"], mvp["holm_reject"] = holm(mvp.p_agreement)
    best_m = mvp.loc[mvp.agreement_merge.idxmax()]
    best_p = mvp.loc[mvp.agreement_prune.idxmax()]
    pick = lambda f, red: mp[(mp.feature == f.lower()) & (mp.reduction == red)].iloc[0].result.agree  # noqa: E731
    d = paired_bootstrap(pick(best_m.feature, "merge"), pick(best_p.feature, "prune"), n_boot, seed)
    best = dict(merge=best_m.feature, prune=best_p.feature, d=d.estimate * 100, lo=d.lo * 100, hi=d.hi * 100,
                n_sig=int((mvp.holm_reject & (mvp.d_agreement > 0)).sum()),
                n_sig_prune=int((mvp.holm_reject & (mvp.d_agreement < 0)).sum()))
    return mvp, best


def by_delay(dl: pd.DataFrame, metrics: Sequence[str] = ("top1", "agreement"), n_boot: int = 2000,
             seed: int = 0) -> pd.DataFrame:
    """DSM by delay D, each row minus D = 0 in the same setting (the sweep's ``label``), in points.

    Returns:
        One row per sweep row: ``setting, D, r, gmacs, top1, agreement`` (points) and
        ``d_<metric>, d_<metric>_lo, d_<metric>_hi``.
    """
    rows = []
    for label, g in dl.groupby("label", sort=False):
        ref = g[g.delay == 0].iloc[0]
        for _, x in g.iterrows():
            rows.append(dict(setting=label, D=x.delay, r=x.r, gmacs=x.gmacs, top1=x.top1 * 100,
                             agreement=x.agreement * 100, **paired_columns(x.result, ref.result, metrics, n_boot, seed)))
    return pd.DataFrame(rows)


def read_throughput_table(text: str) -> "pd.DataFrame":
    """The table that ``benchmarks/throughput.py`` prints (and ``benchmarks/results/`` keeps), parsed.

    Args:
        text: the printed output: a device line, then per model its name and one row per
            config, ``method r GMACs im/s ± std speed-up MAC-red. efficiency``.

    Returns:
        One row per config: ``model, method, r, gmacs, ims, std, speedup, mac_reduction,
        efficiency``.
    """
    rows, model = [], None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 1 and not line.startswith(" "):
            model = fields[0]
        elif len(fields) == 8 and model is not None and fields[1].isdigit():
            try:
                values = [float(v) for v in fields[2:]]
            except ValueError:
                continue
            rows.append(dict(model=model, method=fields[0], r=int(fields[1]), **dict(zip(
                ("gmacs", "ims", "std", "speedup", "mac_reduction", "efficiency"), values))))
    if not rows:
        raise ValueError("no throughput table found in the text")
    return pd.DataFrame(rows)
