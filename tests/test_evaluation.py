"""dsm_lite.evaluation and dsm_lite.sweeps: per-photo metrics, the sweep cache (hits, misses,
corruption) and the trade-off plots of a sweep."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dsm_lite
from dsm_lite import evaluation as ev
from dsm_lite import plots, sweeps
from dsm_lite import count_macs, is_patched, patch, unpatch
from dsm_lite.store_format import result_key

from reference import small_vit

N = 12


@pytest.fixture(scope="module")
def vit():
    return small_vit(seed=1)


@pytest.fixture
def model(vit):
    unpatch(vit)
    yield vit
    unpatch(vit)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 64, 64, generator=g), torch.randint(0, 10, (N,), generator=g)


# --------------------------------------------------------------------------- metrics
def test_per_image_metrics_known_case():
    dense = torch.tensor([[3.0, 1, 0, 0, 0, 0], [0, 2.0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 5.0]])
    labels = torch.tensor([0, 2, 3])
    same = ev.per_image_metrics(dense, dense, labels)
    assert same.agree.all() and np.all(same.kl == 0)
    assert same.correct1.tolist() == [True, False, False]
    assert same.correct5.tolist() == [True, True, True]
    other = dense.clone()
    other[0] = torch.tensor([0, 3.0, 0, 0, 0, 0])
    res = ev.per_image_metrics(other, dense, labels)
    assert res.agree.tolist() == [False, True, True]
    p, q = torch.softmax(dense[0].double(), 0), torch.softmax(other[0].double(), 0)
    assert res.kl[0] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)
    assert res.kl[1] == res.kl[2] == 0
    assert res.top1_acc == 0 and res.agreement == pytest.approx(2 / 3)


def test_evaluate_r0_agrees_and_state_is_restored(model, data):
    x, y = data
    dense = ev.dense_logits(model, x, batch_size=5, progress=False)
    with torch.no_grad():
        assert torch.allclose(dense, model(x), atol=1e-5)
    patch(model, "tome", 4, prop_attn=False)
    res = ev.evaluate(model, x, labels=y, batch_size=5, progress=False)  # dense computed inside
    st = model._dsm_state
    assert is_patched(model) and st.method == "tome" and st.options.r == 4 and not st.options.prop_attn
    assert len(res) == N and res.top5.shape == (N, 5)
    unpatch(model)
    res0 = ev.evaluate(model, x, labels=y, dense=dense, batch_size=5, progress=False)
    assert res0.agreement == 1.0 and res0.mean_kl == 0.0


# --------------------------------------------------------------------------- sweep and cache
CONFIGS = [dict(method="tome", r=0), dict(method="tome", r=3),
           dict(method="dsm", r=3, delay=1, label="DSM D=1")]


def _sweep(model, data, tmp_path, configs=CONFIGS, **kw):
    x, y = data
    return sweeps.sweep(model, x, configs, cache_dir=tmp_path, labels=y, batch_size=5,
                    progress=False, n_boot=200, **kw)


def test_sweep_columns_macs_and_restores_patch(model, data, tmp_path):
    patch(model, "spatial", 2, window=2)
    df = _sweep(model, data, tmp_path)
    assert is_patched(model) and model._dsm_state.method == "spatial"
    assert model._dsm_state.options.window == 2
    unpatch(model)
    for col in ("label", "method", "r", "delay", "prop_attn", "gmacs", "tokens_out", "top1",
                "top5", "agreement", "kl", "top1_lo", "top1_hi", "agreement_lo", "kl_hi",
                "d_top1", "d_top1_lo", "d_top1_hi", "cached", "result"):
        assert col in df.columns, col
    assert df.label.tolist() == ["ToMe", "ToMe", "DSM D=1"]
    assert df.delay.tolist() == [0, 0, 1]
    assert df.agreement[0] == 1.0 and df.kl[0] == 0.0 and df.d_top1[0] == 0.0
    assert df.tokens_out[0] == 65 and df.tokens_out[1] == 65 - 4 * 3
    for cfg, gmacs in zip(CONFIGS, df.gmacs):
        opts = {k: v for k, v in cfg.items() if k != "label"}
        patch(model, **opts)
        assert gmacs * 1e9 == count_macs(model, (3, 64, 64))
        unpatch(model)
    # merged results equal a direct evaluation
    patch(model, "tome", 3)
    direct = ev.evaluate(model, data[0], labels=data[1], batch_size=5, progress=False)
    unpatch(model)
    np.testing.assert_array_equal(df.result[1].pred, direct.pred)
    np.testing.assert_allclose(df.result[1].kl, direct.kl, rtol=1e-6, atol=1e-9)


def test_cache_hit_is_identical(model, data, tmp_path):
    first = _sweep(model, data, tmp_path)
    assert not first.cached.any()
    second = _sweep(model, data, tmp_path)
    assert second.cached.all()
    for a, b in zip(first.result, second.result):
        for k, v in a._arrays().items():
            np.testing.assert_array_equal(v, b._arrays()[k])
    cols = [c for c in first.columns if c not in ("cached", "result")]
    assert first[cols].equals(second[cols])


def test_cache_misses_on_config_code_images_and_weights(model, data, tmp_path, monkeypatch):
    _sweep(model, data, tmp_path, configs=CONFIGS[1:2])
    assert _sweep(model, data, tmp_path, configs=CONFIGS[1:2]).cached.all()
    # another config (an option spelled out with its default is the same config)
    assert _sweep(model, data, tmp_path, configs=[dict(method="tome", r=3, prop_attn=True)]).cached.all()
    assert not _sweep(model, data, tmp_path, configs=[dict(method="tome", r=3, prop_attn=False)]).cached.any()
    assert not _sweep(model, data, tmp_path, configs=[dict(method="tome", r=2)]).cached.any()
    # other photos
    x, y = data
    assert not _sweep(model, (x.flip(0), y.flip(0)), tmp_path, configs=CONFIGS[1:2]).cached.any()
    # another version of dsm_lite's code
    monkeypatch.setattr(sweeps, "code_hash", lambda: "0123456789abcdef")
    assert not _sweep(model, data, tmp_path, configs=CONFIGS[1:2]).cached.any()
    monkeypatch.undo()
    assert _sweep(model, data, tmp_path, configs=CONFIGS[1:2]).cached.all()
    # other weights
    with torch.no_grad():
        model.head.bias.add_(1.0)
    try:
        assert not _sweep(model, data, tmp_path, configs=CONFIGS[1:2]).cached.any()
    finally:
        with torch.no_grad():
            model.head.bias.sub_(1.0)


def test_cache_files_are_named_by_the_store_key(model, data, tmp_path):
    """One key for the store and the cache: a cache file's name is result_key of the JSON it holds."""
    _sweep(model, data, tmp_path, configs=CONFIGS[1:2])
    files = sorted(tmp_path.glob("*.npz"), key=lambda f: f.name.startswith("dense-"))
    assert [f.name.startswith("dense-") for f in files] == [False, True]
    for f in files:
        with np.load(f) as z:
            blob = json.loads(str(z["__meta__"]))
        assert f.stem.removeprefix("dense-") == result_key(blob["config"], blob["context"])
    assert blob["config"] == {"dense": True} and blob["context"]["code"] == sweeps.code_hash()


