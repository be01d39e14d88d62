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
    "PRIMARY", "PrimaryComparison", "Hypothesis", "declared_rs", "confirm",
    "Claim", "PAPER_CLAIMS", "TABLE_COLUMNS", "combine", "join", "untestable", "beside", "confirmatory_claim",
    "saved_difference_text", "convergence_claim", "sink_claim", "contiguity_claim",
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


def confirm(sweeps: compare.Sweeps, rs: Mapping[str, Sequence[int]],
            spec: PrimaryComparison = PRIMARY) -> pd.DataFrame:
    """The declared test, run: each hypothesis' DSM minus ToMe, decided by ``spec``'s rule.

    Args:
        sweeps: photo-set name -> sweep table (the unseen photos: one set), with a ``"ToMe"``
            curve and one curve per hypothesis, labelled by the hypothesis' ``name``.
        rs: hypothesis name -> its declared r values (:func:`declared_rs`).
        spec: the declaration.

    Returns:
        One row per hypothesis: ``hypothesis, rs, n`` (photos), ``estimate, lo, hi`` (points, the
        interval at ``spec.level``), ``lo95, hi95`` (the plain 95% interval, for reference),
        ``p`` (two-sided paired bootstrap), ``p_holm``, ``detected`` (Holm at ``spec.alpha``),
        ``claim_verdict`` (the paper's "better by more than ``margin``": a
        :func:`~dsm_lite.stats.verdict` on the interval) and ``relation``: "DSM better" or "DSM worse"
        when Holm detects a difference, else "equivalent within +-margin" when the interval lies
        inside the margin, else "not detectable".
    """
    rows = []
    for h in spec.hypotheses:
        kept, diffs = compare.matched_differences(sweeps, h.name, rs[h.name], spec.metric)
        if list(kept) != list(rs[h.name]):
            raise ValueError(f"{h.name}: r = {sorted(set(rs[h.name]) - set(kept))} lie outside ToMe's "
                             "curve; the declared range needs ToMe's grid to reach them")
        d = diffs.mean(axis=1) * 100  # (N,) per photo, in points
        ci = stats.bootstrap_ci(d, spec.n_boot, spec.seed, level=spec.level)
        ci95 = stats.bootstrap_ci(d, spec.n_boot, spec.seed)
        rows.append(dict(hypothesis=h.name, rs=", ".join(map(str, kept)), n=len(d), estimate=ci.estimate,
                         lo=ci.lo, hi=ci.hi, lo95=ci95.lo, hi95=ci95.hi,
                         p=stats.paired_pvalue(d, np.zeros_like(d), spec.n_boot, spec.seed)))
    out = pd.DataFrame(rows)
    out["p_holm"], out["detected"] = stats.holm(out.p.to_numpy(), spec.alpha)
    out["claim_verdict"] = [stats.verdict(lo, hi, threshold=spec.margin) for lo, hi in zip(out.lo, out.hi)]
    out["relation"] = [_relation(e, lo, hi, det, spec.margin)
                       for e, lo, hi, det in zip(out.estimate, out.lo, out.hi, out.detected)]
    return out


def _relation(estimate: float, lo: float, hi: float, detected: bool, margin: float) -> str:
    """DSM against ToMe in words: a Holm-detected difference names its side (and says when its
    whole interval lies inside the margin); an undetected one inside the margin is equivalence."""
    inside = -margin < lo and hi < margin
    if detected:
        side = "DSM better" if estimate > 0 else "DSM worse"
        return side + (f", by less than {margin:g} point" if inside else "")
    return f"equivalent within +-{margin:g} point" if inside else "not detectable"


# --------------------------------------------------------------------------- every claim
@dataclass(frozen=True)
class Claim:
    """One claim of the paper: a short id, where the paper makes it, and what it says."""
    id: str
    where: str
    text: str


