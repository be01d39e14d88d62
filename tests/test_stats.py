"""dsm_lite.stats against deliberately simple references (Python loops over resamples with the
same generator calls, quantiles from their definition, Wilson from its score equation),
published values, seeded coverage simulations, and the exact floats the notebooks were
computed with before the statistics moved here."""
from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from dsm_lite import stats
from dsm_lite.stats import verdict
from stats_cases import calls

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- references
def quantile7(values, q: float) -> float:
    """Hyndman and Fan's type 7 quantile (NumPy's and torch's default), from its definition."""
    s = sorted(values)
    h = (len(s) - 1) * q
    j = math.floor(h)
    upper = s[min(j + 1, len(s) - 1)]
    return s[j] + (h - j) * (upper - s[j])


def loop_draws(n: int, n_boot: int, seed: int, stream: str):
    """The package's draws (one (B, N) call to the seeded generator), as Python lists."""
    if stream == "torch":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, n, (n_boot, n), generator=g).tolist()
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n)).tolist()


def mean(values) -> float:
    return sum(values) / len(values)


def loop_bootstrap(x, n_boot, seed, level, stream="numpy", stat=mean):
    """(estimate, lo, hi) of ``stat`` of a list, one resample at a time."""
    draws = loop_draws(len(x), n_boot, seed, stream)
    boot = [stat([x[i] for i in row]) for row in draws]
    a = (1 - level) / 2
    return stat(x), quantile7(boot, a), quantile7(boot, 1 - a)


def loop_paired(a, b, n_boot, seed, level, stat=mean):
    draws = loop_draws(len(a), n_boot, seed, "numpy")
    boot = [stat([a[i] for i in row]) - stat([b[i] for i in row]) for row in draws]
    al = (1 - level) / 2
    return stat(a) - stat(b), quantile7(boot, al), quantile7(boot, 1 - al)


def median(values) -> float:
    s, n = sorted(values), len(values)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def close(got, want, tol=1e-10):
    assert np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=tol, atol=tol), (got, want)


# --------------------------------------------------------------------------- the book's numbers
def test_book_calls_match_the_pre_refactor_outputs_exactly():
    """Every statistics call the notebooks make returns the very floats it returned before the
    move to dsm_lite.stats (same draws, same quantile method, same arithmetic)."""
    golden = json.loads((HERE / "data" / "stats_golden.json").read_text())
    now = calls()
    assert now.keys() == golden.keys()
    assert [k for k in golden if now[k] != golden[k]] == []


# --------------------------------------------------------------------------- bootstrap
@pytest.mark.parametrize("seed", [0, 4])
def test_bootstrap_ci_numpy_matches_loop(seed):
    x = list(np.random.default_rng(seed).exponential(size=37))
    ci = stats.bootstrap_ci(np.array(x), 300, seed, 0.9)
    assert all(isinstance(v, float) for v in ci)
    close(tuple(ci), loop_bootstrap(x, 300, seed, 0.9))
    med = stats.bootstrap_ci(np.array(x), 300, seed, stat=np.median)
    close(tuple(med), loop_bootstrap(x, 300, seed, 0.95, stat=median))