def test_code_hash_changes_with_source(tmp_path, monkeypatch):
    h = sweeps.code_hash()
    assert h == sweeps.code_hash() and len(h) == 16
    fake = tmp_path / "dsm_lite"
    fake.mkdir()
    (fake / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(sweeps, "__file__", str(fake / "sweeps.py"))
    one = sweeps.code_hash()
    (fake / "a.py").write_text("x = 2\n")
    assert sweeps.code_hash() != one


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "flip"])
def test_corrupt_cache_file_is_ignored_and_recomputed(model, data, tmp_path, damage):
    first = _sweep(model, data, tmp_path, configs=CONFIGS[1:2])
    files = [f for f in tmp_path.glob("*.npz") if not f.name.startswith("dense-")]
    assert len(files) == 1
    blob = files[0].read_bytes()
    if damage == "garbage":
        files[0].write_bytes(b"not a cache file")
    elif damage == "truncate":
        files[0].write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        files[0].write_bytes(b"")
    else:  # one byte changed inside the stored arrays: the zip CRC catches it
        i = len(blob) // 3
        files[0].write_bytes(blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:])
    again = _sweep(model, data, tmp_path, configs=CONFIGS[1:2])
    assert not again.cached.any()
    for k, v in first.result[0]._arrays().items():
        np.testing.assert_array_equal(v, again.result[0]._arrays()[k])
    assert _sweep(model, data, tmp_path, configs=CONFIGS[1:2]).cached.all()  # rewritten
    assert not list(tmp_path.glob(".part-*"))