#: every claim the paper makes, in its order; chapter 5's table has one row for each
PAPER_CLAIMS: Tuple[Claim, ...] = (
    Claim("sinks", "Section 2, Figure 1", "high-norm outlier tokens are attention sinks: a few background tokens "
          "receive orders of magnitude more attention, after an initial delay"),
    Claim("convergence", "Section 2.1, Figure 2, appendix B, Figure 8", "delayed convergent attention: the first "
          "blocks make tokens less similar, later blocks more similar; the switch comes at about 1/6 of the depth"),
    Claim("delay", "Section 2.1", "delayed merging helps: merging in the first blocks is harmful"),
    Claim("spatial", "Section 2.2, Table 1", "spatial merging alone is as accurate as ToMe"),
    Claim("beats_tome", "Section 3, Figure 4", "DSM beats ToMe by more than 1% at equal FLOPs, most for small models"),
    Claim("saved", "Section 3", "45% (ViT-S) and 42% (ViT-B) of the FLOPs saved within a 1% loss"),
    Claim("reduction", "Abstract, Section 1", "up to 1.8x FLOP reduction at a negligible loss"),
    Claim("speedup", "Abstract, Section 1", "up to 1.6x throughput on an A6000 GPU at a negligible loss"),
    Claim("scaling", "Section 3, Figure 4", "DSM's gain over ToMe shrinks with model size (negligible for ViT-L)"),
    Claim("data_movement", "Section 3, Figure 6", "local merging costs throughput through data movement, less so for "
          "larger models"),
    Claim("training_free", "Abstract, Table 1", "two orders of magnitude faster than training-based methods, at "
          "competitive accuracy (DeiT-S)"),
    Claim("transfer", "Table 2", "DSM on fine-tuned ViT-B gives about 1.5x speed-up on four transfer data sets at "
          "small accuracy loss"),
    Claim("merge_vs_prune", "Appendix C.1, Table 4", "merging beats pruning in training-free settings"),
    Claim("feature", "Appendix C.1, Table 5", "K is the best similarity feature for DSM"),
    Claim("sam", "Appendix C.1, Figure 5", "sharpness-minimised (SAM) ViT-B is friendlier to compression: 1.6x "
          "throughput with delayed merging"),
    Claim("local_blocks", "Figure 6", "the sweet spot is about 3 local blocks"),
    Claim("cnns", "Appendix C.2, Table 6", "DeiT-S with DSM is as good a trade-off as CNNs such as EfficientNet"),
    Claim("huge_tiny", "Appendix C.2, Table 7", "DSM beats ToMe on ViT-H and DeiT-T"),
    Claim("contiguity", "Appendix D, Figure 7", "DSM merges more contiguous patches than ToMe"),
    Claim("outliers_archs", "Figure 9", "outlier tokens appear in different ViT architectures"),
)
_CLAIMS = {c.id: c for c in PAPER_CLAIMS}

#: chapter 5's table: the claim, the paper's number, the evidence on each photo set, the verdict
TABLE_COLUMNS = ("claim (paper)", "paper", "training photos (exploratory)", "unseen photos (ilsvrc2012-val)", "verdict")


def combine(claim_id: str, training: Row, unseen: Row = None) -> Row:
    """One row of the final table from a claim function's rows on each photo set.

    The verdict is the unseen photos' where they were judged (they are what a user meets), else
    the training photos'. A claim function's own wording of the claim is replaced by the one
    :data:`PAPER_CLAIMS` holds.
    """
    c = _CLAIMS[claim_id]
    ev = lambda row: f"{row[COLUMNS[2]]} -> {row[COLUMNS[3]]}"  # noqa: E731  evidence, then verdict
    return dict(id=claim_id, **{
        TABLE_COLUMNS[0]: f"{c.text} ({c.where})",
        TABLE_COLUMNS[1]: training[COLUMNS[1]],
        TABLE_COLUMNS[2]: ev(training),
        TABLE_COLUMNS[3]: ev(unseen) if unseen is not None else "not run on these photos",
        TABLE_COLUMNS[4]: (unseen or training)[COLUMNS[3]],
    })


def untestable(claim_id: str, paper: str, needs: str) -> Row:
    """A claim this book cannot test: what it would take (model, data, hardware)."""
    row = _row("", paper, "-", f"not testable here: needs {needs}")
    out = combine(claim_id, row)
    out[TABLE_COLUMNS[2]] = out[TABLE_COLUMNS[3]] = "-"
    return out


