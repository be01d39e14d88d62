"""dsm_lite.store_format and dsm_lite.store: the versioned per-photo results the book's sweeps read, and their checks.

Two kinds of test:
- the store mechanics on a small random ViT: a stored entry is served without running the
  model and gives the same rows as computing; keys change with everything that changes a
  result; recording, modes and bad files give clear errors;
- the shipped store itself (``dsm_lite/results/book.npz``) against a recomputation of a seeded
  subset of its photos with the pretrained model. CI runs this file again under another CPU
  instruction set, so the stored outputs are checked against two kinds of machine.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dsm_lite import sweeps
from dsm_lite import store as st
from dsm_lite import store_format as sf
from dsm_lite.data import ImageSet

from reference import small_vit

N = 10
CONFIGS = [dict(method="tome", r=0, label="dense"), dict(method="tome", r=3),
           dict(method="dsm", r=3, delay=1, label="DSM"),
           dict(method="tome", r=3, feature="random", label="random")]


@pytest.fixture(scope="module")
def vit():
    return small_vit(seed=3)


@pytest.fixture(scope="module")
def photos():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, 64, 64, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    return ImageSet("imagenet-sample", x, y, [f"imagenet-sample/fake_{i}.JPEG" for i in range(N)], [])


class CountForwards:
    """Counts forward passes of a model (a hook on its first block)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.blocks[0].register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _sweep(model, photos, store, configs=CONFIGS, **kw):
    return sweeps.sweep(model, photos, configs, cache_dir=False, batch_size=4, progress=False,
                    n_boot=100, store=store, **kw)


def _same_rows(a, b):
    """Same rows; the KL columns to float32 precision (the store keeps KL in float32)."""
    kl = [c for c in a.columns if c.startswith("kl")]
    cols = [c for c in a.columns if c not in ("result", "cached", *kl)]
    assert a[cols].equals(b[cols])
    np.testing.assert_allclose(a[kl].to_numpy(float), b[kl].to_numpy(float), rtol=1e-6, atol=0)
    for ra, rb in zip(a.result, b.result):
        _same_arrays({f: getattr(ra, f) for f in sf.FIELDS}, {f: getattr(rb, f) for f in sf.FIELDS})


def test_recorded_results_are_served_without_running_the_model(vit, photos, tmp_path):
    path = tmp_path / "store.npz"
    computed = _sweep(vit, photos, None)
    recorded = _sweep(vit, photos, sf.ResultStore(path, mode="record"))
    _same_rows(recorded, computed)
    assert not recorded.cached.any()
    store = sf.ResultStore(path)
    assert len(store) == len(CONFIGS) + 1  # every config, and the dense model's correctness
    with CountForwards(vit) as count:
        served = _sweep(vit, photos, store)
    assert count.n == 0 and served.cached.all()
    _same_rows(served, computed)
    # the d_top1 columns need the dense model's per-photo correctness: stored too
    assert served.d_top1.tolist() == computed.d_top1.tolist()


