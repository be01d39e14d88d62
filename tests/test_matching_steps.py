"""dsm_lite.matching_steps: every intermediate of one bipartite soft matching, the block metric
and the drawn stages, against plain-Python recomputations (loops over tokens and heads)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

import dsm_lite  # noqa: E402
from dsm_lite.matching_steps import block_metric, matching_steps, one_step_groups, plot_matching  # noqa: E402
from dsm_lite.plots import merge_overlay  # noqa: E402

from reference import cosine, record_blocks, reference_tome_merge, small_vit  # noqa: E402
from reference import single_thread  # noqa: E402,F401  (autouse fixture)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def naive_steps(metric, r, p):
    """The matching written out token by token: A = even positions, B = odd; cosine scores
    (-inf where a prefix token is involved); each A's best B (first on ties); the r best A
    tokens (ties: lower A first); r clamped to (N - P) // 2."""
    rows = metric.double().tolist()
    n = len(rows)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    scores = [[-math.inf if (a < p or b < p) else cosine(rows[a], rows[b]) for b in b_pos] for a in a_pos]
    best_b, best_score = [], []
    for row in scores:
        j = max(range(len(row)), key=lambda k: (row[k], -k))
        best_b.append(j)
        best_score.append(row[j])
    r = min(r, (n - p) // 2)
    chosen = sorted(range(len(a_pos)), key=lambda i: (-best_score[i], i))[:r]
    return dict(a_pos=a_pos, b_pos=b_pos, scores=scores, best_b=best_b, best_score=best_score, chosen=chosen,
                src=[a_pos[i] for i in chosen], dst=[b_pos[best_b[i]] for i in chosen])


@pytest.mark.parametrize("n,p,r", [(17, 1, 5), (16, 0, 8), (21, 5, 3), (17, 1, 100), (9, 1, 0)])
def test_matching_steps_equal_naive_recomputation(n, p, r):
    g = torch.Generator().manual_seed(n + p + r)
    metric = torch.randn(n, 6, generator=g, dtype=torch.float64)
    steps = matching_steps(metric[None], r, p)
    want = naive_steps(metric, r, p)
    assert steps.a_pos.tolist() == want["a_pos"] and steps.b_pos.tolist() == want["b_pos"]
    np.testing.assert_allclose(steps.scores, np.array(want["scores"]), atol=1e-6)
    assert steps.best_b.tolist() == want["best_b"]
    np.testing.assert_allclose(steps.best_score, want["best_score"], atol=1e-6)
    assert steps.chosen.tolist() == want["chosen"] and steps.r == len(want["chosen"])
    assert steps.src.tolist() == want["src"] and steps.dst.tolist() == want["dst"]
    assert steps.num_protected == p
    if steps.r:  # the Merge it carries folds exactly these tokens, as the naive ToMe merge does
        assert steps.merge.src[0].tolist() == want["src"] and steps.merge.dst[0].tolist() == want["dst"]
        _, _, _, kept = reference_tome_merge(metric[None], metric[None], r, p, return_kept=True)
        assert steps.merge.keep[0].tolist() == kept[0]
    else:
        assert steps.merge.src is None and steps.merge.keep[0].tolist() == list(range(n))


def test_matching_steps_hand_made_pairs():
    """Four 2-d tokens (no prefix): A = {0, 2}, B = {1, 3}. Token 2 is identical to token 3,
    token 0 is closer to 1 than to 3."""
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.0, 2.0]])
    steps = matching_steps(metric, 1)
    np.testing.assert_allclose(steps.scores, [[1 / math.sqrt(1.04), 0.0], [0.2 / math.sqrt(1.04), 1.0]], atol=1e-6)
    assert steps.best_b.tolist() == [0, 1]
    assert steps.chosen.tolist() == [1] and steps.src.tolist() == [2] and steps.dst.tolist() == [3]
    with pytest.raises(ValueError, match="one image"):
        matching_steps(torch.randn(2, 4, 2), 1)


def test_one_step_groups_by_hand():
    metric = torch.tensor([[0.0, 1.0]] + [[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.02, 1.0], [1.0, 1.0], [-1.0, 1.0]])
    steps = matching_steps(metric, 2, num_protected=1)  # 6 patches on a 2 x 3 grid
    groups = one_step_groups(steps, (2, 3))
    want = list(range(6))
    for s, d in zip(steps.src.tolist(), steps.dst.tolist()):
        want[s - 1] = d - 1  # the merged A patch takes its B partner's index
    assert groups.tolist() == [want[:3], want[3:]]
    # by hand: A token 2 = (1, .01) is nearest B 1 = (1, 0) (cos .99995), A 4 = (.02, 1) nearest
    # B 3 = (0, 1) (cos .9998); A 6 = (-1, 1) reaches only .707: patches 1 -> 0 and 3 -> 2
    assert sorted(zip(steps.src.tolist(), steps.dst.tolist())) == [(2, 1), (4, 3)]
    assert groups.tolist() == [[0, 0, 2], [2, 4, 5]]


