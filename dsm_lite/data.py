"""The three ImageNet-labelled photo sets of the book, preprocessed with timm's data config.

- ``imagenet-sample``: 1000 JPEGs, one per ImageNet-1k class (EliSchwartz/imagenet-sample-images),
  most likely ImageNet *training* photos.
- ``imagenette-val``: 3925 JPEGs of 10 classes (Imagenette's validation split, thunderInfy/imagenette),
  mostly ImageNet training photos; 134 are ILSVRC2012 validation photos (:func:`ilsvrc_val_files`).
- ``ilsvrc2012-val``: 1299 genuine ILSVRC2012 *validation* photos of 725 classes, in WordNet-id
  folders (the folder is the label, the official validation ground truth), from
  VeriSilicon/acuity-dataset (``ILSVRC2012_VAL_SET/data/``). Its publisher resized every photo to
  227x227, squashing its aspect ratio, and how the photos were chosen is undocumented: they are
  easier than the full validation set (the ViT-Ti's top-1 is several points above timm's 75.45% on
  all 50,000), so use them for paired comparisons between methods, not for absolute accuracy.
  Disjoint from imagenette-val (the one photo both held is left out here).

Files come from ``$DSM_LITE_ASSETS`` when set, else they are downloaded (only those needed,
16 at a time, with one progress bar) and sha256-checked into ``$DSM_LITE_CACHE`` (see
:mod:`dsm_lite.assets`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import timm.data
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from .assets import DEFAULT_MODEL, AssetNotFoundError, assets_dir, fetch, fetch_many, manifest

__all__ = ["DATASETS", "UNSEEN", "ImageSet", "CorruptImageError", "load_images", "load_photos", "load_photo", "ilsvrc_val_files",
           "list_files", "class_names", "data_config", "image_tensor"]

DATASETS = ("imagenet-sample", "imagenette-val", "ilsvrc2012-val")
#: the one set of photos no ImageNet-1k model trained on
UNSEEN = "ilsvrc2012-val"


class CorruptImageError(RuntimeError):
    """An image file cannot be decoded (truncated or not an image)."""


class ImageSet:
    """A preprocessed photo set whose pixels are decoded on first use.

    Paths and labels are known up front; the photos are read, decoded and preprocessed only
    when pixels are asked for: all of them by :attr:`images`, or just some by :meth:`take`. A
    chapter whose sweeps the results store serves thus decodes only the photos it draws.

    Attributes:
        images: (N, 3, H, W) in the default dtype of :func:`load_images`'s call (float32,
            float64 under :func:`dsm_lite.book_numerics`), normalised with the model's mean/std, on the CPU (the
            package's functions move each batch to the model's device themselves); decoded
            on first access, then kept.
        labels: (N,) int64 ImageNet-1k class indices, on the CPU.
        paths: N relative paths (``<set>/<file>``), as in the assets folder.
        class_names: the 1000 ImageNet-1k class names (``class_names[labels[i]]``).
        labels10: for imagenette-val, the 10-way index (N,).
        classes10: for imagenette-val, the 10 ImageNet indices.
        shape, dtype: those of :attr:`images`, known without decoding.
    """

    def __init__(self, name: str, images: Optional[torch.Tensor], labels: torch.Tensor, paths: List[str],
                 class_names: List[str], labels10: Optional[torch.Tensor] = None,
                 classes10: Optional[List[int]] = None, *,
                 decode: Optional[Callable[[List[str]], torch.Tensor]] = None,
                 shape: Optional[Tuple[int, ...]] = None, dtype: torch.dtype = torch.float32):
        if (images is None) == (decode is None):
            raise ValueError("give an ImageSet either its images or a decode function, not both")
        if images is None and (shape is None or shape[0] != len(paths)):
            raise ValueError(f"a lazily decoded ImageSet needs shape (N, 3, H, W) with N = {len(paths)}")
        self.name, self.labels, self.paths, self.class_names = name, labels, paths, class_names
        self.labels10, self.classes10 = labels10, classes10
        self._images, self._decode = images, decode
        self._shape = tuple(images.shape) if images is not None else tuple(shape)
        self._dtype = images.dtype if images is not None else dtype
        self._decoded: Dict[int, torch.Tensor] = {}  # photos decoded one by one, by index

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"ImageSet({self.name!r}, {len(self)} photos, {self.decoded} decoded, "
                f"shape={self.shape})")

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def decoded(self) -> int:
        """How many photos have been decoded so far."""
        return len(self) if self._images is not None else len(self._decoded)

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            everything = list(range(len(self)))
            # decoded straight into one tensor: all photos of a set can be gigabytes
            self._images = self._decode(self.paths) if not self._decoded else self._pixels(everything)
            self._decoded.clear()
        return self._images

    def take(self, index) -> torch.Tensor:
        """(k, 3, H, W) pixels of the photos at ``index`` (ints, a slice, an index tensor or
        a boolean mask), decoding only those: ``photos.take(idx)`` equals ``photos.images[idx]``."""
        if self._images is not None:
            return self._images[index]
        picked = torch.arange(len(self))[index]
        return self._pixels(picked.reshape(-1).tolist()).reshape(*picked.shape, *self._shape[1:])

    def _pixels(self, idx: List[int]) -> torch.Tensor:
        missing = [i for i in dict.fromkeys(idx) if i not in self._decoded]
        if missing:
            x = self._decode([self.paths[i] for i in missing])
            if tuple(x.shape[1:]) != self._shape[1:] or x.dtype != self._dtype:
                raise RuntimeError(f"decoded photos are {tuple(x.shape[1:])} {x.dtype}, expected "
                                   f"{self._shape[1:]} {self._dtype}")
            self._decoded.update(zip(missing, x))
        if not idx:
            return torch.empty((0, *self._shape[1:]), dtype=self._dtype)
        return torch.stack([self._decoded[i] for i in idx])


@lru_cache(maxsize=None)
def _imagenet_info() -> timm.data.ImageNetInfo:
    return timm.data.ImageNetInfo("imagenet-1k")


def class_names() -> List[str]:
    """Short human-readable names of the 1000 ImageNet-1k classes (first WordNet lemma)."""
    return [d.split(",")[0].strip() for d in _imagenet_info().label_descriptions()]


def _label(rel: str) -> int:
    """ImageNet-1k index of a file, from the WordNet id that starts its name or folder."""
    return _wnid_to_index()[rel.split("/")[1].split("_")[0]]


@lru_cache(maxsize=None)
def _wnid_to_index() -> Dict[str, int]:
    return {w: i for i, w in enumerate(_imagenet_info().label_names())}


def _files(name: str) -> Dict[str, str]:
    if name not in DATASETS:
        raise ValueError(f"Unknown image set {name!r}; choose one of {DATASETS}.")
    return manifest(name)


def list_files(name: str = "imagenet-sample") -> List[str]:
    """All files of an image set, as sorted relative paths (``<set>/...``); nothing is downloaded."""
    return list(_files(name))


def data_config(model: Union[nn.Module, Dict[str, Any], str, None] = None) -> Dict[str, Any]:
    """timm's eval data config for ``model`` (a module, a config dict, a model name, or None = default ViT-Ti)."""
    if isinstance(model, dict):
        return model
    if isinstance(model, nn.Module):
        return timm.data.resolve_model_data_config(model)
    cfg = timm.models.get_pretrained_cfg(model or DEFAULT_MODEL)
    return timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())