def confirmatory_claim(conf: pd.DataFrame, spec: PrimaryComparison = PRIMARY) -> Row:
    """The declared test (:func:`confirm`) as a claims row: both hypotheses, Holm-corrected."""
    parts = [f"{r.hypothesis}, r = {r.rs}: {points(r.estimate)} [{points(r.lo)}, {points(r.hi)}] top-1 "
             f"({spec.level:.1%}), Holm p = {r.p_holm:.3f}, {r.relation}" for r in conf.itertuples()]
    verdicts = "; ".join(f"{r.claim_verdict} ({r.hypothesis.split(' (')[1].rstrip(')')})" for r in conf.itertuples())
    return _row("", "> +1 point", "CONFIRMATORY: " + "; ".join(parts), f"by more than {spec.margin:g} point: {verdicts}")


def saved_difference_text(d: Mapping[str, Any]) -> str:
    """DSM's saving minus ToMe's (:func:`dsm_lite.compare.saved_difference_ci`), in points of dense GMACs."""
    bound = " (a bound: a curve never falls 1 point)" if d["censored_label"] or d["censored_ref"] else ""
    return (f"DSM minus ToMe, GMACs saved within 1 point: {100 * d['est']:+.1f} [{100 * d['lo']:+.1f}, "
            f"{100 * d['hi']:+.1f}] points of dense{bound}")


def convergence_claim(delta: np.ndarray, d_paper: int, d_measured: int, n_boot: int = 2000, seed: int = 0) -> Row:
    """"Divergent first, convergent from about depth/6": the mean change of similarity per block.

    Args:
        delta: (N, L) per-photo change of token similarity during attention, per block.
        d_paper: depth / 6; ``d_measured``: chapter 2's transition block.

    Judged on a simultaneous 95% band over the L blocks: *supported* if every block before
    ``d_paper`` is divergent (band below 0) and every block from it on convergent (band above 0),
    *contradicted* if some block has the other sign detectably, else *not detectable*.
    """
    band = stats.simultaneous_band(np.asarray(delta, float), n_boot, seed)
    early, late = slice(0, d_paper), slice(d_paper, None)
    wrong = int((band.lo[early] > 0).sum() + (band.hi[late] < 0).sum())
    right = int((band.hi[early] < 0).sum() + (band.lo[late] > 0).sum())
    sign = " ".join("-" if h < 0 else "+" if l > 0 else "0" for l, h in zip(band.lo, band.hi))
    v = "contradicted" if wrong else "supported" if right == len(band.lo) else "not detectable"
    return _row("", "switch at block 2 of 12 (DeiT-S)",
                f"sign of the mean change of similarity per block (simultaneous 95% band; -: divergent, +: convergent, "
                f"0: undecided): {sign}; {wrong} of {len(band.lo)} blocks detectably on the wrong side of depth/6 = "
                f"{d_paper}; chapter 2's rule puts the switch at block {d_measured}", v)


def sink_claim(top_share: np.ndarray, median_share: np.ndarray, emergence: int, n_boot: int = 2000,
               seed: int = 0) -> Row:
    """"Orders of magnitude more attention": the most-attended patch token against a typical one.

    Args:
        top_share, median_share: (N,) per photo, in the last block, the attention share
            (averaged over heads and queries) of the most-attended patch token and of the median
            patch token.
        emergence: first block whose output holds high-norm outliers (the delay).

    Judged on log10(top / median) per photo: *supported* if its interval lies above 1 (at least
    one order of magnitude; the estimate says how many).
    """
    ratio = np.log10(np.asarray(top_share, float) / np.asarray(median_share, float))
    ci = stats.bootstrap_ci(ratio, n_boot, seed)
    return _row("", "orders of magnitude (ViT-S)",
                f"last block: the most-attended patch token receives 10^{ci.estimate:.2f} [10^{ci.lo:.2f}, "
                f"10^{ci.hi:.2f}] times the median patch token's attention (claim read as: at least 10x); "
                f"high-norm outliers first leave block {emergence}", stats.verdict(ci.lo, ci.hi, threshold=1.0))