def naive_block_metric(model, images, block, feature):
    """Tokens entering block ``block`` by running the blocks before it, then the feature of one
    head at a time (rows of qkv's weight), q/k norms per head, averaged over heads."""
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for blk in model.blocks[:block]:
            x = blk(x)
        attn = model.blocks[block].attn
        h = model.blocks[block].norm1(x)
        c, nh = h.shape[-1], attn.num_heads
        hd = c // nh
        part = {"q": 0, "k": 1, "v": 2}[feature]
        heads = []
        for i in range(nh):
            rows = slice(part * c + i * hd, part * c + (i + 1) * hd)
            f = h @ attn.qkv.weight[rows].T + attn.qkv.bias[rows]
            f = {"q": attn.q_norm, "k": attn.k_norm, "v": lambda t: t}[feature](f)
            heads.append(f)
        return sum(heads) / nh


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, reg_tokens=2)], ids=["plain", "qknorm_reg"])
def test_block_metric_equals_per_head_recomputation(kw):
    model = small_vit(seed=3, **kw)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 64, generator=g)
    called = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: called.append(i)) for i, b in enumerate(model.blocks)]
    try:
        for block, feature in ((0, "k"), (2, "k"), (1, "q"), (3, "v")):
            called.clear()
            got = block_metric(model, x, block=block, feature=feature)
            assert called == list(range(block))  # stopped at that block's attention
            torch.testing.assert_close(got, naive_block_metric(model, x, block, feature), atol=1e-5, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_block_metric_on_patched_model_sees_merged_tokens():
    model = dsm_lite.patch(small_vit(seed=1), "tome", r=6)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen = {}
    hook = model.blocks[2].norm1.register_forward_hook(lambda m, a, out: seen.setdefault("h", out.clone()))
    try:
        with torch.no_grad(), record_blocks(model) as log:
            model(x)
    finally:
        hook.remove()
    got = block_metric(model, x, block=2)
    assert got.shape[1] == log["tokens"][2] == 65 - 12
    attn = model.blocks[2].attn
    c, nh = got.shape[-1] * attn.num_heads, attn.num_heads
    k = seen["h"] @ attn.qkv.weight[c:2 * c].T + attn.qkv.bias[c:2 * c]
    want = sum(k[..., i * (c // nh):(i + 1) * (c // nh)] for i in range(nh)) / nh
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- plot_matching
def _centre(pos, p, w, ps):
    """Pixel centre (x, y) of the patch at sequence position ``pos``."""
    r, c = divmod(pos - p, w)
    return ((c + 0.5) * ps - 0.5, (r + 0.5) * ps - 0.5)


@pytest.fixture
def steps_and_image():
    g = torch.Generator().manual_seed(7)
    metric = torch.randn(1 + 12, 5, generator=g)  # a 3 x 4 grid of 2 px patches, one prefix token
    image = torch.rand(3, 6, 8, generator=g) * 2 - 1
    return matching_steps(metric, 3, 1), image


def test_plot_matching_edges_are_best_pairs(steps_and_image):
    steps, image = steps_and_image
    ax = plt.subplots()[1]
    mappable = plot_matching(ax, image, steps, (3, 4), 2, stage="edges", title="edges")
    (lc,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert mappable is lc and ax.get_title() == "edges"
    want, scores = [], []
    for i, a in enumerate(steps.a_pos.tolist()):
        if a < 1:
            continue  # the prefix token is not drawn
        b = steps.b_pos[steps.best_b[i]]
        want.append([_centre(a, 1, 4, 2), _centre(int(b), 1, 4, 2)])
        scores.append(steps.best_score[i])
    np.testing.assert_allclose(np.array(lc.get_segments()), np.array(want))
    np.testing.assert_allclose(lc.get_array(), scores)
    # the photo is drawn faded: 0.6 * photo + 0.4
    photo = (image.permute(1, 2, 0).double().numpy() + 1) / 2
    np.testing.assert_allclose(ax.get_images()[0].get_array(), photo * 0.6 + 0.4, atol=1e-7)
    assert ax.get_xlim() == (-0.5, 7.5) and ax.get_ylim() == (5.5, -0.5)


def test_plot_matching_chosen_split_and_merged(steps_and_image):
    steps, image = steps_and_image
    ax = plt.subplots()[1]
    assert plot_matching(ax, image, steps, (3, 4), 2, stage="chosen") is None
    grey, red = [c for c in ax.collections if isinstance(c, LineCollection)]
    want_red = sorted([_centre(int(s), 1, 4, 2), _centre(int(d), 1, 4, 2)] for s, d in zip(steps.src, steps.dst))
    assert sorted(np.array(red.get_segments()).tolist()) == np.array(want_red).tolist()
    assert len(grey.get_segments()) == 6 - 3  # A patches 1, 3, ..., 11 minus the 3 chosen
    # split: A patches (odd patch index here: sequence even) tinted blue, the rest orange
    ax = plt.subplots()[1]
    plot_matching(ax, image, steps, (3, 4), 2, stage="split")
    tint = ax.get_images()[1].get_array()
    blue, orange = matplotlib.colors.to_rgba("tab:blue", 0.45), matplotlib.colors.to_rgba("tab:orange", 0.45)
    for patch in range(12):
        r, c = divmod(patch, 4)
        want = blue if (patch + 1) % 2 == 0 else orange
        np.testing.assert_allclose(tint[2 * r:2 * r + 2, 2 * c:2 * c + 2], np.broadcast_to(want, (2, 2, 4)))
    # merged: the overlay of this one step's groups
    ax = plt.subplots()[1]
    plot_matching(ax, image, steps, (3, 4), 2, stage="merged")
    groups = np.arange(12)
    for s, d in zip(steps.src, steps.dst):
        groups[s - 1] = d - 1
    want = merge_overlay(image, groups.reshape(3, 4), 2, alpha=0.7)
    np.testing.assert_allclose(ax.get_images()[0].get_array(), want)
    with pytest.raises(ValueError, match="stage"):
        plot_matching(ax, image, steps, (3, 4), 2, stage="bogus")