def test_bootstrap_ci_tensor_matches_loop_per_column():
    v = torch.rand(25, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    ci = stats.bootstrap_ci(v, 200, 2)
    assert all(t.dtype == torch.float64 and t.shape == (3,) and t.device == v.device for t in ci)
    for j in range(3):
        col = v[:, j].double().tolist()
        close([float(t[j]) for t in ci], loop_bootstrap(col, 200, 2, 0.95, stream="torch"))
    rows = stats.bootstrap_ci(v.T, 200, 2, dim=1)  # photos along dim 1: the same intervals
    for a, b in zip(rows, ci):
        assert torch.equal(a, b)


def test_bootstrap_ci_numpy_2d_matches_loop_per_column():
    x = np.random.default_rng(3).normal(size=(30, 2))
    ci = stats.bootstrap_ci(x, 150, 1)
    assert all(v.shape == (2,) for v in ci)
    # columns share the draws: each equals the loop over that column with the same draws
    for j in range(2):
        close([v[j] for v in ci], loop_bootstrap(list(x[:, j]), 150, 1, 0.95))


def test_paired_bootstrap_matches_loop_and_is_zero_for_identical():
    rng = np.random.default_rng(5)
    a, b = rng.random(60) < 0.7, rng.random(60) < 0.6
    ci = stats.paired_bootstrap(a, b, 400, 9, 0.9)
    close(tuple(ci), loop_paired(list(a.astype(float)), list(b.astype(float)), 400, 9, 0.9))
    x = rng.normal(size=60)
    med = stats.paired_bootstrap(x, x ** 2, 300, 1, stat=np.median)
    close(tuple(med), loop_paired(list(x), list(x ** 2), 300, 1, 0.95, stat=median))
    same = stats.paired_bootstrap(x, x.copy())
    assert tuple(same) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_paired_pvalue_counts_resamples_and_agrees_with_the_interval():
    rng = np.random.default_rng(6)
    base = rng.normal(size=120)
    for shift, seed in ((0.0, 1), (0.05, 2), (0.4, 3), (-0.3, 4)):
        a = base + shift + 0.5 * rng.normal(size=120)
        draws = loop_draws(120, 1000, seed, "numpy")
        d = [mean([a[i] for i in row]) - mean([base[i] for i in row]) for row in draws]
        want = min(1.0, 2 * min(sum(v <= 0 for v in d), sum(v >= 0 for v in d)) / 1000)
        p = stats.paired_pvalue(a, base, 1000, seed)
        assert p == pytest.approx(want, abs=1e-12)
        ci = stats.paired_bootstrap(a, base, 1000, seed)
        if abs(p - 0.05) > 0.01:  # away from the boundary the two must agree
            assert (p < 0.05) == ci.excludes_zero
    assert stats.paired_pvalue(base, base.copy()) == 1.0
    two = np.stack([base + 1, base], axis=1)  # one p per column, from the same draws
    assert stats.paired_pvalue(two, np.zeros_like(two), 200, 0).tolist() == [
        stats.paired_pvalue(two[:, j], np.zeros(120), 200, 0) for j in range(2)]
    t = torch.from_numpy(base)
    p = stats.paired_pvalue(t + 10, t, 200, 0)
    assert isinstance(p, torch.Tensor) and float(p) == 0.0


def test_bootstrap_indices_streams():
    np_idx = stats.bootstrap_indices(9, 4, 3)
    assert np_idx.shape == (4, 9) and np.array_equal(np_idx, np.random.default_rng(3).integers(0, 9, (4, 9)))
    t_idx = stats.bootstrap_indices(9, 4, 3, like=torch.zeros(1))
    assert torch.equal(t_idx, torch.randint(0, 9, (4, 9), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="n > 0"):
        stats.bootstrap_indices(0, 4)


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="at least one photo"):
        stats.bootstrap_ci(np.array([]))
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci(np.ones(5), level=1.5)
    with pytest.raises(ValueError, match="only the mean"):
        stats.bootstrap_ci(torch.ones(5), stat=np.median)
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_bootstrap(np.ones(5), np.ones(6))


# --------------------------------------------------------------------------- Wilson, normal quantile
# Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (score interval), 95%
NEWCOMBE = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0, 0.1611)),
            ((1, 29), (0.0061, 0.1718)), ((8, 10), (0.4902, 0.9433))]


@pytest.mark.parametrize("counts, published", NEWCOMBE)
def test_wilson_published_values(counts, published):
    ci = stats.wilson_ci(*counts)
    assert ci.estimate == counts[0] / counts[1]
    assert (round(ci.lo, 4), round(ci.hi, 4)) == published


@pytest.mark.parametrize("s, n, level", [(8, 10, 0.95), (3, 7, 0.99), (120, 400, 0.9), (1, 1000, 0.5)])
def test_wilson_endpoints_solve_the_score_equation(s, n, level):
    """The Wilson interval is {p0 : |s/n - p0| <= z sqrt(p0 (1 - p0) / n)}: its ends make it an equality."""
    ci = stats.wilson_ci(s, n, level)
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = s / n
    for p0 in (ci.lo, ci.hi):
        assert abs(p - p0) == pytest.approx(z * math.sqrt(p0 * (1 - p0) / n), abs=1e-12)
    inside, outside = (ci.lo + ci.hi) / 2, ci.hi + 1e-3
    assert abs(p - inside) < z * math.sqrt(inside * (1 - inside) / n)
    assert abs(p - outside) > z * math.sqrt(outside * (1 - outside) / n)


def test_wilson_ends_and_array_input():
    assert stats.wilson_ci(0, 20).lo == 0.0 and stats.wilson_ci(20, 20).hi == 1.0
    assert tuple(stats.wilson_ci(np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1]))) == tuple(stats.wilson_ci(8, 10))
    with pytest.raises(ValueError, match="positive"):
        stats.wilson_ci(0, 0)