def contiguity_claim(dsm: np.ndarray, tome: np.ndarray, r_dsm: int, r_tome: int, n_boot: int = 2000,
                     seed: int = 0, tokens: Tuple[int, int] = None) -> Row:
    """"DSM merges more contiguous patches": per photo, the share of merged groups that are
    4-connected on the patch grid at the end of the network, DSM minus ToMe (paired).
    ``tokens``: the tokens each (DSM, ToMe) ends with, reported beside (fewer tokens means
    larger groups, which are harder to keep connected)."""
    a, b = np.asarray(dsm, float) * 100, np.asarray(tome, float) * 100
    both = ~(np.isnan(a) | np.isnan(b))  # a photo with no merged group has no share
    d = stats.paired_bootstrap(a[both], b[both], n_boot, seed)
    ends = f" (they end with {tokens[0]} and {tokens[1]} tokens)" if tokens is not None else ""
    return _row("", "qualitative (ViT-L/384, Figure 7)",
                f"4-connected groups at the end, DSM (r = {r_dsm}) minus ToMe (r = {r_tome}) at about equal GMACs{ends}: "
                f"{interval(d)} points", stats.verdict(d.lo, d.hi))

def beside(rows: Mapping[str, Tuple[Any, Any]]) -> pd.DataFrame:
    """Each comparison on the training photos beside the unseen photos, with half-widths.

    Args:
        rows: comparison name -> (interval on the training photos, interval on the unseen photos),
            each a :class:`~dsm_lite.stats.BootstrapCI` (or any ``(estimate, lo, hi)``) in points,
            or None where the comparison did not run on that set.

    Returns:
        Columns ``comparison``, ``training photos``, ``half-width``, ``unseen photos`` and its
        half-width (text).
    """
    def cell(ci):
        if ci is None:
            return "-", "-"
        est, lo, hi = (float(v) for v in tuple(ci)[:3])
        return f"{points(est)} [{points(lo)}, {points(hi)}]", f"{(hi - lo) / 2:.1f}"
    out = []
    for name, (train, unseen) in rows.items():
        (t, th), (u, uh) = cell(train), cell(unseen)
        out.append({"comparison": name, "training photos": t, "half-width": th, "unseen photos": u, "half-width ": uh})
    return pd.DataFrame(out)


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


def saved_within_claim(saved: Mapping[Tuple[str, str], Dict[str, Any]],
                       difference: Mapping[str, Any] = None) -> Row:
    """"45% of FLOPs saved within 1% top-1": DSM's and ToMe's saving (ViT-S is not run here), and,
    given ``difference`` (:func:`dsm_lite.compare.saved_difference_ci`), DSM's minus ToMe's, head-on."""
    s, t = saved["DSM", "top1"], saved["ToMe", "top1"]
    ours = (f"DSM on ViT-Ti: {s['est']:.0%} [{s['lo']:.0%}, {s['hi']:.0%}] of GMACs saved within 1 point of top-1"
            + (" (a lower bound: never 1 point below)" if s["censored"] else "")
            + f" (ToMe {t['est']:.0%} [{t['lo']:.0%}, {t['hi']:.0%}])")
    verdict = "not testable here (ViT-S not run; ViT-Ti reported)"
    if difference is not None:
        d = difference
        ours += "; " + saved_difference_text(d)
        censored = bool(d["censored_label"] or d["censored_ref"])
        verdict += f"; DSM saves more than ToMe: {stats.verdict(d['lo'], d['hi'], censored=censored)}"
    return _row("45% of FLOPs saved within a 1% top-1 loss (ViT-S; 42% ViT-B)", "45% (ViT-S)", ours, verdict)


def join(rows: Mapping[str, Row]) -> Row:
    """Several claim rows on one question (say, each window reading) as one: evidence and verdicts
    labelled by their keys."""
    first = next(iter(rows.values()))
    return _row(first[COLUMNS[0]], first[COLUMNS[1]],
                "; ".join(f"{k}: {r[COLUMNS[2]]}" for k, r in rows.items()),
                "; ".join(f"{r[COLUMNS[3]]} ({k})" for k, r in rows.items()))


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


def delay_claim(equal_gmacs: pd.DataFrame, d_paper: int, depth: int, d_measured: int,
                photos: str = "imagenet-sample") -> Row:
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
                f"{points(p.d_agreement_hi)}] ({photos})",
                f"{stats.verdict(e.d_agreement_lo, e.d_agreement_hi)} (D = {d_paper}, agreement)")


def throughput_claim() -> Row:
    """The data-movement claim is about GPU throughput: not testable on the book's CPU run."""
    return _row("local merging costs throughput through data movement", "marginal throughput gains (GPU)",
                "on the book's CPU the MACs dominate (benchmarks/results/cpu-2core-vit_tiny.txt); the paper's case is a "
                "GPU run of benchmarks/throughput.py", "not testable here: needs a GPU (benchmarks/results/ has H100 runs)")