def image_tensor(images) -> torch.Tensor:
    """The (N, 3, H, W) tensor of an ``ImageSet`` (its ``images``) or of a bare tensor."""
    return images.images if hasattr(images, "images") else images


def _asset_path(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise AssetNotFoundError(f"{path} not found; DSM_LITE_ASSETS={root} lacks it.")
    return path


def _local_path(rel: str, sha256: str, base_url: Optional[str]) -> Path:
    root = assets_dir()
    return fetch(rel, sha256, base_url=base_url) if root is None else _asset_path(root, rel)


def _local_paths(name: str, rels: List[str], base_url: Optional[str]) -> List[Path]:
    """Paths of ``rels`` of set ``name``: in ``$DSM_LITE_ASSETS``, else downloaded into the cache."""
    root = assets_dir()
    if root is not None:
        return [_asset_path(root, r) for r in rels]
    files = _files(name)
    got = fetch_many({r: files[r] for r in rels}, base_url=base_url, desc=f"Downloading {name}")
    return [got[r] for r in rels]


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here rather than in a transform
            return img.convert("RGB")  # some ImageNet photos are greyscale
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise CorruptImageError(f"Cannot decode image {path}: {e}") from None


def _choose(rels: List[str], n: Optional[int], seed: int, stratified: bool) -> List[str]:
    """A seeded subset of ``rels`` of size ``n``, kept in manifest order.

    Stratified: classes get ``n // C`` or one more photo each (which classes get the extra
    one is seeded), so subsets stay class-balanced.
    """
    if n is None:
        return rels
    if not 0 < n <= len(rels):
        raise ValueError(f"n={n} photos asked for, but the set has {len(rels)}; use n <= {len(rels)}.")
    rng = np.random.default_rng(seed)
    if not stratified:
        return [rels[i] for i in sorted(rng.choice(len(rels), size=n, replace=False))]
    by_class: Dict[int, List[int]] = {}
    for i, r in enumerate(rels):
        by_class.setdefault(_label(r), []).append(i)
    classes = sorted(by_class)
    quota = {c: n // len(classes) for c in classes}
    for c in rng.permutation(classes)[: n % len(classes)]:
        quota[int(c)] += 1
    short = [c for c in classes if quota[c] > len(by_class[c])]
    if short:
        raise ValueError(f"n={n} needs {quota[short[0]]} photos of class {short[0]}, which has "
                         f"{len(by_class[short[0]])}; use stratified=False or a smaller n.")
    chosen = [int(i) for c in classes for i in rng.choice(by_class[c], size=quota[c], replace=False)]
    return [rels[i] for i in sorted(chosen)]


def load_images(
    name: str = "imagenet-sample",
    model: Union[nn.Module, Dict[str, Any], str, None] = None,
    n: Optional[int] = None,
    seed: int = 0,
    stratified: bool = True,
    base_url: Optional[str] = None,
    files: Optional[List[str]] = None,
) -> ImageSet:
    """Load and preprocess ``n`` photos of ``name`` (all when None) for ``model``.

    Preprocessing is timm's eval transform for the model's data config (for the default
    ViT-Ti: resize 248 bicubic, centre crop 224, mean = std = 0.5). The subset is seeded
    and, when ``stratified``, class-balanced; ``files`` (relative paths of the set, e.g. from
    :func:`ilsvrc_val_files`) picks exactly those photos instead, in the set's order.
    ``base_url`` (or ``$DSM_LITE_DATA_URL``) replaces the public sources by a mirror laid out
    like the assets folder. The tensors are on the CPU, whatever device ``model`` is on.

    Nothing is decoded (or downloaded) here: the set's pixels are decoded when first asked
    for (:attr:`ImageSet.images`, or :meth:`ImageSet.take` for a few), so a
    :class:`CorruptImageError` surfaces then. With ``$DSM_LITE_ASSETS`` set, a missing file
    fails here.
    """
    files_all = _files(name)
    if files is not None:
        unknown = sorted(set(files) - set(files_all))
        if unknown:
            raise ValueError(f"{len(unknown)} file(s) are not photos of {name!r}, e.g. {unknown[0]!r}")
        wanted = set(files)
        rels = [r for r in files_all if r in wanted]
    else:
        rels = _choose(list(files_all), n, seed, stratified)
    if assets_dir() is not None:
        _local_paths(name, rels, base_url)  # a missing file fails now, not when first drawn
    config, dtype = data_config(model), torch.get_default_dtype()
    labels = torch.tensor([_label(r) for r in rels], dtype=torch.long)
    out = ImageSet(name, None, labels, rels, class_names(), shape=(len(rels), *config["input_size"]),
                   dtype=dtype,
                   decode=lambda chosen: _preprocess(_local_paths(name, chosen, base_url), config, dtype))
    if name == "imagenette-val":
        out.classes10 = sorted({_label(r) for r in files_all})
        out.labels10 = torch.tensor([out.classes10.index(int(l)) for l in labels], dtype=torch.long)
    return out


def ilsvrc_val_files() -> List[str]:
    """The 134 photos of imagenette-val that are ILSVRC2012 *validation* images (their file names
    say so: ``ILSVRC2012_val_*``), disjoint from the ``ilsvrc2012-val`` set: a second, smaller
    check on photos the model never trained on."""
    return [r for r in _files("imagenette-val") if Path(r).name.startswith("ILSVRC2012_val_")]


def _preprocess(paths: List[Path], model, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(N, 3, H, W): the files decoded and run through timm's eval transform, in ``dtype`` (the
    transform's float type; default: torch's default dtype now)."""
    transform = timm.data.create_transform(**data_config(model), is_training=False)
    if dtype is not None and dtype != torch.get_default_dtype():
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the transform converts to the default float type
        try:
            return _preprocess(paths, model)
        finally:
            torch.set_default_dtype(before)

    def prep(path: Path) -> torch.Tensor:
        return transform(_open_rgb(path))

    # PIL decodes and resizes with the GIL released, so threads give a real speed-up. Each
    # photo is copied into one preallocated tensor as it arrives: every photo of both sets is
    # 3 GB, and stacking a list would hold it twice.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        out: Optional[torch.Tensor] = None
        for i, x in enumerate(pool.map(prep, paths)):
            if out is None:
                out = torch.empty((len(paths), *x.shape), dtype=x.dtype)
            out[i] = x
    if out is None:
        raise ValueError("no photos to load")
    return out


def load_photos(rels: List[str], model: Union[nn.Module, Dict[str, Any], str, None] = None,
                base_url: Optional[str] = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """Given photos by relative path (as in :attr:`ImageSet.paths`), preprocessed exactly as
    :func:`load_images` does: images (N, 3, H, W) float32 and labels (N,) int64, on the CPU."""
    by_set: Dict[str, List[str]] = {}
    for r in rels:
        group = r.split("/")[0]
        if group not in DATASETS or r not in _files(group):
            raise ValueError(f"{r!r} is not a photo of {DATASETS}")
        by_set.setdefault(group, []).append(r)
    where = {r: p for g, rs in by_set.items() for r, p in zip(rs, _local_paths(g, rs, base_url))}
    images = _preprocess([where[r] for r in rels], model)
    return images, torch.tensor([_label(r) for r in rels], dtype=torch.long)


def load_photo(
    path_or_index: Union[str, os.PathLike, int], name: str = "imagenet-sample", base_url: Optional[str] = None
) -> Image.Image:
    """One raw RGB photo (PIL), for visualisations.

    ``path_or_index``: an index into the set's sorted files, a relative path as in
    :attr:`ImageSet.paths`, or any image file on disk.
    """
    if isinstance(path_or_index, int):
        files = _files(name)
        rel = list(files)[path_or_index]
        return _open_rgb(_local_path(rel, files[rel], base_url))
    rel = str(path_or_index)
    group = rel.split("/")[0]
    if group in DATASETS and rel in _files(group):
        return _open_rgb(_local_path(rel, manifest(group)[rel], base_url))
    if not Path(rel).is_file():
        raise FileNotFoundError(f"{rel} is neither a file nor a photo of {DATASETS}.")
    return _open_rgb(Path(rel))