def test_cache_disabled_writes_nothing(model, data, tmp_path):
    x, y = data
    df = sweeps.sweep(model, x, CONFIGS[1:2], cache_dir=False, labels=y, progress=False, n_boot=50)
    assert not df.cached.any() and not list(tmp_path.iterdir())


def test_unknown_config_key_is_rejected(model, data, tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        _sweep(model, data, tmp_path, configs=[dict(method="tome", r=2, windw=3)])


# --------------------------------------------------------------------------- plots
def test_plot_tradeoff_draws_the_sweep(model, data, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _sweep(model, data, tmp_path)
    fig, ax = plt.subplots()
    plots.plot_tradeoff(ax, df, x="gmacs", y="top1", by="method", annotate_r=True)
    assert ax.get_xlabel() == "GMACs per image" and "%" in ax.get_ylabel()
    assert len(ax.get_lines()) == 2 and len(ax.collections) == 2  # curves and bands
    for line, (method, g) in zip(ax.get_lines(), df.groupby("method", sort=False)):
        g = g.sort_values("gmacs")
        assert line.get_label() == method
        np.testing.assert_allclose(line.get_xdata(), g.gmacs)
        np.testing.assert_allclose(line.get_ydata(), g.top1 * 100)  # shares drawn in percent
    band = ax.collections[0].get_paths()[0].vertices
    g0 = df[df.method == df.method.iloc[0]].sort_values("gmacs")
    assert np.isclose(band[:, 1].min(), min(g0.top1_lo) * 100) and np.isclose(band[:, 1].max(), max(g0.top1_hi) * 100)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"r={r}" for r in df.r)
    plt.close(fig)
    fig = plots.plot_tradeoffs(df, ys=("top1", "agreement", "kl"))
    assert len(fig.axes) == 3 and "nats" in fig.axes[2].get_ylabel()
    np.testing.assert_allclose(sorted(fig.axes[2].get_lines()[0].get_ydata()),
                               sorted(df[df.method == df.method.iloc[0]].kl))  # KL drawn as is
    plt.close(fig)


def test_predict_among_reads_the_top5_and_runs_the_model_on_the_rest(model, data):
    x, _ = data
    logits = dsm_lite.predict(model, x)
    top5 = logits.topk(5, dim=1).indices.numpy()
    asked = []
    for classes in ([2, 7, 9], [9, 3], list(range(10)), *([c] for c in range(10))):
        want = logits[:, classes].argmax(dim=1).numpy()  # independent: straight from the logits
        ran = []

        class Photos:  # an ImageSet's take(), counting what it is asked to decode
            def take(self, idx):
                ran.append([int(i) for i in idx])
                return x[torch.as_tensor(idx)]

        got = ev.predict_among(classes, top5, model, Photos())
        np.testing.assert_array_equal(got, want)
        outside = [i for i in range(N) if not set(top5[i].tolist()) & set(classes)]
        assert ran == ([outside] if outside else [])  # the model ran on those photos only
        asked += outside
    assert asked  # the fallback was exercised
    # a bare tensor works too
    np.testing.assert_array_equal(ev.predict_among([0], top5, model, x), logits[:, [0]].argmax(1).numpy())


def test_summary_table_reads_one_unit_per_column(model, data, tmp_path):
    x, y = data
    df = sweeps.sweep(model, x, [dict(method="tome", r=0), dict(method="tome", r=2)], labels=y,
                      cache_dir=False, progress=False, n_boot=50)
    t = sweeps.summary_table(df.assign(set="fake"), first=["set"])
    assert list(t.columns) == ["set", "label", "r", "GMACs", "tokens out", "top-1 (%) [95% CI]",
                               "agreement (%) [95% CI]", "KL (nats)"]
    row = df.iloc[1]
    assert t["top-1 (%) [95% CI]"][1] == f"{100 * row.top1:.1f} [{100 * row.top1_lo:.1f}, {100 * row.top1_hi:.1f}]"
    assert t["agreement (%) [95% CI]"][0] == "100.0 [100.0, 100.0]"  # r = 0 is the dense model
    assert t["KL (nats)"][0] == "0.000" and t["tokens out"].tolist() == df.tokens_out.tolist()


def test_result_keys_name_the_model_as_timm_made_it_patched_or_not():
    """The store's and the cache's keys say the same of a model whether or not it is patched
    when the sweep starts (its class as timm made it, not the patched class)."""
    model = small_vit(seed=0)
    plain = sweeps._model_context(model)
    patch(model, "dsm", 4, delay=1)
    assert sweeps._model_context(model) == plain and plain["model_class"] == "VisionTransformer"
    unpatch(model)
