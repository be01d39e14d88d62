"""dsm_lite.claims: each claim's verdict follows from stats.verdict or a Holm-corrected family, on
synthetic evidence whose answer is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dsm_lite import claims, compare, stats
from dsm_lite.evaluation import EvalResult
from dsm_lite.stats import BootstrapCI

N = 400


def _result(agree: np.ndarray) -> EvalResult:
    n = len(agree)
    z = np.zeros(n, dtype=np.int64)
    return EvalResult(z, np.zeros((n, 5), np.int64), agree.copy(), agree.copy(), agree.copy(), np.zeros(n))


def _family(lo: float, hi: float, band_lo=(0.5, -0.2), band_hi=(2.0, 1.0)) -> dict:
    return dict(rs=[8, 12], mean=BootstrapCI((lo + hi) / 2, lo, hi),
                band=BootstrapCI(None, np.array(band_lo), np.array(band_hi)))


def test_points_and_interval():
    assert claims.points(1.04) == "+1.0" and claims.points(-0.25) == "-0.2"
    assert claims.interval(BootstrapCI(1.25, -0.5, 3.0)) == "+1.2 [-0.5, +3.0]"


@pytest.mark.parametrize("lo, hi, more_than_1, at_all", [
    (1.2, 2.8, "supported", "supported"),       # the whole interval above +1
    (0.3, 2.8, "not detectable", "supported"),  # above 0, not above 1
    (-3.0, -1.2, "contradicted", "contradicted"),
    (-0.4, 0.6, "contradicted", "not detectable"),  # below +1 entirely: "more than 1" is out
])
def test_beats_tome_verdicts(lo, hi, more_than_1, at_all):
    row = claims.beats_tome_claim(_family(lo, hi), _family(lo, hi))
    assert row["verdict"] == (f"by more than 1 point: {more_than_1} (agreement), {more_than_1} (top-1); "
                              f"better at all: {at_all} (agreement), {at_all} (top-1)")
    assert "above 0 at 1 of 2 points (agreement), 1 (top-1)" in row["this book (ViT-Ti)"]


def test_spatial_equivalence_needs_the_margin():
    inside = claims.spatial_matches_tome_claim(_family(-0.6, 0.7), _family(-0.9, 0.2), margin=1.0)
    assert inside["verdict"] == "equivalent (agreement), equivalent (top-1)"
    wide = claims.spatial_matches_tome_claim(_family(-1.6, 0.7), _family(-0.9, 0.2), margin=1.0)
    assert wide["verdict"] == "not detectable (agreement), equivalent (top-1)"


def test_delay_claim_reads_the_equal_gmacs_table():
    tab = pd.DataFrame(dict(d_agreement=[0.0, 5.0, 1.0], d_agreement_lo=[0.0, 1.2, -2.0],
                            d_agreement_hi=[0.0, 9.2, 4.0], d_top1=[0.0, -2.0, 0.5],
                            d_top1_lo=[0.0, -4.8, -1.0], d_top1_hi=[0.0, 1.2, 2.0]), index=[0, 2, 4])
    row = claims.delay_claim(tab, d_paper=2, depth=12, d_measured=4)
    assert row["verdict"] == "supported (D = 2, agreement)"
    assert "agreement +5.0 [+1.2, +9.2], top-1 -2.0 [-4.8, +1.2]" in row["this book (ViT-Ti)"]
    assert row["paper"] == "D = depth/6 (2 of 12)"


def _features(rates: dict, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    u = rng.random(N)
    rows = [dict(feature=f, label=f.upper(), agreement=float((u < p).mean()), result=_result(u < p))
            for f, p in rates.items()]
    return pd.DataFrame(rows)


def test_feature_claim_holm_family():
    # nested rates on one uniform draw: K agrees wherever a worse feature does, so the paired
    # differences are all of one sign and large ones are detectable
    best = claims.feature_claim(_features(dict(k=0.9, q=0.6, v=0.5, x=0.4, random=0.1)), 300, 0)
    assert best["verdict"] == "supported"
    assert "K detectably better than: Q, V, X, RANDOM" in best["this book (ViT-Ti)"]
    close = claims.feature_claim(_features(dict(k=0.9, q=0.895, v=0.5, x=0.4, random=0.1)), 300, 0)
    assert close["verdict"] == "not detectable (K beats 3 of 4 detectably)"
    beaten = claims.feature_claim(_features(dict(k=0.5, q=0.9, v=0.4, x=0.3, random=0.1)), 300, 0)
    assert beaten["verdict"] == "contradicted (another feature is better)"


def test_holm_against_matches_stats():
    f = _features(dict(k=0.9, q=0.895, v=0.5))
    ref, others = f.result[0].agree, [x.agree for x in f.result[1:]]
    p = [stats.paired_pvalue(ref, x, 300, 0) for x in others]
    assert claims.holm_against(ref, others, 300, 0).tolist() == stats.holm(p)[1].tolist() == [False, True]


def test_local_blocks_claim():
    lb = _features(dict(a=0.80, b=0.80, c=0.80, d=0.80)).assign(local_blocks=[0, 1, 2, 3])
    row = claims.local_blocks_claim(lb, [0.0, 0.0, 0.0], 300, 0)
    assert row["verdict"] == "not detectable" and "0 of 3" in row["this book (ViT-Ti)"]
    lb = _features(dict(a=0.5, b=0.6, c=0.7, d=0.9)).assign(local_blocks=[0, 1, 2, 3])
    assert claims.local_blocks_claim(lb, [10.0, 20.0, 40.0], 300, 0)["verdict"] == "supported"
    lb = _features(dict(a=0.5, b=0.95, c=0.7, d=0.9)).assign(local_blocks=[0, 1, 2, 3])
    assert claims.local_blocks_claim(lb, [45.0, 20.0, 40.0], 300, 0)["verdict"] == "contradicted"


def test_reduction_claim_censored_is_a_bound():
    saving = dict(est=0.40, lo=0.30, hi=0.50, censored=True)
    row = claims.reduction_claim(saving, delay=2, max_reduction=2.4)
    assert "1.67x [1.43x, 2.00x] (a lower bound)" in row["this book (ViT-Ti)"]
    assert "more than 1.8x is bound" in row["verdict"]
    saving = dict(est=0.50, lo=0.46, hi=0.55, censored=False)  # reduction 1.85x..2.22x: all above 1.8
    assert "more than 1.8x is supported" in claims.reduction_claim(saving, 2, 2.4)["verdict"]


def test_matched_family_is_the_mean_of_matched_differences():
    rng = np.random.default_rng(3)
    truth = rng.random(60) < 0.8
    rows = [dict(label="dense", r=0, gmacs=1.0, result=_result(truth))]
    for label, rs, per in (("ToMe", [4, 8], 0.05), ("DSM", [8, 12], 0.03)):
        for r in rs:
            rows.append(dict(label=label, r=r, gmacs=1.0 - 0.03 * r, result=_result(truth & (rng.random(60) > per * r / 4))))
    sweeps = {"set": pd.DataFrame(rows)}
    fam = claims.matched_family(sweeps, "DSM", [8, 12], "agreement", 200, 0)
    kept, diffs = compare.matched_differences(sweeps, "DSM", [8, 12], "agreement")
    assert fam["rs"] == kept
    assert tuple(fam["mean"]) == tuple(stats.bootstrap_ci(diffs.mean(axis=1) * 100, 200, 0))
    np.testing.assert_array_equal(fam["band"].lo, stats.simultaneous_band(diffs * 100, 200, 0).lo)


def test_declared_range_follows_the_schedules_alone() -> None:
    """The confirmatory test's r grid: every point at most 1.8x fewer GMACs than dense, the next one beyond."""
    from dsm_lite.claims import PRIMARY, declared_rs
    from dsm_lite.schedules import ModelShape, plan
    import timm
    shape = ModelShape.from_model(timm.create_model("vit_tiny_patch16_224", pretrained=False))  # sizes only
    dense = plan(shape, "tome", 0).macs
    assert PRIMARY.photos == "ilsvrc2012-val" and PRIMARY.metric == "top1" and PRIMARY.level == 0.975
    for h, d in zip(PRIMARY.hypotheses, (2, 4)):
        rs = declared_rs(shape, h, d)
        assert rs[0] == 8 and np.all(np.diff(rs) == 4)
        macs = [plan(shape, "dsm", r, windows=h.windows, delay=d).macs for r in rs + [rs[-1] + 4]]
        assert all(m >= dense / 1.8 for m in macs[:-1]) and macs[-1] < dense / 1.8
