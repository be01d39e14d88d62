"""dsm_lite.plots: what the drawn artists hold (line data, band polygons, bars, images, labels)
against values written out or recomputed here with plain loops and hand-picked numbers."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from dsm_lite import plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def ax():
    return plt.subplots()[1]


def percentile(values, q):
    """Linear-interpolation percentile of a plain list, NaNs skipped (written out by hand)."""
    v = sorted(float(a) for a in values if not math.isnan(a))
    pos = q / 100 * (len(v) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(v) - 1)
    return v[i] + (pos - i) * (v[j] - v[i])


def column_band(values, low=10, high=90):
    """(median, low, high) per column of a (photos, blocks) nested list."""
    cols = list(zip(*values))
    return tuple(np.array([percentile(c, q) for c in cols]) for q in (50, low, high))


def fill_edges(coll, x):
    """(lower, upper) y of a fill_between polygon at each of ``x`` (and no other x)."""
    verts = np.concatenate([p.vertices for p in coll.get_paths()])
    assert set(np.round(verts[:, 0], 9)) == set(np.round(np.asarray(x, float), 9))
    lo = np.array([verts[verts[:, 0] == xi, 1].min() for xi in x])
    hi = np.array([verts[verts[:, 0] == xi, 1].max() for xi in x])
    return lo, hi


def line_xy(line):
    return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)


# a (5 photos, 3 blocks) table whose percentiles are easy by hand: column j is 10 * j + (0..4) shuffled
TABLE = [[2, 11, 24], [0, 14, 20], [4, 10, 23], [1, 13, 21], [3, 12, 22]]
#          median                      p10 = low + 0.4       p90 = high - 0.4
TABLE_MED, TABLE_LO, TABLE_HI = [2, 12, 22], [0.4, 10.4, 20.4], [3.6, 13.6, 23.6]


# --------------------------------------------------------------------------- conversions
def test_to_numpy_and_denormalize_by_hand():
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.float32)
    assert plots.to_numpy(t).dtype == np.float64 and plots.to_numpy(t).tolist() == [[1, 2], [3, 4]]
    assert plots.to_numpy([1, 2]).tolist() == [1.0, 2.0]
    img = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]], [[0.5, -0.5], [0.0, 0.0]], [[-3.0, 0.2], [0.4, 0.6]]])
    got = plots.denormalize(img)
    assert got.shape == (2, 2, 3)
    for y in range(2):
        for x in range(2):
            for c in range(3):  # x * 0.5 + 0.5, clipped to [0, 1]
                assert got[y, x, c] == pytest.approx(min(max(float(img[c, y, x]) * 0.5 + 0.5, 0), 1))
    own = plots.denormalize(img, mean=(0.1, 0.2, 0.3), std=(1, 2, 3))
    assert own[0, 1, 2] == pytest.approx(0.2 * 3 + 0.3) and own[1, 0, 1] == pytest.approx(0.2)


def test_band_hand_values():
    med, lo, hi = plots.band(torch.tensor(TABLE, dtype=torch.float64))
    np.testing.assert_allclose(med, TABLE_MED)
    np.testing.assert_allclose(lo, TABLE_LO)
    np.testing.assert_allclose(hi, TABLE_HI)
    med, lo, hi = plots.band(np.array(TABLE).T, 25, 75, axis=1)
    np.testing.assert_allclose(lo, [1, 11, 21])
    np.testing.assert_allclose(hi, [3, 13, 23])


# --------------------------------------------------------------------------- lines and bands
def test_plot_percentile_band_draws_median_and_band(ax):
    out = plots.plot_percentile_band(ax, torch.tensor(TABLE, dtype=torch.float32), label="t")
    assert out is ax
    (line,) = ax.get_lines()
    x, y = line_xy(line)
    np.testing.assert_array_equal(x, [0, 1, 2])
    np.testing.assert_allclose(y, TABLE_MED)
    assert line.get_label() == "t" and line.get_marker() == "o"
    (coll,) = ax.collections
    lo, hi = fill_edges(coll, x)
    np.testing.assert_allclose(lo, TABLE_LO, atol=1e-6)
    np.testing.assert_allclose(hi, TABLE_HI, atol=1e-6)
    # the band has the line's colour; own x positions and percentiles
    assert mcolors.to_rgb(coll.get_facecolor()[0]) == mcolors.to_rgb(line.get_color())
    ax2 = plt.subplots()[1]
    plots.plot_percentile_band(ax2, TABLE, x=[5, 7, 9], low=25, high=75)
    np.testing.assert_array_equal(line_xy(ax2.get_lines()[0])[0], [5, 7, 9])
    lo, hi = fill_edges(ax2.collections[0], [5, 7, 9])
    np.testing.assert_allclose(lo, [1, 11, 21])
    np.testing.assert_allclose(hi, [3, 13, 23])


def test_plot_mean_ci_draws_given_values(ax):
    mean, lo, hi = [0.5, 0.7, 0.2], [0.4, 0.65, 0.0], [0.6, 0.8, 0.3]
    plots.plot_mean_ci(ax, torch.tensor(mean), np.array(lo), hi, x=[1, 2, 4], label="m", marker="s")
    (line,) = ax.get_lines()
    x, y = line_xy(line)
    np.testing.assert_array_equal(x, [1, 2, 4])
    np.testing.assert_allclose(y, mean, rtol=1e-7)
    assert line.get_marker() == "s" and line.get_label() == "m"
    got_lo, got_hi = fill_edges(ax.collections[0], [1, 2, 4])
    np.testing.assert_allclose(got_lo, lo)
    np.testing.assert_allclose(got_hi, hi)


def test_plot_sim_per_block_lines_transition_and_labels(ax):
    sim_in = ([0.1, 0.2, 0.3, 0.4], [0.0, 0.1, 0.2, 0.3], [0.2, 0.3, 0.4, 0.5])
    sim_mid = ([0.05, 0.25, 0.35, 0.5], [0.0, 0.2, 0.3, 0.4], [0.1, 0.3, 0.4, 0.6])
    plots.plot_sim_per_block(ax, sim_in, sim_mid, transition=2, title="T")
    lines = ax.get_lines()
    assert len(lines) == 3
    for line, (mean, lo, hi), marker in zip(lines, (sim_in, sim_mid), "os"):
        x, y = line_xy(line)
        np.testing.assert_array_equal(x, [0, 1, 2, 3])
        np.testing.assert_allclose(y, mean)
        assert line.get_marker() == marker
    for coll, (_, lo, hi) in zip(ax.collections, (sim_in, sim_mid)):
        np.testing.assert_allclose(np.stack(fill_edges(coll, [0, 1, 2, 3])), [lo, hi])
    vline = lines[2]
    assert list(vline.get_xdata()) == [1.5, 1.5] and "D = 2" in vline.get_label()
    assert list(ax.get_xticks()) == [0, 1, 2, 3] and ax.get_xlabel() == "block l"
    assert ax.get_ylabel().startswith("Sim") and ax.get_title() == "T"
    assert [t.get_text() for t in ax.get_legend().get_texts()][2] == "transition (D = 2)"


def test_plot_delta_sim_bars_colours_and_error_bars(ax):
    mean, lo, hi = [-0.2, 0.1, 0.3], [-0.3, 0.05, 0.1], [-0.1, 0.2, 0.35]
    plots.plot_delta_sim(ax, (torch.tensor(mean), torch.tensor(lo), torch.tensor(hi)), transition=1)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 3
    for i, (bar, m) in enumerate(zip(bars, mean)):
        assert bar.get_x() + bar.get_width() / 2 == pytest.approx(i)
        assert bar.get_height() == pytest.approx(m)
        want = "tab:red" if m < 0 else "tab:blue"
        assert mcolors.to_rgb(bar.get_facecolor()) == mcolors.to_rgb(want)
    err = next(c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer))
    segs = err.lines[2][0].get_segments()
    for i, seg in enumerate(segs):  # each error bar spans exactly [lo, hi] at bar i
        np.testing.assert_allclose(seg, [[i, lo[i]], [i, hi[i]]], atol=1e-7)
    xs = sorted(float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[1])
    assert 0.5 in xs  # transition line at D - 0.5
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["divergent (< 0)", "convergent (> 0)"]
    assert "Delta" in ax.get_ylabel()


def test_plot_attention_shares_one_band_per_group(ax):
    shares = {"class token": torch.tensor(TABLE, dtype=torch.float64) / 100,
              "top-5": torch.tensor(TABLE, dtype=torch.float64).flip(1) / 50}
    plots.plot_attention_shares(ax, shares, uniform=0.25, log=True)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines[:2]] == ["class token", "top-5"]
    np.testing.assert_allclose(line_xy(lines[0])[1], np.array(TABLE_MED) / 100)
    np.testing.assert_allclose(line_xy(lines[1])[1], np.array(TABLE_MED[::-1]) / 50)
    lo, hi = fill_edges(ax.collections[1], [0, 1, 2])
    np.testing.assert_allclose(lo, np.array(TABLE_LO[::-1]) / 50)
    np.testing.assert_allclose(hi, np.array(TABLE_HI[::-1]) / 50)
    assert list(lines[2].get_ydata()) == [0.25, 0.25] and "0.2500" in lines[2].get_label()
    assert ax.get_yscale() == "log" and ax.get_ylabel().startswith("share of all attention")


def test_plot_received_outliers_vs_rest_skips_nan_blocks(ax):
    nan = float("nan")
    # block 0: no photo has an outlier (dropped); block 2 has one NaN photo (ignored)
    outlier = [[nan, 0.5, 0.2, 0.9], [nan, 0.3, nan, 0.7], [nan, 0.1, 0.6, 0.8]]
    rest = [[0.01, 0.02, 0.03, 0.04], [0.02, 0.01, 0.05, 0.02], [0.03, 0.03, 0.01, 0.06]]
    plots.plot_received_outliers_vs_rest(ax, torch.tensor(outlier), np.array(rest), uniform=0.05)
    line_o, line_r = ax.get_lines()[:2]
    x, y = line_xy(line_o)
    np.testing.assert_array_equal(x, [1, 2, 3])
    np.testing.assert_allclose(y, [percentile([r[j] for r in outlier], 50) for j in (1, 2, 3)], rtol=1e-6)
    np.testing.assert_allclose(y, [0.3, 0.4, 0.8], rtol=1e-6)  # by hand
    lo, hi = fill_edges(ax.collections[0], [1, 2, 3])
    np.testing.assert_allclose(lo, [percentile([r[j] for r in outlier], 10) for j in (1, 2, 3)], rtol=1e-6)
    np.testing.assert_allclose(hi, [percentile([r[j] for r in outlier], 90) for j in (1, 2, 3)], rtol=1e-6)
    x, y = line_xy(line_r)
    np.testing.assert_array_equal(x, [0, 1, 2, 3])
    np.testing.assert_allclose(y, [0.02, 0.02, 0.03, 0.04], rtol=1e-6)
    assert line_o.get_label() == "high-norm outlier token" and line_r.get_label() == "other patch token"
    assert ax.get_yscale() == "log" and list(ax.get_lines()[2].get_ydata()) == [0.05, 0.05]
    ax2 = plt.subplots()[1]  # block numbers given explicitly
    plots.plot_received_outliers_vs_rest(ax2, outlier, rest, blocks=[4, 5, 6, 7])
    np.testing.assert_array_equal(line_xy(ax2.get_lines()[0])[0], [5, 6, 7])


def test_plot_norm_ratio_band_threshold_and_emergence(ax):
    plots.plot_norm_ratio(ax, torch.tensor(TABLE, dtype=torch.float64), threshold=4.0, emergence=1)
    band_line, thr, emer = ax.get_lines()
    np.testing.assert_allclose(line_xy(band_line)[1], TABLE_MED)
    np.testing.assert_allclose(np.stack(fill_edges(ax.collections[0], [0, 1, 2])), [TABLE_LO, TABLE_HI])
    assert list(thr.get_ydata()) == [4.0, 4.0] and "4x median" in thr.get_label()
    assert list(emer.get_xdata()) == [1, 1] and "block 1" in emer.get_label()
    assert ax.get_yscale() == "log" and ax.get_xlabel().startswith("block l")
    assert list(ax.get_xticks()) == [0, 1, 2]


# --------------------------------------------------------------------------- images
def test_show_patch_marks_images_and_rectangles():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 3, 8, 12, generator=g) * 2 - 1
    masks = torch.zeros(3, 6, dtype=torch.bool)  # a 2 x 3 grid of 4 px patches
    masks[0, 4] = True  # row 1, col 1
    masks[2, [0, 5]] = True
    fig = plots.show_patch_marks(imgs, masks, (2, 3), titles=["a", "b", "c"], ncols=2, patch=4)
    axes = fig.axes
    assert len(axes) == 4  # 2 x 2, the last one empty
    for i in range(3):
        (im,) = axes[i].get_images()
        want = (imgs[i].permute(1, 2, 0).double().numpy() + 1) / 2
        np.testing.assert_allclose(im.get_array(), want, atol=1e-7)
        assert axes[i].get_title() == "abc"[i]
    corners = [sorted((r.get_x(), r.get_y()) for r in a.patches if isinstance(r, Rectangle)) for a in axes[:3]]
    assert corners == [[(3.5, 3.5)], [], [(-0.5, -0.5), (7.5, 3.5)]]
    assert all(r.get_width() == r.get_height() == 4 for r in axes[0].patches)
    assert not axes[3].get_images()


def test_show_grid_maps_arrays_shared_scale_and_photo_column():
    maps = torch.arange(1, 2 * 3 * 4 + 1, dtype=torch.float64).reshape(2, 3, 4)  # 2 rows, 3 cols, P = 4
    imgs = torch.zeros(2, 3, 4, 4)
    fig = plots.show_grid_maps(maps, (2, 2), titles=["x", "y", "z"], row_labels=["r0", "r1"], images=imgs)
    axes = np.array(fig.axes[:8]).reshape(2, 4)
    for r in range(2):
        np.testing.assert_allclose(axes[r, 0].get_images()[0].get_array(), np.full((4, 4, 3), 0.5))
        for c in range(3):
            (im,) = axes[r, c + 1].get_images()
            want = [[maps[r, c, 0], maps[r, c, 1]], [maps[r, c, 2], maps[r, c, 3]]]
            np.testing.assert_array_equal(im.get_array(), np.array(want, dtype=float))
            assert isinstance(im.norm, mcolors.LogNorm) and (im.norm.vmin, im.norm.vmax) == (1, 24)
        assert axes[r, 1].get_ylabel() == f"r{r}"
    assert [axes[0, c].get_title() for c in range(4)] == ["photo", "x", "y", "z"]
    assert fig.axes[-1].get_ylabel() == "attention received (log scale)"  # the colour bar
    linear = plots.show_grid_maps(maps - 5, (2, 2), titles=["x", "y", "z"], log=False)
    im = linear.axes[0].get_images()[0]
    assert isinstance(im.norm, mcolors.Normalize) and (im.norm.vmin, im.norm.vmax) == (-4, 19)
    assert linear.axes[-1].get_ylabel() == "attention received"


def reference_overlay(img, groups, ps, alpha=0.55, seed=0):
    """merge_overlay pixel by pixel: colour of group k = the k-th draw (groups in ascending id
    order) of the seeded palette over groups of more than one patch; borders 0.1."""
    h, w = len(groups), len(groups[0])
    ids = sorted({g for row in groups for g in row})
    palette = np.random.default_rng(seed).uniform(0.15, 1.0, size=(len(ids), 3))
    count = {k: sum(row.count(k) for row in groups) for k in ids}
    out = np.array(img, dtype=float)
    for y in range(h * ps):
        for x in range(w * ps):
            g = groups[y // ps][x // ps]
            if count[g] > 1:
                out[y, x] = (1 - alpha) * img[y, x] + alpha * palette[ids.index(g)]
            left = x > 0 and groups[y // ps][(x - 1) // ps] != g
            up = y > 0 and groups[(y - 1) // ps][x // ps] != g
            if left or up:
                out[y, x] = 0.1
    return np.clip(out, 0, 1)


def test_merge_overlay_pixel_by_pixel():
    rng = np.random.default_rng(1)
    img = rng.random((6, 9, 3))
    groups = [[0, 0, 7], [4, 7, 7]]  # 2 x 3 patches of 3 px: groups {0, 0}, {7, 7, 7}, {4}
    got = plots.merge_overlay(img, torch.tensor(groups), 3)
    np.testing.assert_allclose(got, reference_overlay(img, groups, 3), atol=1e-12)
    # the lone patch 4 (rows 3-5, cols 0-2) is untouched away from its border
    np.testing.assert_array_equal(got[4:, 1:3], img[4:, 1:3])
    np.testing.assert_allclose(plots.merge_overlay(img, np.array(groups), 3, alpha=0.2, seed=5),
                               reference_overlay(img, groups, 3, alpha=0.2, seed=5), atol=1e-12)
    # a normalised (3, H, W) tensor is denormalised first
    t = torch.tensor(img.transpose(2, 0, 1) * 2 - 1)
    np.testing.assert_allclose(plots.merge_overlay(t, groups, 3), reference_overlay(img, groups, 3), atol=1e-12)


def test_show_merges_grid_overlays_and_window_lines():
    rng = np.random.default_rng(2)
    imgs = [rng.random((8, 8, 3)), rng.random((8, 8, 3))]
    groups = [[[[0, 0, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 14]]] * 2,
              [[[0, 1, 2, 3], [0, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]] * 2]
    fig = plots.show_merges(imgs, groups, 2, titles=["p", "q"], row_labels=["tome", "dsm"], windows=[None, 2])
    axes = np.array(fig.axes).reshape(2, 2)
    for i in range(2):
        for j in range(2):
            (im,) = axes[i, j].get_images()
            np.testing.assert_allclose(im.get_array(), reference_overlay(imgs[j], groups[i][j], 2), atol=1e-12)
    assert not axes[0, 0].get_lines()  # no window for row 0
    lines = axes[1, 1].get_lines()  # window of 2 patches = 4 px on an 8 px image: one line each way
    assert sorted(tuple(line.get_xdata()) for line in lines if line.get_xdata()[0] == line.get_xdata()[1]) == [(3.5, 3.5)]
    assert sorted(tuple(line.get_ydata()) for line in lines if line.get_ydata()[0] == line.get_ydata()[1]) == [(3.5, 3.5)]
    assert [a.get_title() for a in axes[0]] == ["p", "q"] and [a.get_ylabel() for a in axes[:, 0]] == ["tome", "dsm"]


def test_show_merges_transposed_puts_photos_down_and_rows_across():
    rng = np.random.default_rng(3)
    imgs = [rng.random((8, 8, 3)), rng.random((8, 8, 3))]
    groups = [[(np.arange(16).reshape(4, 4) // (k + 1)).tolist()] * 2 for k in range(3)]  # 3 rows x 2 photos
    fig = plots.show_merges(imgs, groups, 2, titles=["p", "q"], row_labels=["a", "b", "c"],
                            windows=[None, None, 2], transpose=True)
    axes = np.array(fig.axes).reshape(2, 3)  # photos down, rows across
    for i in range(3):
        for j in range(2):
            (im,) = axes[j, i].get_images()
            np.testing.assert_allclose(im.get_array(), reference_overlay(imgs[j], groups[i][j], 2), atol=1e-12)
    assert [a.get_title() for a in axes[0]] == ["a", "b", "c"] and [a.get_ylabel() for a in axes[:, 0]] == ["p", "q"]
    assert axes[1, 2].get_lines() and not axes[1, 1].get_lines()  # the window goes with its row
    plt.close(fig)


def test_plot_tradeoff_colours_each_method_the_same_everywhere(ax):
    import pandas as pd

    rows = [dict(label=l, r=r, gmacs=1.0 - 0.01 * r, agreement=0.9 - 0.01 * r)
            for l in ("DSM", "other", "ToMe", "variant", "spatial", "ablation") for r in (4, 8)]
    plots.plot_tradeoff(ax, pd.DataFrame(rows), band=False, colors={"other": "tab:purple"})
    got = {line.get_label(): mcolors.to_hex(line.get_color()) for line in ax.get_lines()}
    # unnamed curves take the spare colours in order, skipping those already given
    assert got == {name: mcolors.to_hex(c) for name, c in
                   dict(DSM="tab:green", other="tab:purple", ToMe="tab:blue", variant="tab:red",
                        spatial="tab:orange", ablation="tab:brown").items()}
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [82.0, 86.0])  # DSM, by rising GMACs


def test_plot_tokens_per_block_draws_each_schedule_and_shades_the_phases(ax):
    import timm

    from dsm_lite.schedules import ModelShape, closest_macs, plan

    shape = ModelShape.from_model(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    tome = plan(shape, "tome", 8)
    dsm = closest_macs(shape, "dsm", tome.macs, delay=2)
    # closest: no r in the range is nearer to ToMe's MACs than the one chosen
    assert all(abs(dsm.macs - tome.macs) <= abs(plan(shape, "dsm", r, delay=2).macs - tome.macs)
               for r in range(1, 64))
    plots.plot_tokens_per_block(ax, {"ToMe": tome, "DSM": dsm}, shade="DSM")
    lines = ax.get_lines()
    for line, s in zip(lines, (tome, dsm)):
        assert list(line.get_ydata()) == s.tokens and list(line.get_xdata()) == list(range(13))
    assert [mcolors.to_hex(l.get_color()) for l in lines] == [mcolors.to_hex("tab:blue"), mcolors.to_hex("tab:green")]
    spans = [p for p in ax.patches]
    assert len(spans) == 12  # one per block
    modes = [b.mode for b in dsm.blocks]
    assert modes[:2] == ["none", "none"] and "local" in modes and modes[-1] == "global"
    for span, mode in zip(spans, modes):
        assert mcolors.to_hex(span.get_facecolor()[:3]) == mcolors.to_hex(plots.PHASE_COLORS[mode])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == [f"ToMe: {tome.macs / 1e9:.3f} GMACs", f"DSM: {dsm.macs / 1e9:.3f} GMACs"]
    assert labels[2:] == ["DSM: delay: no merging", "DSM: local (windows)", "DSM: global"]


def test_curve_colors_methods_then_given_then_unused_spares():
    from dsm_lite.plots import METHOD_COLORS, OTHER_COLORS, curve_colors
    got = curve_colors(["DSM", "w14", "ToMe", "paper", "w14", "extra"], {"paper": OTHER_COLORS[0]})
    assert got["DSM"] == METHOD_COLORS["DSM"] and got["ToMe"] == METHOD_COLORS["ToMe"]
    assert got["paper"] == OTHER_COLORS[0]
    # spares skip the colour a named curve already has, and go in order
    assert (got["w14"], got["extra"]) == OTHER_COLORS[1:3]
    assert list(got) == ["DSM", "w14", "ToMe", "paper", "extra"]


def test_draw_phases_one_box_per_block_with_its_tokens(ax):
    from dsm_lite.plots import draw_merging_block, draw_phases
    from dsm_lite.schedules import ModelShape, plan
    shape = ModelShape(depth=12, dim=192, heads=3, head_dim=64, mlp_hidden=768, grid=(14, 14),
                       patch=(16, 16), in_chans=3, num_prefix=1, num_classes=1000)
    s = plan(shape, "dsm", 16)
    draw_phases(ax, s)
    boxes = [p for p in ax.patches]
    assert len(boxes) == 12
    texts = [t.get_text() for t in ax.texts]
    assert texts[0::2] == [str(b.tokens_in) for b in s.blocks]
    assert texts[1::2] == [f"-{b.r}" if b.r else "0" for b in s.blocks]
    fig2, ax2 = plt.subplots()
    draw_merging_block(ax2)
    assert any("merge" in t.get_text() for t in ax2.texts)
    plt.close(fig2)


def test_show_window_rules_panels_borders_and_anchor_dots():
    b, t, h, w, p = 2, 3, 4, 4, 2
    window = torch.zeros(t, b, h, w, dtype=torch.long)
    window[:, :, :, 2:] = 1
    groups = torch.arange(h * w).view(1, 1, h, w).repeat(t, b, 1, 1)
    groups[1:, :, 0, 1] = 0  # patches 0 and 1 merged from the second block on, anchored at 0
    anchor = groups == torch.arange(h * w).view(h, w)
    traced = {"blocks": torch.tensor([0, 1, 2]), "window": window, "anchor": anchor, "groups": groups}
    fig = plots.show_window_rules(torch.zeros(b, 3, h * p, w * p), traced, p, sides=[2, 2, 4],
                                  titles=["a", "b"])
    axes = np.asarray(fig.axes).reshape(b, t)
    assert [ax.get_title() for ax in axes[0]] == ["block 0: 2x2", "block 1: 2x2", "block 2: 4x4"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["a", "b"]
    # red window borders every `side` patches inside the picture: 1 + 1 lines, none for side 4
    assert len(axes[0, 0].get_lines()) == 2 and len(axes[0, 2].get_lines()) == 0
    # a dot on each anchor of a merged group only: none before the merge, one after
    assert len(axes[0, 0].collections[0].get_offsets()) == 0
    np.testing.assert_allclose(axes[1, 1].collections[0].get_offsets(), [[0.5, 0.5]])
    # each patch tinted by its window's colour
    img = axes[0, 0].get_images()[0].get_array()
    tint = np.asarray(plots.WINDOW_COLORS)
    grey = 0.45 * 0.5  # a zero (normalised) photo is mid-grey
    np.testing.assert_allclose(img[1, 1], grey + 0.55 * tint[0], atol=1e-6)  # interior pixels
    np.testing.assert_allclose(img[1, 5], grey + 0.55 * tint[1], atol=1e-6)
    plt.close(fig)


def test_book_style_sets_the_palette_and_spines():
    plots.book_style()
    try:
        cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
        assert mcolors.to_rgb(cycle[0]) == mcolors.to_rgb(plots.METHOD_COLORS["ToMe"])
        assert mcolors.to_rgb(cycle[1]) == mcolors.to_rgb(plots.METHOD_COLORS["spatial"])
        assert not matplotlib.rcParams["axes.spines.top"]
    finally:
        matplotlib.rcdefaults()


def test_plot_intervals_draws_the_given_intervals(ax):
    import pandas as pd

    table = pd.DataFrame({"feature": ["k", "q", "k", "q"], "metric": ["a", "a", "b", "b"],
                          "est": [0.5, 0.6, 0.7, 0.2], "lo": [0.4, 0.55, 0.6, 0.1], "hi": [0.65, 0.7, 0.75, 0.3]})
    plots.plot_intervals(ax, table, x="feature", est="est", lo="lo", hi="hi", hue="metric", scale=100)
    # every interval drawn is one of the given [lo, hi] (x 100), and every given one is drawn
    spans = set()  # seaborn draws each interval with its caps as one line, NaN-separated
    for line in ax.get_lines():
        xs, ys = line_xy(line)
        if line.get_marker() in ("None", "", None) and len(ys):
            spans.add((round(float(np.nanmin(ys)), 6), round(float(np.nanmax(ys)), 6)))
    want = {(round(l * 100, 6), round(h * 100, 6)) for l, h in zip(table.lo, table.hi)}
    assert want <= spans
    # the points sit at the estimates
    points = sorted(round(float(y), 6) for line in ax.get_lines() for y in line_xy(line)[1]
                    if line.get_marker() not in ("None", "", None) and len(line_xy(line)[0]) >= 1)
    for e in table.est:
        assert round(e * 100, 6) in points
    assert [t.get_text() for t in ax.get_xticklabels()] == ["k", "q"]
