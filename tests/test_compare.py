"""dsm_lite.compare against chapter 5's own definitions (book/05_delayed_spatial_merging.ipynb,
copied below as the reference), on synthetic sweep tables: the package must reproduce every
float the chapter computes, exactly."""
from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest

from dsm_lite import compare
from dsm_lite import stats
from dsm_lite.evaluation import EvalResult
from dsm_lite.stats import bootstrap_indices, simultaneous_band

N_BOOT, SEED = 200, 0
R_BASE = [4, 8, 12, 16]
R_DSM = [8, 12, 16, 20, 24]

# Chapter 5's code cells (ids 2c2460a4, afec357e, f4431073, ba19640f), definitions verbatim;
# the driver loops keep the computing lines and drop glue() and print().
NOTEBOOK = '''
ATTR = {"top1": "correct1", "agreement": "agree"}

def curve(df, label):
    # One method's points, the dense model as its r = 0 end, sorted by GMACs.
    return pd.concat([df[df.label == "dense"], df[df.label == label]]).sort_values("gmacs")

def at_gmacs(pts, g, metric):
    # Per-photo values interpolated linearly in GMACs between two points (None outside).
    x = pts.gmacs.to_numpy()
    if not x[0] - 1e-9 <= g <= x[-1] + 1e-9:
        return None
    i = int(np.clip(np.searchsorted(x, g), 1, len(x) - 1))
    a, b = pts.iloc[i - 1], pts.iloc[i]
    w = (g - a.gmacs) / (b.gmacs - a.gmacs)
    return (1 - w) * getattr(a.result, ATTR[metric]) + w * getattr(b.result, ATTR[metric])

def pooled(label_or_pts, metric, g=None, r=None):
    # Per-photo values of one point (by r) or an interpolated GMACs, both sets concatenated.
    out = []
    for name, df in sweeps.items():
        if g is None:
            out.append(getattr(df[(df.label == label_or_pts) & (df.r == r)].iloc[0].result, ATTR[metric]))
        else:
            out.append(at_gmacs(curve(df, label_or_pts), g, metric))
    return None if any(o is None for o in out) else np.concatenate(out).astype(float)

rows = []
for label, rs in (("DSM", R_DSM), ("spatial", R_BASE)):
    for r in rs:
        g = float(sweeps["imagenet-sample"].query("label == @label and r == @r").gmacs.iloc[0])
        for metric in ATTR:
            base = pooled("ToMe", metric, g=g)
            if base is None:
                continue
            d = stats.paired_bootstrap(pooled(label, metric, r=r), base, N_BOOT, SEED)
            rows.append(dict(method=label, r=r, gmacs=g, metric=metric, diff=d.estimate, lo=d.lo, hi=d.hi))
eq = pd.DataFrame(rows)

def saved_within(label, metric, drop=0.01, idx=None):
    # Share of dense GMACs saved where `metric` first falls `drop` below dense (pooled photos).
    pts = curve(sweeps["imagenet-sample"], label).sort_values("gmacs", ascending=False)
    vals = np.stack([pooled(l, metric, r=r) for l, r in zip(pts.label, pts.r)])
    m = vals.mean(1) if idx is None else vals[:, idx].mean(-1)   # (points,) or (points, boot)
    g = pts.gmacs.to_numpy()
    m = m if m.ndim == 2 else m[:, None]
    thr = m[0] - drop
    out = np.full(m.shape[1], g[-1])
    for j in range(m.shape[1]):
        below = np.nonzero(m[:, j] < thr[j])[0]
        if len(below):
            k = below[0]
            w = (m[k - 1, j] - thr[j]) / (m[k - 1, j] - m[k, j])
            out[j] = g[k - 1] + w * (g[k] - g[k - 1])
    return 1 - out / g[0], bool(len(np.nonzero(vals.mean(1) < vals.mean(1)[0] - drop)[0]) == 0)

rng = np.random.default_rng(SEED)
n_pool = sum(len(s) for s in sets.values())
boot_idx = rng.integers(0, n_pool, size=(N_BOOT, n_pool))
saved = {}
for label in ("ToMe", "spatial", "DSM"):
    for metric in ATTR:
        est, censored = saved_within(label, metric)
        bs, _ = saved_within(label, metric, idx=boot_idx)
        lo, hi = np.quantile(bs, [0.025, 0.975])
        saved[label, metric] = dict(est=float(est[0]), lo=float(lo), hi=float(hi), censored=censored)

def vs(df, ref_mask, metric="agreement"):
    # Paired difference of every row to the reference row, in percentage points.
    ref = getattr(df[ref_mask].iloc[0].result, ATTR[metric])
    ds = [stats.paired_bootstrap(getattr(x, ATTR[metric]), ref, N_BOOT, SEED) for x in df.result]
    return pd.DataFrame({f"d_{metric}": [d.estimate * 100 for d in ds], "lo": [d.lo * 100 for d in ds],
                         "hi": [d.hi * 100 for d in ds]}, index=df.index)

feat = sweeps["imagenet-sample"][sweeps["imagenet-sample"].label == "DSM"]
feat_vs = pd.concat([vs(feat, feat.r == 16, m).add_prefix(m[:3] + "_") for m in ATTR], axis=1)

mvp_rows = []
tab = sweeps["imagenet-sample"]
a = tab[(tab.label == "DSM") & (tab.r == 12)].iloc[0]
b = tab[(tab.label == "ToMe") & (tab.r == 8)].iloc[0]
row = dict()
for m in ATTR:
    d = stats.paired_bootstrap(getattr(a.result, ATTR[m]), getattr(b.result, ATTR[m]), N_BOOT, SEED)
    row.update({f"d_{m}": d.estimate * 100, f"d_{m}_lo": d.lo * 100, f"d_{m}_hi": d.hi * 100})
'''