def test_a_missing_entry_is_computed_and_others_are_served(vit, photos, tmp_path):
    path = tmp_path / "store.npz"
    _sweep(vit, photos, sf.ResultStore(path, mode="record"), configs=CONFIGS[:2])
    with CountForwards(vit) as count:
        df = _sweep(vit, photos, sf.ResultStore(path))
    assert df.cached.tolist() == [True, True, False, False]
    assert count.n == 2 * -(-N // 4) + -(-N // 4)  # DSM and random configs, plus the dense model


def test_extend_serves_what_it_has_and_records_the_rest(vit, photos, tmp_path):
    path = tmp_path / "store.npz"
    _sweep(vit, photos, sf.ResultStore(path, mode="record"), configs=CONFIGS[:2])
    before = {k: e["pred"].copy() for k, e in sf.ResultStore(path).entries().items()}
    df = _sweep(vit, photos, sf.ResultStore(path, mode="extend"))
    assert df.cached.tolist() == [True, True, False, False]
    after = sf.ResultStore(path)
    assert len(after) == len(CONFIGS) + 1 and set(before) < set(after.entries())
    with CountForwards(vit) as count:
        _same_rows(_sweep(vit, photos, after), df)
    assert count.n == 0


def test_put_appends_new_keys_and_rewrites_a_replaced_one(tmp_path):
    path = tmp_path / "store.npz"
    rng = np.random.default_rng(0)

    rec = sf.ResultStore(path, mode="record")
    want = {k: _fake_arrays(rng, 7) for k in ("a", "b", "c")}
    for k, a in want.items():
        rec.put(k, a, dict(label=k))
    size = path.stat().st_size
    rec.put("b", want["b"], dict(label="b again"))  # replacing: one rewrite, no duplicate members
    assert abs(path.stat().st_size - size) < 100
    got = sf.ResultStore(path).entries()
    assert sorted(got) == ["a", "b", "c"] and got["b"]["__meta__"]["label"] == "b again"
    for k, a in want.items():
        _same_arrays(got[k], a)


def _same_arrays(got, want):
    """Exact for classes and flags; KL and confidence to float32 (the store keeps 24 bits)."""
    for f in sf.FIELDS:
        assert got[f].dtype == np.asarray(want[f]).dtype  # class indices come back as int64
        if f in ("kl", "confidence"):
            np.testing.assert_allclose(got[f], want[f], rtol=2.0 ** -24, atol=0)
        else:
            np.testing.assert_array_equal(got[f], want[f])


def _fake_arrays(rng, n, top5=None):
    top5 = rng.integers(0, 1000, (n, 5)) if top5 is None else top5
    return dict(pred=top5[:, 0].copy(), top5=top5, correct1=top5[:, 0] < 500,
                correct5=top5.min(1) < 100, agree=top5[:, 0] % 2 == 0, kl=rng.random(n) * 9,
                confidence=rng.random(n))


def test_format_2_codes_top5_against_the_dense_entry_and_shares_photo_lists(tmp_path):
    rng = np.random.default_rng(2)
    n = 300
    dense_top5 = np.stack([rng.permutation(1000)[:5] for _ in range(n)])
    merged = dense_top5.copy()
    merged[:100] = merged[:100, ::-1]  # the same five classes, reordered
    merged[100:200, 2:] = rng.integers(0, 1000, (100, 3))  # some classes new (or ranked elsewhere)
    photos = [f"imagenet-sample/p{i}.JPEG" for i in range(n)]
    ctx = dict(weights="w", dtype="torch.float64")
    entries = {"dense": {"__meta__": dict(config={"dense": True}, context=ctx, photos=photos),
                         **_fake_arrays(rng, n, dense_top5)},
               "merged": {"__meta__": dict(config={"method": "tome"}, context=ctx, photos=photos),
                          **_fake_arrays(rng, n, merged)},
               "other": {"__meta__": dict(config={"method": "tome"}, context=dict(ctx, weights="v"),
                                          photos=photos), **_fake_arrays(rng, n)}}
    path = tmp_path / "s.npz"
    sf._write(path, entries)
    got = sf.ResultStore(path).entries()
    for k, e in entries.items():
        assert got[k]["__meta__"] == e["__meta__"]
        _same_arrays(got[k], e)
    with np.load(path) as z:
        names = z.files
        meta = {k: json.loads(str(z[f"{k}/__meta__"])) for k in entries}
        codes = z["merged/top5"]
    assert sum(n.startswith("__photos__/") for n in names) == 1  # one list for three entries
    assert not any(n.endswith("/pred") for n in names)  # pred is top5[:, 0]
    assert meta["merged"]["top5_base"] == "dense"  # same context and photos
    assert "top5_base" not in meta["other"] and "top5_base" not in meta["dense"]
    assert (codes[:100] == [4, 3, 2, 1, 0]).all() and (codes[200:] == [0, 1, 2, 3, 4]).all()
    # compacting an appended (plain) store changes nothing that is read back
    rec = sf.ResultStore(tmp_path / "a.npz", mode="record")
    for k, e in entries.items():
        rec.put(k, {f: e[f] for f in sf.FIELDS}, e["__meta__"])
    before = sf.ResultStore(rec.path).entries()
    st._main(["compact", str(rec.path)])
    after = sf.ResultStore(rec.path).entries()
    for k in entries:
        assert after[k]["__meta__"] == before[k]["__meta__"]
        for f in sf.FIELDS:
            np.testing.assert_array_equal(after[k][f], before[k][f])


def test_a_format_1_store_is_still_read(tmp_path):
    """Format 1: every entry's photo list in its meta, pred stored, KL and confidence float64."""
    rng = np.random.default_rng(3)
    a = _fake_arrays(rng, 4)
    meta = dict(label="x", photos=["imagenet-sample/p.JPEG"] * 4)
    path = tmp_path / "v1.npz"
    np.savez_compressed(path, **{"__meta__": np.array('{"format": 1}'),
                                 "k/__meta__": np.array(json.dumps(meta)),
                                 **{f"k/{f}": (v.astype(np.int16) if v.dtype.kind == "i" else v)
                                    for f, v in a.items()}})
    got = sf.ResultStore(path).entries()["k"]
    assert got["__meta__"] == meta
    for f in sf.FIELDS:
        assert got[f].dtype == a[f].dtype
        np.testing.assert_array_equal(got[f], a[f])  # float64 was stored: exact


def test_diff_finds_a_changed_prediction_and_missing_entries(tmp_path):
    rng = np.random.default_rng(1)
    n = 6
    arrays = _fake_arrays(rng, n)
    meta = dict(label="x", photos=[f"imagenet-sample/p{i}.JPEG" for i in range(n)])
    a, b = sf.ResultStore(tmp_path / "a.npz", "record"), sf.ResultStore(tmp_path / "b.npz", "record")
    for k in ("k1", "k2"):
        a.put(k, arrays, meta)
    assert st.diff(a.path, a.path) == (2, [], [], [])
    changed = dict(arrays, pred=arrays["pred"].copy(), top5=arrays["top5"].copy(),
                   kl=arrays["kl"] + 5e-7)  # KL within tolerance
    changed["pred"][3] = changed["top5"][3, 0] = (changed["pred"][3] + 1) % 1000
    b.put("k1", changed, meta)
    b.put("k3", arrays, meta)
    common, bad, only_a, only_b = st.diff(a.path, b.path)
    assert (common, only_a, only_b) == (1, ["k2"], ["k3"])
    assert len(bad) == 1 and bad[0].fields == ["pred", "top5"] and bad[0].photos == ["imagenet-sample/p3.JPEG"]
    assert st._main(["diff", str(a.path), str(b.path)]) == 1


@pytest.mark.parametrize("change", ["config", "photos", "labels", "weights", "dtype"])
def test_keys_change_with_everything_that_changes_a_result(vit, photos, tmp_path, change):
    path = tmp_path / "store.npz"
    _sweep(vit, photos, sf.ResultStore(path, mode="record"), configs=CONFIGS[1:2])
    model, configs = vit, CONFIGS[1:2]
    if change == "config":
        configs = [dict(CONFIGS[1], prop_attn=False)]
    elif change == "photos":
        photos = ImageSet(photos.name, photos.images, photos.labels,
                          photos.paths[::-1], [])
    elif change == "labels":
        photos = ImageSet(photos.name, photos.images, (photos.labels + 1) % 10, photos.paths, [])
    elif change == "weights":
        model = small_vit(seed=4)
    else:
        model = small_vit(seed=3).double()
    df = _sweep(model, photos, sf.ResultStore(path), configs=configs)
    assert not df.cached.any()


def test_what_does_not_change_a_result_is_not_in_the_key(vit, photos, tmp_path):
    path = tmp_path / "store.npz"
    _sweep(vit, photos, sf.ResultStore(path, mode="record"), configs=CONFIGS[1:2])
    df = sweeps.sweep(vit, photos, CONFIGS[1:2], cache_dir=False, batch_size=7, progress=False,
                  n_boot=100, store=sf.ResultStore(path))
    assert df.cached.all()  # batch size (and device, versions, source) are not part of the key


def test_store_bypassed_with_given_dense_logits_or_kept_logits(vit, photos, tmp_path):
    path = tmp_path / "store.npz"
    _sweep(vit, photos, sf.ResultStore(path, mode="record"), configs=CONFIGS[1:2])
    other_dense = torch.randn(N, 10)
    assert not _sweep(vit, photos, sf.ResultStore(path), configs=CONFIGS[1:2], dense=other_dense).cached.any()
    assert not _sweep(vit, photos, sf.ResultStore(path), configs=CONFIGS[1:2], keep_logits=True).cached.any()


def test_book_store_modes(monkeypatch, tmp_path):
    monkeypatch.delenv("DSM_LITE_RESULTS", raising=False)
    s = sf.book_store()
    assert s.path == sf.BOOK_STORE and s.mode == "read"
    assert sf.book_store(recompute=True) is None
    monkeypatch.setenv("DSM_LITE_RESULTS", "off")
    assert sf.book_store() is None
    monkeypatch.setenv("DSM_LITE_RESULTS", f"record:{tmp_path / 'x.npz'}")
    s = sf.book_store(recompute=True)  # recording wins: a rebuild recomputes anyway
    assert s.mode == "record" and s.path == tmp_path / "x.npz"
    monkeypatch.setenv("DSM_LITE_RESULTS", f"extend:{tmp_path / 'y.npz'}")
    assert sf.book_store().mode == "extend"
    monkeypatch.setenv("DSM_LITE_RESULTS", "sometimes")
    with pytest.raises(ValueError, match="read, off, record"):
        sf.book_store()


def test_bad_input_gives_clear_errors(vit, photos, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="python -m dsm_lite.store rebuild"):
        len(sf.ResultStore(bad))
    with pytest.raises(RuntimeError, match="read-only"):
        sf.ResultStore(tmp_path / "s.npz").put("k", {}, {})
    with pytest.raises(ValueError, match="per-photo fields"):
        sf.ResultStore(tmp_path / "s.npz", mode="record").put("k", {"pred": np.zeros(2)}, {})
    with pytest.raises(ValueError, match="mode"):
        sf.ResultStore(tmp_path / "s.npz", mode="write")
    odd = _fake_arrays(np.random.default_rng(0), 3)
    odd["pred"] = odd["pred"] + 1  # pred is not stored but read back as top5[:, 0]: refused
    with pytest.raises(ValueError, match=r"top5\[:, 0\]"):
        sf.ResultStore(tmp_path / "s.npz", mode="record").put("k", odd, {})
    with pytest.raises(ValueError, match="needs an ImageSet"):
        sweeps.sweep(vit, photos.images, CONFIGS[1:2], labels=photos.labels, cache_dir=False,
                 progress=False, store=sf.ResultStore(tmp_path / "s.npz", mode="record"))
    assert not (tmp_path / "s.npz").exists()  # nothing half-written
    # a store of another format is refused, not misread
    path = tmp_path / "old.npz"
    _sweep(vit, photos, sf.ResultStore(path, mode="record"), configs=CONFIGS[1:2])
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["__meta__"] = np.array('{"format": 0}')
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="format 0"):
        len(sf.ResultStore(path))


