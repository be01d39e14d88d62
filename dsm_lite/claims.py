"""The paper's claims, judged: one function per claim, each returning a row of chapter 5's table.

Every row holds the claim as the paper states it, the paper's number, what this book measured
(with intervals, in percentage points), and a verdict that follows from
:func:`dsm_lite.stats.verdict` or from a Holm-corrected family of paired tests
(:func:`dsm_lite.stats.holm`). The functions take what chapter 5 has already computed (sweep
tables, bootstrap intervals) and only judge and phrase it, so the same evidence always gives the
same row.

Shapes: ``N`` photos; a *saving* is a dict ``est, lo, hi, censored`` as
:func:`dsm_lite.compare.saved_within_ci` returns it; a *family* is a dict ``rs`` (the matched r),
``mean`` (:class:`~dsm_lite.stats.BootstrapCI` of the mean difference over the matched points,
in points) and ``band`` (its :func:`~dsm_lite.stats.simultaneous_band`), as
:func:`matched_family` returns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd

from . import compare, stats
from .schedules import ModelShape, default_delay, plan
from .stats import BootstrapCI

__all__ = [
    "PRIMARY", "PrimaryComparison", "Hypothesis", "declared_rs",
    "COLUMNS", "points", "interval", "matched_family", "holm_against", "saved_within_claim",
    "beats_tome_claim", "spatial_matches_tome_claim", "delay_claim", "throughput_claim",
    "feature_claim", "merge_vs_prune_claim", "local_blocks_claim", "reduction_claim",
]

# --------------------------------------------------------------------------- the declared test
@dataclass(frozen=True)
class Hypothesis:
    """One reading of DSM, compared with ToMe at equal GMACs in the confirmatory test.

    ``delay`` is ``"paper"`` (depth / 6, :func:`~dsm_lite.schedules.default_delay`) or
    ``"measured"`` (the transition block of chapter 2's rule, :func:`dsm_lite.probes.transition_block`,
    measured on training photos before the test runs).
    """
    name: str
    windows: str
    delay: str


@dataclass(frozen=True)
class PrimaryComparison:
    """The confirmatory comparison of DSM with ToMe, fixed before it ran on unseen photos.

    Everything that decides the verdict is here, and chapter 5 states it in words before the
    first result on ``photos``:

    - **photos**: ``photos``, ILSVRC2012 validation photos no ImageNet-1k model trained on;
    - **metric**: top-1 correctness per photo (what matters to a user of the model);
    - **range**: every DSM point of the grid ``r = r_start, r_start + r_step, ...`` whose GMACs
      are at least dense / ``max_reduction``: the paper claims "up to 1.8x FLOP reduction ... at a
      negligible loss", so points beyond 1.8x fewer GMACs lie outside what it claims;
    - **reference**: ToMe's per-photo results at ``tome_rs``, interpolated linearly in GMACs to
      each DSM point (:func:`dsm_lite.compare.matched_differences`);
    - **statistic**: the mean over the declared points of the per-photo difference, DSM minus
      ToMe, in percentage points, with a paired percentile bootstrap over photos (``n_boot``
      resamples, ``seed``);
    - **hypotheses**: the two readings of DSM in ``hypotheses``; Holm over the two at ``alpha``
      on two-sided bootstrap p-values of "difference = 0" decides whether a difference is
      detected, and the interval for the verdicts has level ``1 - alpha / 2`` (Bonferroni over
      the two, never narrower than Holm's);
    - **decision rule** (:func:`dsm_lite.stats.verdict` on that interval): the paper's "DSM
      beats ToMe by more than 1%" is *supported* if the interval lies above +``margin``,
      *contradicted* if it lies below +``margin``; DSM and ToMe are *equivalent* if it lies
      inside (-``margin``, +``margin``); anything else is *not detectable*.
    """
    photos: str = "ilsvrc2012-val"
    metric: str = "top1"
    max_reduction: float = 1.8
    margin: float = 1.0
    alpha: float = 0.05
    n_boot: int = 2000
    seed: int = 0
    r_start: int = 8
    r_step: int = 4
    r_max: int = 64
    tome_rs: Tuple[int, ...] = (4, 8, 12, 16, 20)
    hypotheses: Tuple[Hypothesis, ...] = field(default_factory=lambda: (
        Hypothesis("DSM (paper windows, D = depth/6)", windows="paper", delay="paper"),
        Hypothesis("DSM (joint windows, measured D)", windows="joint", delay="measured"),
    ))

    @property
    def level(self) -> float:
        """Level of each hypothesis' interval: ``1 - alpha / 2``."""
        return 1 - self.alpha / len(self.hypotheses)

    def delay(self, hypothesis: Hypothesis, depth: int, measured: int) -> int:
        """The hypothesis' delay D for a model of ``depth`` blocks."""
        return default_delay(depth) if hypothesis.delay == "paper" else int(measured)


#: the comparison chapter 5 declared before running it on ILSVRC2012 validation photos
PRIMARY = PrimaryComparison()


def declared_rs(shape: ModelShape, hypothesis: Hypothesis, delay: int,
                spec: PrimaryComparison = PRIMARY) -> List[int]:
    """DSM's r grid for ``hypothesis``: ``r_start, r_start + r_step, ...`` while its GMACs stay
    at least dense / ``max_reduction`` (from the schedule alone: no photo is looked at)."""
    limit = plan(shape, "tome", 0).macs / spec.max_reduction
    rs = []
    for r in range(spec.r_start, spec.r_max + 1, spec.r_step):
        if plan(shape, "dsm", r, windows=hypothesis.windows, delay=delay).macs < limit:
            break
        rs.append(r)
    return rs


COLUMNS = ("claim (paper)", "paper", "this book (ViT-Ti)", "verdict")
Row = Dict[str, str]


def _row(text: str, paper: str, ours: str, verdict: str) -> Row:
    return dict(zip(COLUMNS, (text, paper, ours, verdict)))


def points(v: float) -> str:
    """A difference in percentage points, signed, one decimal: ``+1.2``."""
    return f"{v:+.1f}"


def interval(ci: BootstrapCI) -> str:
    """An interval in points: ``+1.2 [-0.3, +2.7]``."""
    return f"{points(ci.estimate)} [{points(ci.lo)}, {points(ci.hi)}]"


def matched_family(sweeps: compare.Sweeps, label: str, rs: Sequence[int], metric: str,
                   n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """``label`` minus ToMe at equal GMACs over every matched r, as one pre-declared summary.

    Returns ``rs`` (the r values inside ToMe's GMAC range), ``mean`` (bootstrap CI of the
    per-photo mean difference over those points, in points) and ``band`` (a simultaneous 95%
    band over all of them, in points).
    """
    kept, diffs = compare.matched_differences(sweeps, label, rs, metric)  # (N, points)
    return dict(rs=kept, mean=stats.bootstrap_ci(diffs.mean(axis=1) * 100, n_boot, seed),
                band=stats.simultaneous_band(diffs * 100, n_boot, seed))


def holm_against(ref: np.ndarray, others: Sequence[np.ndarray], n_boot: int = 2000,
                 seed: int = 0) -> np.ndarray:
    """Which of ``others`` (each (N,) per photo) differ from ``ref`` (N,), Holm-corrected over
    the family of paired bootstrap tests: a (len(others),) bool array."""
    p = [stats.paired_pvalue(ref, x, n_boot, seed) for x in others]
    return stats.holm(p)[1]


def saved_within_claim(saved: Mapping[Tuple[str, str], Dict[str, Any]]) -> Row:
    """"45% of FLOPs saved within 1% top-1": DSM's and ToMe's saving (ViT-S is not run here)."""
    s, t = saved["DSM", "top1"], saved["ToMe", "top1"]
    return _row("45% of FLOPs saved within a 1% top-1 loss (ViT-S; 42% ViT-B)", "45% (ViT-S)",
                f"DSM on ViT-Ti: {s['est']:.0%} [{s['lo']:.0%}, {s['hi']:.0%}] of GMACs saved within 1 point of top-1"
                + (" (a lower bound: never 1 point below)" if s["censored"] else "")
                + f" (ToMe {t['est']:.0%} [{t['lo']:.0%}, {t['hi']:.0%}])",
                "not testable here (ViT-S not run; ViT-Ti reported)")


def beats_tome_claim(agreement: Dict[str, Any], top1: Dict[str, Any], threshold: float = 1.0) -> Row:
    """"DSM beats ToMe by more than 1% at equal FLOPs", judged on the mean over matched points."""
    fa, ft = agreement, top1
    return _row("DSM beats ToMe by more than 1% at equal FLOPs, most for small models", "> +1 point",
                f"DSM minus ToMe averaged over its {len(fa['rs'])} matched points (r = {', '.join(map(str, fa['rs']))}): "
                f"agreement {interval(fa['mean'])}, top-1 {interval(ft['mean'])}; the simultaneous band lies above 0 at "
                f"{int((fa['band'].lo > 0).sum())} of {len(fa['rs'])} points (agreement), {int((ft['band'].lo > 0).sum())} (top-1)",
                f"by more than 1 point: {stats.verdict(fa['mean'].lo, fa['mean'].hi, threshold=threshold)} (agreement), "
                f"{stats.verdict(ft['mean'].lo, ft['mean'].hi, threshold=threshold)} (top-1); better at all: "
                f"{stats.verdict(fa['mean'].lo, fa['mean'].hi)} (agreement), {stats.verdict(ft['mean'].lo, ft['mean'].hi)} (top-1)")


def spatial_matches_tome_claim(agreement: Dict[str, Any], top1: Dict[str, Any], margin: float) -> Row:
    """"Spatial merging is as accurate as ToMe": equivalence within +-``margin`` points."""
    sa, st_ = agreement, top1
    return _row("spatial merging alone is as accurate as ToMe (Table 1; tested here training-free against training-free ToMe)",
                "79.3 vs 79.4 top-1 (DeiT-S, ToMe trained)",
                f"spatial minus ToMe averaged over {len(sa['rs'])} matched points: agreement {interval(sa['mean'])}, "
                f"top-1 {interval(st_['mean'])}; margin +-{margin:g} point",
                f"{stats.verdict(sa['mean'].lo, sa['mean'].hi, margin=margin)} (agreement), "
                f"{stats.verdict(st_['mean'].lo, st_['mean'].hi, margin=margin)} (top-1)")


def delay_claim(equal_gmacs: pd.DataFrame, d_paper: int, depth: int, d_measured: int) -> Row:
    """"Delayed merging helps", judged at equal GMACs: D = ``d_paper`` vs D = 0.

    Args:
        equal_gmacs: one row per delay D (the index), with ``d_agreement``, ``d_top1`` and their
            ``_lo``/``_hi`` (points, paired 95% CI of the difference to D = 0).
    """
    e, p = equal_gmacs.loc[d_paper], equal_gmacs.loc[d_measured]
    return _row("delayed merging helps: merging in the first blocks is harmful", f"D = depth/6 ({d_paper} of {depth})",
                f"at equal GMACs, D = {d_paper} vs D = 0: agreement {points(e.d_agreement)} [{points(e.d_agreement_lo)}, "
                f"{points(e.d_agreement_hi)}], top-1 {points(e.d_top1)} [{points(e.d_top1_lo)}, {points(e.d_top1_hi)}]; "
                f"measured D = {d_measured}: agreement {points(p.d_agreement)} [{points(p.d_agreement_lo)}, "
                f"{points(p.d_agreement_hi)}] (imagenet-sample)",
                f"{stats.verdict(e.d_agreement_lo, e.d_agreement_hi)} (D = {d_paper}, agreement)")


def throughput_claim() -> Row:
    """The data-movement claim is about GPU throughput: not testable on the book's CPU run."""
    return _row("local merging costs throughput through data movement", "marginal throughput gains (GPU)",
                "CPU timings only (below); benchmarks/throughput.py measures it properly", "not testable here (no GPU)")


def feature_claim(features: pd.DataFrame, n_boot: int = 2000, seed: int = 0, ref: str = "k",
                  r: int = 16) -> Row:
    """"K is the best similarity feature": K against every other feature, Holm-corrected.

    Args:
        features: one sweep row per feature (``feature``, ``label``, ``agreement``, ``result``).
    """
    k_res = features[features.feature == ref].iloc[0].result
    others = features[features.feature != ref]
    reject = holm_against(k_res.agree, list(others.result.map(lambda x: x.agree)), n_boot, seed)
    d = np.array([k_res.agree.mean() - x.agree.mean() for x in others.result])  # K minus each
    k_better = [l for l, rej, v in zip(others.label, reject, d) if rej and v > 0]
    k_worse = [l for l, rej, v in zip(others.label, reject, d) if rej and v < 0]
    return _row("K is the best similarity feature (Table 5)", "K 82.9 vs X 82.7, V 82.6, Q 82.4, random 59.6 (ViT-L)",
                ", ".join(f"{l}: {a:.1%}" for l, a in zip(features.label, features.agreement))
                + f" agreement (imagenet-sample, DSM r = {r}); "
                f"Holm-corrected over {len(others)} comparisons, K detectably better than: {', '.join(k_better) or 'none'}",
                "contradicted (another feature is better)" if k_worse else
                "supported" if len(k_better) == len(others) else
                f"not detectable (K beats {len(k_better)} of {len(others)} detectably)")


def merge_vs_prune_claim(best: Mapping[str, Any], random_row: Any, r: int, n_features: int = 5) -> Row:
    """"Merging beats pruning": the best merge vs the best prune, and feature by feature.

    Args:
        best: ``merge``, ``prune`` (the best feature of each), ``d``, ``lo``, ``hi`` (best merge
            minus best prune, points), ``n_sig`` / ``n_sig_prune`` (features where merging /
            pruning is detectably better, Holm-corrected).
        random_row: the random feature's row, with ``d_agreement`` and its ``_lo``/``_hi``.
    """
    rnd = random_row
    return _row("merging beats pruning in training-free settings (Table 4)", "best merge 83.5 vs best prune 81.6 (ViT-L, r = 7)",
                f"r = {r}, best merge ({best['merge']}) minus best prune ({best['prune']}): agreement "
                f"{points(best['d'])} [{points(best['lo'])}, {points(best['hi'])}]; same feature, Holm-corrected: merging better for "
                f"{best['n_sig']} of {n_features}, pruning better for {best['n_sig_prune']} (random: {points(rnd.d_agreement)} "
                f"[{points(rnd.d_agreement_lo)}, {points(rnd.d_agreement_hi)}])",
                f"best merge vs best prune: {stats.verdict(best['lo'], best['hi'])}; per feature: supported for "
                f"{best['n_sig']} of {n_features}, contradicted for {best['n_sig_prune']}")


def local_blocks_claim(local: pd.DataFrame, diffs: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       paper_best: int = 3) -> Row:
    """"The sweet spot is about 3 local blocks": every count against 0 local blocks, Holm-corrected.

    Args:
        local: one sweep row per number of local blocks (``local_blocks``, ``agreement``,
            ``result``), the first with 0.
        diffs: agreement difference of each row to 0 local blocks, points.
    """
    best = int(local.loc[local.agreement.idxmax(), "local_blocks"])
    reject = holm_against(local.result.iloc[0].agree, [x.agree for x in local.result.iloc[1:]], n_boot, seed)
    return _row("the sweet spot is about 3 local blocks (Figure 6)", "3 local blocks",
                f"most agreement at {best} local block(s); vs 0 local blocks: "
                + ", ".join(f"{n}: {points(d)}" for n, d in zip(local.local_blocks, diffs)) + " points; "
                f"Holm-corrected differences from 0 local blocks: {int(reject.sum())} of {len(reject)}",
                "not detectable" if not reject.any() else ("supported" if best == paper_best else "contradicted"))


def reduction_claim(saving: Dict[str, Any], delay: int, max_reduction: float, target: float = 1.8) -> Row:
    """"About 1.8x FLOP reduction within 1%": DSM's MAC reduction at a 1-point top-1 drop."""
    s = saving
    red, red_lo, red_hi = 1 / (1 - s["est"]), 1 / (1 - s["lo"]), 1 / (1 - s["hi"])
    return _row("about 1.8x FLOP reduction and 1.6x throughput at <= 1% loss", "1.8x FLOPs, 1.6x im/s (A6000)",
                f"DSM FLOP reduction within 1 point of top-1: {red:.2f}x [{red_lo:.2f}x, {red_hi:.2f}x]"
                + (" (a lower bound)" if s["censored"] else "")
                + f"; with D = {delay} no r can exceed {max_reduction:.2f}x; throughput: CPU only, below",
                "not testable here: 'up to 1.8x' is the best over models from Tiny to Huge; on ViT-Ti alone, "
                f"more than {target:g}x is {stats.verdict(red_lo - target, red_hi - target, censored=s['censored'])}; "
                "throughput: no GPU")


def table(rows: List[Row]) -> pd.DataFrame:
    """The claims table, one row per claim, in :data:`COLUMNS`."""
    return pd.DataFrame(rows, columns=list(COLUMNS))