def _result(correct: np.ndarray, agree: np.ndarray) -> EvalResult:
    n = len(correct)
    return EvalResult(pred=np.zeros(n, np.int64), top5=np.zeros((n, 5), np.int64), correct1=correct,
                      correct5=correct | agree, agree=agree, kl=np.zeros(n))


def _sweep(n: int, seed: int) -> pd.DataFrame:
    """A sweep table whose accuracy falls with GMACs: ToMe and DSM by several points over their
    range, spatial by less than a point (so its saving is censored)."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.8
    u = rng.random(n)
    rows = [dict(label="dense", r=0, gmacs=1.258, result=_result(truth, np.ones(n, bool)))]
    for label, rs, per_r, noise, gmacs_per_r in (("ToMe", R_BASE, 0.012, 0.01, 0.045),
                                                 ("spatial", R_BASE, 0.0005, 0.0, 0.0445),
                                                 ("DSM", R_DSM, 0.008, 0.01, 0.035)):
        for r in rs:
            lost = (u < per_r * r + 2 * noise * rng.random()) | (rng.random(n) < noise)
            rows.append(dict(label=label, r=r, gmacs=1.258 - gmacs_per_r * r,
                             result=_result(truth & ~lost, ~lost)))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def sweeps():
    return {"imagenet-sample": _sweep(60, 1), "imagenette-val": _sweep(45, 2)}


@pytest.fixture(scope="module")
def nb(sweeps):
    # the chapter's code called evaluation.paired_bootstrap, a NumPy front to stats.paired_bootstrap
    ev = types.SimpleNamespace(paired_bootstrap=stats.paired_bootstrap)
    space = dict(np=np, pd=pd, ev=ev, stats=stats, sweeps=sweeps, N_BOOT=N_BOOT, SEED=SEED, R_DSM=R_DSM, R_BASE=R_BASE,
                 sets={k: range(len(df.result.iloc[0])) for k, df in sweeps.items()})
    exec(compile(NOTEBOOK, "chapter-5-reference", "exec"), space)
    return space


def test_curve_at_gmacs_pooled(sweeps, nb):
    for df in sweeps.values():
        for label in ("ToMe", "DSM"):
            pd.testing.assert_frame_equal(compare.curve(df, label), nb["curve"](df, label))
            pts = compare.curve(df, label)
            for g in (1.258, 1.0, 0.9, 0.5, 2.0, float(pts.gmacs.iloc[2])):
                for metric in ("top1", "agreement"):
                    ours, theirs = compare.at_gmacs(pts, g, metric), nb["at_gmacs"](pts, g, metric)
                    assert (ours is None) == (theirs is None)
                    assert ours is None or np.array_equal(ours, theirs)
    for metric in ("top1", "agreement"):
        assert np.array_equal(compare.pooled(sweeps, "DSM", metric, r=16), nb["pooled"]("DSM", metric, r=16))
        assert np.array_equal(compare.pooled(sweeps, "ToMe", metric, g=0.95), nb["pooled"]("ToMe", metric, g=0.95))
        assert compare.pooled(sweeps, "ToMe", metric, g=0.4) is None


def test_at_gmacs_interpolates_linearly(sweeps):
    pts = compare.curve(sweeps["imagenet-sample"], "ToMe")
    a, b = pts.iloc[1], pts.iloc[2]
    mid = compare.at_gmacs(pts, (a.gmacs + b.gmacs) / 2, "top1")
    np.testing.assert_allclose(mid, (a.result.correct1 + b.result.correct1.astype(float)) / 2, atol=1e-12)
    assert np.array_equal(compare.at_gmacs(pts, float(a.gmacs), "top1"), a.result.correct1.astype(float))


def test_equal_gmacs_table(sweeps, nb):
    ours = compare.equal_gmacs(sweeps, {"DSM": R_DSM, "spatial": R_BASE}, n_boot=N_BOOT, seed=SEED)
    pd.testing.assert_frame_equal(ours, nb["eq"], check_exact=True)
    assert set(ours[ours.method == "DSM"].r) < set(R_DSM)  # DSM points beyond ToMe's curve are skipped


def test_matched_differences_feed_a_simultaneous_band(sweeps, nb):
    rs, d = compare.matched_differences(sweeps, "DSM", R_DSM, "agreement")
    eq = nb["eq"]
    sel = eq[(eq.method == "DSM") & (eq.metric == "agreement")]
    assert rs.tolist() == sel.r.tolist() and d.shape == (105, len(rs))
    np.testing.assert_allclose(d.mean(0), sel["diff"], atol=1e-12)
    band = simultaneous_band(d, N_BOOT, SEED)
    assert np.all(band.hi - band.lo > (sel.hi - sel.lo).to_numpy())  # the family's intervals are wider


def test_saved_within(sweeps, nb):
    idx = bootstrap_indices(105, N_BOOT, SEED)
    for label in ("ToMe", "spatial", "DSM"):
        for metric in ("top1", "agreement"):
            est, censored = compare.saved_within(sweeps, label, metric)
            ref_est, ref_censored = nb["saved_within"](label, metric)
            assert np.array_equal(est, ref_est) and censored == ref_censored
            assert np.array_equal(compare.saved_within(sweeps, label, metric, idx=idx)[0],
                                  nb["saved_within"](label, metric, idx=idx)[0])
            assert compare.saved_within_ci(sweeps, label, metric, n_boot=N_BOOT, seed=SEED) == nb["saved"][label, metric]
    assert nb["saved"]["spatial", "top1"]["censored"] and not nb["saved"]["ToMe", "top1"]["censored"]
    with pytest.raises(ValueError, match="drop"):
        compare.saved_within(sweeps, "ToMe", "top1", drop=0)


def test_saved_within_hand_made():
    """Dense 1.0 at 10 GMACs; 0.995 at 8; 0.98 at 6: a 1-point drop is crossed a third of the way
    from 8 to 6 GMACs (0.995 - 0.99 = 0.005 of the 0.015 fall), at 7.333 GMACs: 26.67% saved."""
    ones = np.ones(200, bool)
    def result(k):  # k photos wrong
        c = ones.copy()
        c[:k] = False
        return _result(c, c)
    df = pd.DataFrame([dict(label="dense", r=0, gmacs=10.0, result=result(0)),
                       dict(label="M", r=1, gmacs=8.0, result=result(1)),
                       dict(label="M", r=2, gmacs=6.0, result=result(4))])
    est, censored = compare.saved_within({"s": df}, "M", "top1")
    assert est[0] == pytest.approx(1 - (8 - 2 * (0.005 / 0.015)) / 10) and not censored
    est, censored = compare.saved_within({"s": df}, "M", "top1", drop=0.05)
    assert est[0] == pytest.approx(0.4) and censored  # never 5 points below: the last point, a bound


def test_vs_and_paired_columns(sweeps, nb):
    feat = nb["feat"]
    ours = pd.concat([compare.vs(feat, feat.r == 16, m, N_BOOT, SEED).add_prefix(m[:3] + "_")
                      for m in ("top1", "agreement")], axis=1)
    pd.testing.assert_frame_equal(ours, nb["feat_vs"], check_exact=True)
    assert ours.loc[feat.r == 16].abs().to_numpy().max() == 0  # the reference minus itself
    assert compare.paired_columns(nb["a"].result, nb["b"].result, n_boot=N_BOOT, seed=SEED) == nb["row"]


def test_bad_metric_and_missing_row(sweeps):
    with pytest.raises(ValueError, match="metric"):
        sweeps["imagenet-sample"].result.iloc[0].per_photo("accuracy")
    with pytest.raises(KeyError, match="r = 99"):
        compare.pooled(sweeps, "ToMe", "top1", r=99)


def test_saved_difference_is_paired(sweeps):
    same = compare.saved_difference_ci(sweeps, "ToMe", "ToMe", "top1", n_boot=N_BOOT, seed=SEED)
    assert (same["est"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)  # one method against itself: exactly 0
    d = compare.saved_difference_ci(sweeps, "DSM", "ToMe", "top1", n_boot=N_BOOT, seed=SEED)
    a = compare.saved_within_ci(sweeps, "DSM", "top1", n_boot=N_BOOT, seed=SEED)
    b = compare.saved_within_ci(sweeps, "ToMe", "top1", n_boot=N_BOOT, seed=SEED)
    assert d["est"] == pytest.approx(a["est"] - b["est"], abs=1e-12)
    assert (d["censored_label"], d["censored_ref"]) == (a["censored"], b["censored"])
    # the reference: each resample walks both curves on the same photos
    n = sum(len(df.result.iloc[0]) for df in sweeps.values())
    idx = bootstrap_indices(n, N_BOOT, SEED)
    boot = np.array([compare.saved_within(sweeps, "DSM", "top1", idx=idx[i:i + 1])[0][0]
                     - compare.saved_within(sweeps, "ToMe", "top1", idx=idx[i:i + 1])[0][0] for i in range(N_BOOT)])
    assert (d["lo"], d["hi"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert d["lo"] <= d["est"] <= d["hi"]