# --------------------------------------------------------------------------- the shipped store
def test_shipped_store_matches_a_recomputation(with_assets):
    """Every entry of dsm_lite/results/book.npz, recomputed on 8 seeded photos (random-feature
    entries: their first recorded batch) with the pretrained model, in float64."""
    checked, bad = st.verify(sf.BOOK_STORE, n_photos=8, seed=0)
    assert checked == len(sf.ResultStore()) > 0
    assert not bad, ("the stored per-photo results no longer match what the code computes:\n"
                     + "\n".join(map(str, bad)) + f"\nrebuild them with `{sf.REBUILD_COMMAND}`")


def test_verify_catches_a_tampered_entry(with_assets, tmp_path):
    path = tmp_path / "book.npz"
    shutil.copy(sf.BOOK_STORE, path)
    store = sf.ResultStore(path, mode="record")
    key = next(k for k, e in store.entries().items()
               if e["__meta__"]["config"].get("method") == "dsm"
               and e["__meta__"]["config"].get("feature") == "k")
    entry = store.entries()[key]
    kl = entry["kl"].copy()
    kl += 1e-3  # every photo's KL off by 1e-3: far above float noise, far below a printed digit
    store.put(key, dict({f: entry[f] for f in sf.FIELDS}, kl=kl), entry["__meta__"])
    checked, bad = st.verify(path, n_photos=4, keys=[key])
    assert checked == 1 and len(bad) == 1 and bad[0].fields == ["kl"]
    assert 9e-4 < bad[0].max_kl_error < 1.1e-3