def test_normal_quantile():
    assert stats.normal_quantile(0.975) == pytest.approx(1.959963984540054, abs=1e-15)
    for q in (0.6, 0.9, 0.995):
        z = stats.normal_quantile(q)
        assert 0.5 * (1 + math.erf(z / math.sqrt(2))) == pytest.approx(q, abs=1e-15)
        assert stats.normal_quantile(1 - q) == pytest.approx(-z, abs=1e-12)


# --------------------------------------------------------------------------- percentile band
def test_percentile_band_matches_definition_tensor_and_array():
    v = torch.rand(17, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for values in (v, v.numpy()):
        med, lo, hi = stats.percentile_band(values, 10, 90)
        for j in range(3):
            col = v[:, j].tolist()
            close([float(med[j]), float(lo[j]), float(hi[j])],
                  [quantile7(col, 0.5), quantile7(col, 0.1), quantile7(col, 0.9)])
    med, _, _ = stats.percentile_band(v, dim=1)
    close(med, [quantile7(row, 0.5) for row in v.tolist()])


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_percentile_band_ignores_nan_per_column():
    a = np.random.default_rng(4).random((20, 3))
    a[::2, 0] = np.nan
    a[:, 2] = np.nan
    for values in (a, torch.from_numpy(a)):
        med, lo, hi = stats.percentile_band(values, 25, 75, ignore_nan=True)
        kept = [x for x in a[:, 0] if not math.isnan(x)]
        close([float(med[0]), float(lo[0]), float(hi[0])],
              [quantile7(kept, 0.5), quantile7(kept, 0.25), quantile7(kept, 0.75)])
        close(float(med[1]), quantile7(list(a[:, 1]), 0.5))
        assert math.isnan(float(med[2]))
    assert np.isnan(stats.percentile_band(a)[0][0])  # without ignore_nan, NaN propagates


# --------------------------------------------------------------------------- Holm
def holm_loop(p, alpha):
    """The textbook step-down: reject the smallest p-values while p_(i) <= alpha / (k - i + 1)."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    reject = [False] * len(p)
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        reject[i] = True
    return reject


def test_holm_known_case():
    adjusted, reject = stats.holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.02, 0.03, 0.06, 0.06
    close(adjusted, [0.03, 0.06, 0.06, 0.02], tol=1e-15)
    assert reject.tolist() == [True, False, False, True]
    adjusted, reject = stats.holm([0.2])
    assert adjusted.tolist() == [0.2] and reject.tolist() == [False]
    assert stats.holm([0.5, 0.9])[0].tolist() == [1.0, 1.0]  # capped at 1


def test_holm_matches_the_step_down_loop():
    rng = np.random.default_rng(8)
    for _ in range(200):
        k = int(rng.integers(1, 9))
        p = rng.random(k) ** 3
        if rng.random() < 0.3:
            p[rng.integers(0, k)] = p[0]  # ties
        for alpha in (0.05, 0.1):
            assert stats.holm(p, alpha)[1].tolist() == holm_loop(list(p), alpha)


def test_holm_bad_input():
    for bad in ([], [0.1, 1.2], [np.nan], [[0.1]]):
        with pytest.raises(ValueError, match="pvalues"):
            stats.holm(bad)


# --------------------------------------------------------------------------- simultaneous band
def test_simultaneous_band_invariants():
    rng = np.random.default_rng(9)
    col = rng.normal(size=(80, 1))
    one = stats.simultaneous_band(col, 500, 1)
    dup = stats.simultaneous_band(np.hstack([col, col, col]), 500, 1)  # one comparison, three times
    close(dup.lo, np.repeat(one.lo, 3), tol=1e-12)
    close(dup.hi, np.repeat(one.hi, 3), tol=1e-12)
    const = stats.simultaneous_band(np.hstack([col, np.full((80, 1), 0.25)]), 500, 1)
    assert const.lo[1] == const.hi[1] == 0.25
    close([const.lo[0], const.hi[0]], [one.lo[0], one.hi[0]], tol=1e-12)
    five = rng.normal(size=(80, 5))
    band = stats.simultaneous_band(five, 500, 1)
    close(band.estimate, five.mean(0), tol=1e-12)
    for j in range(5):  # wider than each comparison's own 95% interval, which ignores the family
        own = stats.bootstrap_ci(five[:, j], 500, 1)
        assert band.hi[j] - band.lo[j] > own.hi - own.lo
    with pytest.raises(ValueError, match="photos >= 2"):
        stats.simultaneous_band(np.ones(5))


def test_simultaneous_band_covers_all_means_together():
    """Seeded simulation: 6 independent comparisons with known means, 200 photos of heavy-tailed
    differences. The band covers all six at once about 95% of the time (0.94 to 0.95 in 1000
    repetitions at 300 photos; 0.92 to 0.93 at 80, as a single percentile interval's 0.94 there);
    six separate 95% intervals do so far less often (about 0.95^6 = 0.74)."""
    rng = np.random.default_rng(10)
    reps, n, k = 300, 200, 6
    truth = np.linspace(-0.2, 0.3, k)
    together = separate = 0
    for i in range(reps):
        d = truth + rng.standard_t(5, size=(n, k))
        band = stats.simultaneous_band(d, 300, i)
        together += bool(np.all((band.lo <= truth) & (truth <= band.hi)))
        own = [stats.bootstrap_ci(d[:, j], 300, i) for j in range(k)]
        separate += all(c.lo <= t <= c.hi for c, t in zip(own, truth))
    assert 0.91 <= together / reps <= 0.99
    assert separate / reps < 0.85


# --------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("lo, hi, kw, want", [
    (0.2, 1.5, {}, "supported"),
    (-1.5, -0.2, {}, "contradicted"),
    (-1.5, -0.2, dict(direction=-1), "supported"),
    (0.2, 1.5, dict(direction=-1), "contradicted"),
    (-0.4, 0.6, {}, "not detectable"),                       # no margin: never equivalent
    (-0.4, 0.6, dict(margin=1.0), "equivalent"),
    (-1.4, 0.6, dict(margin=1.0), "not detectable"),         # too wide to be equivalent
    (0.0, 0.8, {}, "not detectable"),                        # touching 0 is not excluding it
    (-0.8, 0.0, {}, "not detectable"),
    (-0.5, 1.0, dict(margin=1.0), "not detectable"),         # touching the margin is not inside it
    (-1.0, 0.5, dict(margin=1.0), "not detectable"),
    (-0.999, 0.999, dict(margin=1.0), "equivalent"),
    (0.1, 0.5, dict(margin=1.0), "supported"),               # a detected sign wins over equivalence
    (-0.5, -0.1, dict(margin=1.0), "contradicted"),
    (0.3, 2.0, dict(threshold=1.0), "not detectable"),       # claim: more than 1 point
    (1.1, 2.0, dict(threshold=1.0), "supported"),
    (0.1, 0.9, dict(threshold=1.0), "contradicted"),         # detectably positive, detectably below 1
    (-2.0, -1.1, dict(direction=-1, threshold=1.0), "supported"),
    (0.2, 1.5, dict(censored=True), "supported"),            # a bound beyond the claim still supports it
    (-1.5, -0.2, dict(censored=True), "bound"),              # the truth may lie further up: undecided
    (-0.4, 0.6, dict(censored=True, margin=1.0), "bound"),
    (0.0, 0.0, dict(margin=1.0), "equivalent"),
])
def test_verdict_rules(lo, hi, kw, want):
    assert verdict(lo, hi, **kw) == want


def test_verdict_bad_input():
    for args, kw in (((1.0, 0.0), {}), ((np.nan, 1.0), {}), ((0.0, 1.0), dict(direction=0)),
                     ((0.0, 1.0), dict(margin=0.0)), ((0.0, 1.0), dict(threshold=-1.0))):
        with pytest.raises(ValueError):
            verdict(*args, **kw)


def test_verdicts_from_synthetic_photos():
    """Per-photo differences with known effects, through the paired bootstrap, reach the right verdict."""
    rng = np.random.default_rng(11)
    base = rng.random(2000) < 0.7
    flips = rng.random(2000)

    def method(gain):  # a copy of `base` with a net gain of about `gain` (a share)
        out = base.copy()
        if gain > 0:
            out[(flips < gain * 2) & ~base] = True
        else:
            out[(flips < -gain * 1.5) & base] = False
        return out

    def judge(a, b, **kw):
        ci = stats.paired_bootstrap(a, b, 1000, 0)
        return verdict(ci.lo * 100, ci.hi * 100, **kw)  # in percentage points

    assert judge(method(0.05), base) == "supported"
    assert judge(method(-0.05), base) == "contradicted"
    assert judge(method(0.0), base, margin=1.0) == "equivalent"                  # identical
    few = base[:300]
    noisy = few.copy()  # 15 photos won and 15 lost: no net effect, an interval of about +-2.5 points
    noisy[np.nonzero(few)[0][:15]] = False
    noisy[np.nonzero(~few)[0][:15]] = True
    assert judge(noisy, few, margin=1.0) == "not detectable"
    assert judge(noisy, few) == "not detectable"
    assert judge(noisy, few, margin=5.0) == "equivalent"


# --------------------------------------------------------------------------- behaviour on synthetic photos
def test_paired_bootstrap_identical_is_zero():
    a = np.random.default_rng(0).random(100) > 0.3
    ci = stats.paired_bootstrap(a, a.copy())
    assert (ci.estimate, ci.lo, ci.hi) == (0.0, 0.0, 0.0) and not ci.excludes_zero


def test_paired_bootstrap_detects_a_large_shift_and_not_a_null():
    rng = np.random.default_rng(1)
    base = rng.normal(size=300)
    shifted = base + 0.5 + 0.1 * rng.normal(size=300)
    ci = stats.paired_bootstrap(shifted, base)
    assert ci.excludes_zero and ci.lo < 0.5 < ci.hi
    noise = base + 0.1 * rng.normal(size=300)
    assert not stats.paired_bootstrap(noise, base, seed=3).excludes_zero
    # pairing matters: the same shift hidden in large photo-to-photo spread
    wide = rng.normal(scale=5.0, size=300)
    assert stats.paired_bootstrap(wide + 0.5, wide).excludes_zero


def test_paired_bootstrap_is_seeded():
    rng = np.random.default_rng(2)
    a, b = rng.random(50), rng.random(50)
    assert tuple(stats.paired_bootstrap(a, b, seed=5)) == tuple(stats.paired_bootstrap(a, b, seed=5))
    med = stats.paired_bootstrap(a, b, stat=np.median)
    assert med.estimate == pytest.approx(np.median(a) - np.median(b))


def test_wilson_known_values():
    ci = stats.wilson_ci(8, 10)
    assert ci.estimate == 0.8
    assert ci.lo == pytest.approx(0.4902, abs=1e-4) and ci.hi == pytest.approx(0.9433, abs=1e-4)
    assert tuple(stats.wilson_ci(np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1]))) == tuple(ci)
    assert stats.wilson_ci(0, 20).lo == 0.0 and stats.wilson_ci(20, 20).hi == 1.0


def test_ci_coverage_on_synthetic_rates():
    """95% intervals of a Bernoulli(0.7) rate from 150 photos cover 0.7 about 95% of the time."""
    rng = np.random.default_rng(0)
    reps, p = 300, 0.7
    boot = wil = 0
    for i in range(reps):
        x = rng.random(150) < p
        _, lo, hi = stats.bootstrap_ci(x, n_boot=400, seed=i)
        boot += lo <= p <= hi
        w = stats.wilson_ci(x)
        wil += w.lo <= p <= w.hi
    assert 0.90 <= boot / reps <= 0.99
    assert 0.92 <= wil / reps <= 0.99


def test_ci_text_and_percent_format_tables():
    from dsm_lite.stats import ci_text, percent
    assert ci_text([0.8, -1.25], [-0.4, -2.0], [2.0, 0.04]) == ["+0.8 [-0.4, +2.0]", "-1.2 [-2.0, +0.0]"]
    assert ci_text([0.8275], [0.805], [0.851], scale=100, signed=False) == ["82.8 [80.5, 85.1]"]
    assert ci_text([1.0], [0.5], [1.5], digits=2) == ["+1.00 [+0.50, +1.50]"]
    assert percent([0.8275, 1.0, 0.0]) == ["82.8", "100.0", "0.0"] and percent([]) == []


def test_block_table_one_line_per_block():
    text = stats.block_table({"a": [0.5, 0.25], "longer name": np.array([1.0, -2.0])}, fmt={"a": "{:.2f}",
                             "longer name": "{:+.1f}"})
    lines = text.split("\n")
    assert lines[0].split() == ["block", "a", "longer", "name"]
    assert lines[1].split() == ["0", "0.50", "+1.0"] and lines[2].split() == ["1", "0.25", "-2.0"]
    assert len({len(l) for l in lines}) == 1  # aligned columns


def test_block_table_refuses_ragged_columns():
    with pytest.raises(ValueError, match="one value per block"):
        stats.block_table({"a": [1, 2], "b": [1, 2, 3]})
