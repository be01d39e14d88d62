"""load_images / load_photo: labels, subsets, odd files, and the verified download path."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from dsm_lite.assets import ChecksumError, DownloadError, fetch, manifest
from dsm_lite.data import (CorruptImageError, _choose, class_names, ilsvrc_val_files, load_images, load_photo,
                           load_photos)

APOSTROPHE = "imagenet-sample/n03590841_jack-o'-lantern.JPEG"
GREY = "imagenet-sample/n02096051_Airedale.JPEG"


def test_manifest_is_complete() -> None:
    assert len(manifest("imagenet-sample")) == 1000 and len(manifest("imagenette-val")) == 3925
    assert len(manifest("weights")) == 1 and len(manifest("ilsvrc2012-val")) == 1299


def test_imagenet_sample_labels_follow_sorted_order(with_assets: Path) -> None:
    s = load_images("imagenet-sample", n=None, seed=0)
    assert s.images.shape == (1000, 3, 224, 224) and s.images.dtype == torch.float32
    assert torch.equal(s.labels, torch.arange(1000))  # sorted file names = class-index order
    assert s.paths == sorted(s.paths)
    assert s.class_names[0] == "tench" and len(s.class_names) == 1000
    assert -1.0 <= s.images.min() and s.images.max() <= 1.0  # mean = std = 0.5


def test_imagenette_labels(with_assets: Path) -> None:
    s = load_images("imagenette-val", n=20, seed=1)
    assert s.classes10 == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert torch.equal(s.labels, torch.tensor(s.classes10)[s.labels10])
    assert s.labels10.bincount().tolist() == [2] * 10
    names = [class_names()[i] for i in s.classes10]
    assert names[:3] == ["tench", "English springer", "cassette player"]


def test_stratified_subset_deterministic_and_balanced(with_assets: Path) -> None:
    rels = list(manifest("imagenette-val"))
    a, b = _choose(rels, 55, 3, True), _choose(rels, 55, 3, True)
    assert a == b and a != _choose(rels, 55, 4, True)
    counts = torch.tensor([int(r.split("/")[1] == w) for r in a for w in sorted({r.split("/")[1] for r in rels})])
    per_class = counts.view(55, 10).sum(0)
    assert per_class.max() - per_class.min() <= 1 and per_class.sum() == 55
    s1, s2 = load_images("imagenet-sample", n=8, seed=5), load_images("imagenet-sample", n=8, seed=5)
    assert s1.paths == s2.paths and torch.equal(s1.images, s2.images)
    assert len(set(s1.labels.tolist())) == 8


def test_ilsvrc_val_files_and_chosen_files(with_assets: Path) -> None:
    val = ilsvrc_val_files()
    everything = list(manifest("imagenette-val"))
    # independent: every file whose name says it is an ILSVRC2012 validation image, by a regex
    import re
    expected = [r for r in everything if re.fullmatch(r"imagenette-val/n\d{8}/ILSVRC2012_val_\d{8}\.JPEG", r)]
    assert val == expected and len(val) == 134
    pick = [val[5], val[0], val[77]]
    s = load_images("imagenette-val", files=pick)
    assert s.paths == [val[0], val[5], val[77]]  # the set's order, whatever order they were asked in
    assert s.labels10 is not None and torch.equal(s.labels, torch.tensor(s.classes10)[s.labels10])
    # the same photos, preprocessed the same way, as load_photos and the seeded subsets give them
    images, labels = load_photos(s.paths)
    assert torch.equal(images, s.images) and torch.equal(labels, s.labels)
    sub = load_images("imagenette-val", n=30, seed=2)
    again = load_images("imagenette-val", files=sub.paths)
    assert torch.equal(again.images, sub.images) and again.paths == sub.paths
    with pytest.raises(ValueError, match="not photos of 'imagenet-sample'"):
        load_images("imagenet-sample", files=pick)
    with pytest.raises(ValueError, match="is not a photo of"):
        load_photos(["imagenette-val/n01440764/nothing.JPEG"])


def test_n_too_large(with_assets: Path) -> None:
    with pytest.raises(ValueError, match="has 1000"):
        load_images("imagenet-sample", n=1001)
    with pytest.raises(ValueError, match="Unknown image set"):
        load_images("imagenet-full")


def test_greyscale_and_apostrophe(with_assets: Path) -> None:
    for rel in (GREY, APOSTROPHE):
        img = load_photo(rel)
        assert img.mode == "RGB" and min(img.size) > 100
    assert load_photo(0).size == load_photo("imagenet-sample/n01440764_tench.JPEG").size


def test_corrupt_image(tmp_path: Path, with_assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "truncated.JPEG"
    bad.write_bytes((with_assets / GREY).read_bytes()[:2000])
    with pytest.raises(CorruptImageError, match="truncated.JPEG"):
        load_photo(bad)
    # Through load_images too: a fake assets folder whose chosen photo is truncated.
    fake = tmp_path / "assets"
    (fake / "imagenet-sample").mkdir(parents=True)
    rels = _choose(list(manifest("imagenet-sample")), 2, 0, True)
    (fake / rels[0]).symlink_to(with_assets / rels[0])
    (fake / rels[1]).write_bytes((with_assets / rels[1]).read_bytes()[:1000])
    monkeypatch.setenv("DSM_LITE_ASSETS", str(fake))
    lazy = load_images("imagenet-sample", n=2, seed=0)  # decoded on first use, not here
    assert lazy.take([0]).shape == (1, 3, 224, 224)    # the good photo decodes alone
    with pytest.raises(CorruptImageError, match=rels[1].split("/")[1]):
        lazy.images
    with pytest.raises(CorruptImageError, match=rels[1].split("/")[1]):
        lazy.take([1])
    assert lazy.decoded == 1  # nothing half-decoded was kept


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DSM_LITE_ASSETS", raising=False)
    monkeypatch.delenv("DSM_LITE_DATA_URL", raising=False)
    monkeypatch.setenv("DSM_LITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_from_mirror(real_assets: Path, offline_cache: Path, serve, monkeypatch) -> None:
    monkeypatch.setenv("DSM_LITE_DATA_URL", serve(real_assets))
    s = load_images("imagenette-val", n=10, seed=0)
    assert len(s) == 10 and s.labels10.tolist() == list(range(10))
    assert not any(p.is_file() for p in offline_cache.rglob("*"))  # nothing fetched before it is needed
    s.take([0, 1])
    assert sorted(p.name for p in offline_cache.rglob("*") if p.is_file()) == sorted(
        r.rsplit("/", 1)[1] for r in s.paths[:2])
    s.images
    downloaded = sorted(p.relative_to(offline_cache).as_posix() for p in offline_cache.rglob("*") if p.is_file())
    assert downloaded == sorted(s.paths)  # only what the subset needs, nothing partial
    assert load_photo(APOSTROPHE).mode == "RGB"  # URL-quoted name
    for rel in [*s.paths, APOSTROPHE]:
        assert hashlib.sha256((offline_cache / rel).read_bytes()).hexdigest() == manifest(rel.split("/")[0])[rel]


def test_download_checksum_mismatch_and_404(real_assets: Path, offline_cache: Path, serve, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror" / "imagenet-sample"
    mirror.mkdir(parents=True)
    rel_bad, rel_missing = "imagenet-sample/n01440764_tench.JPEG", "imagenet-sample/n01443537_goldfish.JPEG"
    shutil.copy(real_assets / GREY, tmp_path / "mirror" / rel_bad)  # a valid JPEG, but the wrong one
    url = serve(tmp_path / "mirror")
    files = manifest("imagenet-sample")
    with pytest.raises(ChecksumError, match="expected"):
        fetch(rel_bad, files[rel_bad], base_url=url)
    with pytest.raises(DownloadError, match="404"):
        fetch(rel_missing, files[rel_missing], base_url=url)
    with pytest.raises(DownloadError, match="404"):
        load_images("imagenet-sample", n=3, base_url=url).images  # downloaded when first decoded
    leftovers = [p for p in offline_cache.rglob("*") if p.is_file()]
    assert leftovers == []


# --------------------------------------------------------------------------- ilsvrc2012-val
UNSEEN_WNIDS = {"n01440764": 0, "n01443537": 1, "n15075141": 999}  # tench, goldfish, toilet tissue


def test_ilsvrc2012_val_manifest() -> None:
    files = manifest("ilsvrc2012-val")
    assert len(files) == 1299
    assert len({r.split("/")[1] for r in files}) == 725
    import re
    assert all(re.fullmatch(r"ilsvrc2012-val/n\d{8}/ILSVRC2012_val_\d{8}\.JPEG", r) for r in files)
    # disjoint from the validation photos inside imagenette-val, by file name
    assert not {r.rsplit("/", 1)[1] for r in files} & {r.rsplit("/", 1)[1] for r in ilsvrc_val_files()}


def test_ilsvrc2012_val_labels_from_folders(with_assets: Path) -> None:
    rels = [r for r in manifest("ilsvrc2012-val") if r.split("/")[1] in UNSEEN_WNIDS]
    s = load_images("ilsvrc2012-val", files=rels)
    # independent of the package's lookup: three WordNet ids whose class indices are well known
    assert s.labels.tolist() == [UNSEEN_WNIDS[r.split("/")[1]] for r in rels]
    assert s.images.shape == (len(rels), 3, 224, 224)  # 227x227 photos, resized and cropped as usual
    whole = load_images("ilsvrc2012-val", n=30, seed=0)
    assert len(whole) == 30 and len(set(whole.labels.tolist())) == 30  # stratified: 30 classes
    assert whole.labels10 is None


def test_ilsvrc2012_val_missing_or_corrupt_file(tmp_path: Path, with_assets: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dsm_lite.assets import AssetNotFoundError
    rels = list(manifest("ilsvrc2012-val"))[:3]
    fake = tmp_path / "assets"
    for r in rels[:2]:
        (fake / r).parent.mkdir(parents=True, exist_ok=True)
        (fake / r).symlink_to(with_assets / r)
    monkeypatch.setenv("DSM_LITE_ASSETS", str(fake))
    with pytest.raises(AssetNotFoundError, match=rels[2].rsplit("/", 1)[1]):
        load_images("ilsvrc2012-val", files=rels)
    (fake / rels[1]).unlink()
    (fake / rels[1]).write_bytes((with_assets / rels[1]).read_bytes()[:700])
    with pytest.raises(CorruptImageError, match=rels[1].rsplit("/", 1)[1]):
        load_images("ilsvrc2012-val", files=rels[:2]).images


def test_ilsvrc2012_val_downloads_from_its_flat_public_home(real_assets: Path, tmp_path: Path, serve,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The public source keeps every photo in one folder; the cache sorts them by label."""
    from dsm_lite import assets
    rels = list(manifest("ilsvrc2012-val"))[::400]
    flat = tmp_path / "flat"
    flat.mkdir()
    for r in rels:
        shutil.copy(real_assets / r, flat / r.rsplit("/", 1)[1])
    monkeypatch.delenv("DSM_LITE_ASSETS", raising=False)
    monkeypatch.delenv("DSM_LITE_DATA_URL", raising=False)
    monkeypatch.setenv("DSM_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(assets.SOURCES, "ilsvrc2012-val", serve(flat).rstrip("/") + "/")
    s = load_images("ilsvrc2012-val", files=rels)
    assert s.paths == rels and s.images.shape[0] == len(rels)
    for r in rels:
        got = tmp_path / "cache" / r
        assert hashlib.sha256(got.read_bytes()).hexdigest() == manifest("ilsvrc2012-val")[r]
    assert assets._source_url(rels[0], None).endswith("/" + rels[0].rsplit("/", 1)[1])


# --------------------------------------------------------------------------- lazy decoding
def test_photos_are_decoded_only_when_drawn(with_assets: Path) -> None:
    lazy = load_images("imagenette-val", n=30, seed=2)
    assert lazy.decoded == 0 and lazy.shape == (30, 3, 224, 224) and lazy.dtype == torch.float32
    eager, labels = load_photos(lazy.paths)  # the same photos, decoded at once
    idx = torch.tensor([7, 3, 7])
    assert torch.equal(lazy.take(idx), eager[idx]) and lazy.decoded == 2  # a repeat decodes once
    assert torch.equal(lazy.take(slice(2, 5)), eager[2:5]) and lazy.decoded == 4  # 3 was decoded
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[0, 29]] = True
    assert torch.equal(lazy.take(mask), eager[mask]) and lazy.take([]).shape == (0, 3, 224, 224)
    assert torch.equal(lazy.take(4), eager[4])  # one index: one photo, no batch dimension
    assert torch.equal(lazy.images, eager) and lazy.decoded == 30  # the rest joins what is decoded
    assert torch.equal(lazy.labels, labels)
    assert torch.equal(lazy.take(idx), eager[idx])  # served from the whole tensor now


def test_lazy_photos_keep_the_dtype_they_were_loaded_under(with_assets: Path) -> None:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lazy = load_images("imagenet-sample", n=3, seed=1)
        eager = load_photos(lazy.paths)[0]
    finally:
        torch.set_default_dtype(before)
    assert lazy.dtype == torch.float64 and lazy.decoded == 0
    assert torch.equal(lazy.images, eager) and eager.dtype == torch.float64  # decoded later, in float32 default


def test_an_image_set_needs_pixels_or_a_way_to_decode_them() -> None:
    from dsm_lite.data import ImageSet
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="either its images or a decode function"):
        ImageSet("imagenet-sample", x, torch.zeros(2), ["a", "b"], [], decode=lambda paths: x)
    with pytest.raises(ValueError, match="needs shape"):
        ImageSet("imagenet-sample", None, torch.zeros(2), ["a", "b"], [], decode=lambda paths: x)
    wrong = ImageSet("imagenet-sample", None, torch.zeros(2), ["a", "b"], [], shape=(2, 3, 4, 4),
                     decode=lambda paths: torch.zeros(len(paths), 3, 8, 8))
    with pytest.raises(RuntimeError, match="expected"):
        wrong.take([0])