def feature_claim(features: pd.DataFrame, n_boot: int = 2000, seed: int = 0, ref: str = "k",
                  r: int = 16, photos: str = "imagenet-sample") -> Row:
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
                + f" agreement ({photos}, DSM r = {r}); "
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
                       paper_best: int = 3, top1: Sequence[float] = None) -> Row:
    """"The sweet spot is about 3 local blocks": every count against 0 local blocks, Holm-corrected.

    Args:
        local: one sweep row per number of local blocks (``local_blocks``, ``agreement``,
            ``result``), the first with 0.
        diffs: agreement difference of each row to 0 local blocks, points.
        top1: the same for top-1 (optional): reported with its own Holm family, and a count that
            is detectably *worse* than 0 local blocks in top-1 contradicts a sweet spot there.
    """
    best = int(local.loc[local.agreement.idxmax(), "local_blocks"])
    reject = holm_against(local.result.iloc[0].agree, [x.agree for x in local.result.iloc[1:]], n_boot, seed)
    ours = (f"most agreement at {best} local block(s); vs 0 local blocks: "
            + ", ".join(f"{n}: {points(d)}" for n, d in zip(local.local_blocks, diffs)) + " points; "
            f"Holm-corrected differences from 0 local blocks: {int(reject.sum())} of {len(reject)}")
    verdict = "not detectable" if not reject.any() else ("supported" if best == paper_best else "contradicted")
    if top1 is not None:
        ref = local.result.iloc[0].correct1
        rej1 = holm_against(ref, [x.correct1 for x in local.result.iloc[1:]], n_boot, seed)
        worse = [int(n) for n, r, d in zip(local.local_blocks.iloc[1:], rej1, list(top1)[1:]) if r and d < 0]
        ours += ("; top-1 vs 0: " + ", ".join(f"{n}: {points(d)}" for n, d in zip(local.local_blocks, top1))
                 + f" points, Holm-corrected worse: {', '.join(map(str, worse)) or 'none'}")
        if paper_best in worse:
            verdict = f"contradicted in top-1 ({paper_best} local blocks detectably worse than 0)"
        else:
            verdict += " (agreement)"
    return _row("the sweet spot is about 3 local blocks (Figure 6)", "3 local blocks", ours, verdict)


def reduction_claim(saving: Dict[str, Any], delay: int, max_reduction: float, target: float = 1.8) -> Row:
    """"About 1.8x FLOP reduction within 1%": DSM's MAC reduction at a 1-point top-1 drop."""
    s = saving
    red, red_lo, red_hi = 1 / (1 - s["est"]), 1 / (1 - s["lo"]), 1 / (1 - s["hi"])
    return _row("about 1.8x FLOP reduction and 1.6x throughput at <= 1% loss", "1.8x FLOPs, 1.6x im/s (A6000)",
                f"DSM FLOP reduction within 1 point of top-1: {red:.2f}x [{red_lo:.2f}x, {red_hi:.2f}x]"
                + (" (a lower bound)" if s["censored"] else "")
                + f"; with D = {delay} no r can exceed {max_reduction:.2f}x",
                "not testable here: 'up to 1.8x' is the best over models from Tiny to Huge; on ViT-Ti alone, "
                f"more than {target:g}x is {stats.verdict(red_lo - target, red_hi - target, censored=s['censored'])}")


def table(rows: List[Row]) -> pd.DataFrame:
    """The claims table: rows from :func:`combine` (one per claim of :data:`PAPER_CLAIMS`, in
    its order, columns :data:`TABLE_COLUMNS`), or plain claim rows (columns :data:`COLUMNS`).

    Raises:
        ValueError: combined rows that miss a claim of the paper, or name one twice.
    """
    if rows and "id" in rows[0]:
        ids = [r["id"] for r in rows]
        missing = [c.id for c in PAPER_CLAIMS if c.id not in ids]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if missing or twice:
            raise ValueError(f"the claims table must have one row per claim of the paper: missing {missing}, "
                             f"twice {twice}")
        order = {c.id: k for k, c in enumerate(PAPER_CLAIMS)}
        return pd.DataFrame(sorted(rows, key=lambda r: order[r["id"]]), columns=list(TABLE_COLUMNS))
    return pd.DataFrame(rows, columns=list(COLUMNS))