def test_rebuild_executes_notebooks_and_records_every_sweep(tmp_path, monkeypatch):
    import os

    import nbformat

    monkeypatch.delenv("DSM_LITE_RESULTS", raising=False)
    tests = os.path.dirname(os.path.abspath(__file__))
    code = f"""
import sys, torch
sys.path.insert(0, {tests!r})
from reference import small_vit
from dsm_lite import sweeps
from dsm_lite.data import ImageSet
from dsm_lite.store_format import book_store
g = torch.Generator().manual_seed(1)
x, y = torch.randn(6, 3, 64, 64, generator=g), torch.randint(0, 10, (6,), generator=g)
photos = ImageSet("imagenet-sample", x, y, [f"imagenet-sample/fake_{{i}}.JPEG" for i in range(6)], [])
df = sweeps.sweep(small_vit(seed=3), photos, {CONFIGS[:3]!r}, cache_dir=False, batch_size=4, progress=False,
              n_boot=10, store=book_store())
assert not df.cached.any()
"""
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    out = tmp_path / "store.npz"
    out.write_bytes(b"an old store, replaced only when the rebuild succeeds")
    st.rebuild([path], out=out)
    assert len(sf.ResultStore(out)) == 3 + 1
    assert "DSM_LITE_RESULTS" not in os.environ  # the recording mode ends with the rebuild
    assert not list(tmp_path.glob(".rebuild-*"))
    # a notebook that fails leaves the old store in place, and no temporary file behind
    before = out.read_bytes()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('boom')")]), path)
    with pytest.raises(Exception, match="boom"):
        st.rebuild([path], out=out)
    assert out.read_bytes() == before and not list(tmp_path.glob(".rebuild-*"))


def test_a_sweep_the_store_serves_decodes_no_photo(vit, photos, tmp_path):
    path = tmp_path / "store.npz"
    computed = _sweep(vit, photos, sf.ResultStore(path, mode="record"))
    decoded = []

    def decode(paths):
        decoded.extend(paths)
        return photos.images[[photos.paths.index(p) for p in paths]]

    lazy = ImageSet(photos.name, None, photos.labels, photos.paths, [], decode=decode, shape=photos.shape)
    served = _sweep(vit, lazy, sf.ResultStore(path))
    assert served.cached.all() and decoded == [] and lazy.decoded == 0
    _same_rows(served, computed)
    # an entry the store lacks decodes the photos, once
    more = _sweep(vit, lazy, sf.ResultStore(path), configs=[dict(method="tome", r=2)])
    assert not more.cached.any() and sorted(decoded) == sorted(photos.paths)
