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


def _curves(n: int, shift: dict, seed: int = 0) -> dict:
    """One photo set: dense, ToMe losing photos as GMACs fall, and each hypothesis' DSM curve,
    which is ToMe at the same GMACs with ``shift[name]`` of the photos flipped to correct."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.8
    u = rng.random(n)

    def res(correct):
        return EvalResult(np.zeros(n, np.int64), np.zeros((n, 5), np.int64), correct, correct, correct, np.zeros(n))

    rows = [dict(label="dense", r=0, gmacs=1.0, result=res(truth))]
    for r in (4, 8, 12, 16, 20):
        rows.append(dict(label="ToMe", r=r, gmacs=1.0 - 0.04 * r, result=res(truth & (u > 0.01 * r))))
    for name, s in shift.items():
        for r in (8, 16):  # exactly on ToMe's points, so the interpolation is exact
            base = truth & (u > 0.01 * r)
            flip = (~base) & (rng.random(n) < s)
            rows.append(dict(label=name, r=r, gmacs=1.0 - 0.04 * r, result=res(base | flip)))
    return {"unseen": pd.DataFrame(rows)}


def test_confirm_follows_the_declared_rule():
    spec = claims.PRIMARY
    h1, h2 = (h.name for h in spec.hypotheses)
    sweeps = _curves(3000, {h1: 0.0, h2: 0.5})
    out = claims.confirm(sweeps, {h1: [8, 16], h2: [8, 16]}, spec).set_index("hypothesis")
    # the estimate by hand: the mean over the two points of the per-photo difference, in points
    t = sweeps["unseen"]
    for h in (h1, h2):
        d = np.mean([t[(t.label == h) & (t.r == r)].result.iloc[0].correct1.astype(float)
                     - t[(t.label == "ToMe") & (t.r == r)].result.iloc[0].correct1 for r in (8, 16)], axis=0) * 100
        assert out.loc[h, "estimate"] == pytest.approx(d.mean(), abs=1e-9)
        assert out.loc[h, "lo"] <= out.loc[h, "lo95"] <= out.loc[h, "hi95"] <= out.loc[h, "hi"]  # 97.5% is wider
    assert out.loc[h1, "estimate"] == 0 and not out.loc[h1, "detected"]
    assert out.loc[h1, "relation"] == "equivalent within +-1 point" and out.loc[h1, "claim_verdict"] == "contradicted"
    assert out.loc[h2, "detected"] and out.loc[h2, "estimate"] > 1 and out.loc[h2, "claim_verdict"] == "supported"
    assert out.loc[h2, "relation"] == "DSM better"
    assert out.p_holm.tolist() == pytest.approx(stats.holm(out.p.to_numpy())[0].tolist())
    beyond = dict(t[t.label == h1].iloc[0], r=30, gmacs=0.1)  # fewer GMACs than ToMe's last point
    sweeps["unseen"] = pd.concat([t, pd.DataFrame([beyond])], ignore_index=True)
    with pytest.raises(ValueError, match="outside ToMe's curve"):
        claims.confirm(sweeps, {h1: [8, 16, 30], h2: [8]}, spec)


def test_every_claim_of_the_paper_has_one_row():
    rows = [claims.untestable(c.id, "paper", "something") for c in claims.PAPER_CLAIMS]
    t = claims.table(rows[::-1])  # any order in, the paper's order out
    assert list(t.columns) == list(claims.TABLE_COLUMNS) and len(t) == len(claims.PAPER_CLAIMS)
    assert t[claims.TABLE_COLUMNS[0]].iloc[0].startswith(claims.PAPER_CLAIMS[0].text)
    assert all(v == "not testable here: needs something" for v in t.verdict)
    assert set(t[claims.TABLE_COLUMNS[2]]) == set(t[claims.TABLE_COLUMNS[3]]) == {"-"}
    with pytest.raises(ValueError, match="missing \\['sinks'\\]"):
        claims.table(rows[1:])
    with pytest.raises(ValueError, match="twice \\['sinks'\\]"):
        claims.table(rows + rows[:1])
    # the ids are unique and every claim says where the paper makes it
    assert len({c.id for c in claims.PAPER_CLAIMS}) == len(claims.PAPER_CLAIMS)
    assert all(c.where and c.text for c in claims.PAPER_CLAIMS)


def test_chapter_5_table_has_every_claim():
    """The stored claims table of chapter 5 lists every claim of dsm_lite.claims.PAPER_CLAIMS, once."""
    import json
    from pathlib import Path
    nb = json.loads((Path(__file__).resolve().parents[1] / "book" / "05_delayed_spatial_merging.ipynb").read_text())
    html = [("".join(o["data"]["text/html"])) for c in nb["cells"] if c["cell_type"] == "code"
            for o in c.get("outputs", []) if "claims_df" in "".join(c["source"]) and "text/html" in o.get("data", {})]
    assert len(html) == 1
    import html as h
    text = h.unescape(html[0])
    for c in claims.PAPER_CLAIMS:
        assert text.count(f"{c.text} ({c.where})") == 1, c.id


def test_combine_prefers_the_unseen_verdict():
    train = claims._row("x", "p", "train evidence", "supported")
    unseen = claims._row("x", "p", "unseen evidence", "not detectable")
    row = claims.combine("delay", train, unseen)
    assert row["verdict"] == "not detectable" and row["id"] == "delay"
    assert row[claims.TABLE_COLUMNS[2]] == "train evidence -> supported"
    assert row[claims.TABLE_COLUMNS[3]] == "unseen evidence -> not detectable"
    assert claims.combine("delay", train)["verdict"] == "supported"
    joined = claims.join({"a": train, "b": unseen})
    assert joined["verdict"] == "supported (a); not detectable (b)"


def test_convergence_claim_reads_the_band():
    rng = np.random.default_rng(0)
    signs = np.array([-1, -1, 1, 1, 1, 1])
    delta = signs * 0.1 + 0.01 * rng.standard_normal((200, 6))
    assert claims.convergence_claim(delta, 2, 2, 300, 0)["verdict"] == "supported"
    assert claims.convergence_claim(delta, 3, 2, 300, 0)["verdict"] == "contradicted"  # block 2 is convergent
    assert claims.convergence_claim(delta * 0 + 0.01 * rng.standard_normal((200, 6)), 2, 2, 300, 0)["verdict"] \
        == "not detectable"


def test_sink_claim_is_about_orders_of_magnitude():
    median = np.full(50, 0.004)
    assert claims.sink_claim(median * 30, median, 7, 300, 0)["verdict"] == "supported"       # 30x the median
    assert claims.sink_claim(median * 3, median, 7, 300, 0)["verdict"] == "contradicted"     # 3x the median
    row = claims.sink_claim(median * 30, median, 7, 300, 0)
    assert "10^1.48" in row[claims.COLUMNS[2]] and "block 7" in row[claims.COLUMNS[2]]


def test_contiguity_claim_is_paired_and_skips_empty_photos():
    tome = np.array([0.5, 0.6, np.nan, 0.4] * 25)
    dsm = tome + 0.1
    assert claims.contiguity_claim(dsm, tome, 12, 8, 300, 0)["verdict"] == "supported"
    assert claims.contiguity_claim(tome, tome, 12, 8, 300, 0)["verdict"] == "not detectable"
    assert "+10.0 [+10.0, +10.0]" in claims.contiguity_claim(dsm, tome, 12, 8, 300, 0)[claims.COLUMNS[2]]
    assert "end with 48 and 101 tokens" in claims.contiguity_claim(dsm, tome, 12, 8, 300, 0, (48, 101))[claims.COLUMNS[2]]


def test_saved_within_claim_head_on():
    s = dict(est=0.26, lo=0.22, hi=0.29, censored=False)
    t = dict(est=0.19, lo=0.15, hi=0.25, censored=False)
    d = dict(est=0.07, lo=0.01, hi=0.12, censored_label=False, censored_ref=False)
    row = claims.saved_within_claim({("DSM", "top1"): s, ("ToMe", "top1"): t}, d)
    assert row["verdict"].endswith("DSM saves more than ToMe: supported")
    assert "+7.0 [+1.0, +12.0] points of dense" in row[claims.COLUMNS[2]]
    censored = dict(d, lo=-0.02, censored_ref=True)
    assert claims.saved_within_claim({("DSM", "top1"): s, ("ToMe", "top1"): t}, censored)["verdict"].endswith("bound")


def test_local_blocks_claim_reports_top1():
    lb = _features(dict(a=0.9, b=0.9, c=0.9, d=0.5)).assign(local_blocks=[0, 1, 2, 3])
    row = claims.local_blocks_claim(lb, [0.0, 0.0, 0.0, -40.0], 300, 0, top1=[0.0, 0.0, 0.0, -40.0])
    assert row["verdict"] == "contradicted in top-1 (3 local blocks detectably worse than 0)"
    assert "Holm-corrected worse: 3" in row["this book (ViT-Ti)"]
    same = _features(dict(a=0.9, b=0.9, c=0.9, d=0.9)).assign(local_blocks=[0, 1, 2, 3])
    assert claims.local_blocks_claim(same, [0.0] * 4, 300, 0, top1=[0.0] * 4)["verdict"] == "not detectable (agreement)"


def test_beside_gives_half_widths():
    t = claims.beside({"a": (BootstrapCI(1.0, 0.5, 1.5), (-0.2, -1.2, 0.8)), "b": (None, BootstrapCI(0.0, -0.3, 0.3))})
    assert t.iloc[0].tolist() == ["a", "+1.0 [+0.5, +1.5]", "0.5", "-0.2 [-1.2, +0.8]", "1.0"]
    assert t.iloc[1].tolist() == ["b", "-", "-", "+0.0 [-0.3, +0.3]", "0.3"]
