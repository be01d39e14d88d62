"""Sweeps: many merging configs on one photo set, one tidy DataFrame, cached and stored.

- :func:`sweep`: one row per config (method, r, options) with GMACs, accuracy, agreement and
  KL, each with a bootstrap interval over photos, and the per-photo :class:`EvalResult`.
- :func:`summary_table`: those rows for reading, one unit per column.
- The results store (:mod:`dsm_lite.store_format`): the book's per-photo results, read instead of
  running the model when the photos, weights and config match exactly.
- The disk cache (:func:`sweep_cache_dir`): per-config, per-photo results of this machine,
  keyed by the store's key (:func:`dsm_lite.store_format.result_key`) on a context that adds
  everything else that could change them (dsm_lite's source, versions, device, batch size).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import timm
import torch
from torch import Tensor, nn

from . import stats
from .assets import atomic_write, cache_dir
from .data import data_config, image_tensor
from .devices import model_device
from .evaluation import METRIC_FIELDS, EvalResult, dense_logits, per_image_metrics
from .measure import interleaved_throughput
from .models import predict, weights_fingerprint
from .numerics import widen
from .progress import progress_bar
from .schedules import MergeOptions
from . import patching
from .patching import patch, repatch, unpatch, unpatched
from .store_format import key_blob, result_key

__all__ = ["sweep", "summary_table", "sweep_cache_dir", "code_hash", "images_hash", "METRIC_COLUMNS"]

#: 2: files named by :func:`~dsm_lite.store_format.result_key`, the store's key
CACHE_FORMAT = 2
#: patch() options left out of cache keys: they do not change a forward pass's outputs, or
#: (backend) only at float32 rounding, the merge decisions being the same.
_NON_RESULT_OPTIONS = ("trace_source", "backend")


def _float_vector(x) -> np.ndarray:
    """(N,) float64 per-photo values (bools as 0/1) of a non-empty 1-D array or tensor."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"x must be a non-empty 1-D array, got shape {x.shape}")
    return x


# --------------------------------------------------------------------------- cache keys
def sweep_cache_dir() -> Path:
    """Default sweep cache: ``$DSM_LITE_CACHE/sweeps``, else ``~/.cache/dsm_lite/sweeps``."""
    return cache_dir() / "sweeps"


def code_hash() -> str:
    """sha256 (16 hex digits) of every .py file of the dsm_lite package, with its path."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def images_hash(images, labels: Optional[Tensor] = None) -> str:
    """sha256 (16 hex digits) of the image tensor's bytes (shape and dtype included) and labels."""
    x = image_tensor(images).detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|".encode())
    h.update(x.numpy().tobytes())
    if labels is not None:
        h.update(b"labels|" + labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _tensor_hash(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


@lru_cache(maxsize=None)
def _patch_defaults() -> Dict[str, Any]:
    """Every patch option but method and r, with its default (the fields of MergeOptions)."""
    return {f.name: f.default for f in dataclasses.fields(MergeOptions)
            if f.name not in ("method", "r") + _NON_RESULT_OPTIONS}


def _normalise_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config with every patch option spelled out (defaults filled in); ``label`` dropped."""
    cfg = {k: v for k, v in config.items() if k not in ("label",) + _NON_RESULT_OPTIONS}
    unknown = set(cfg) - {"method", "r"} - set(_patch_defaults())
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; use method, r, label and "
                         f"options of dsm_lite.patch: {sorted(_patch_defaults())}")
    out = {"method": cfg.get("method", "tome"), "r": cfg.get("r", 0)}
    for k, default in _patch_defaults().items():
        out[k] = cfg.get(k, default)
    return out


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _unpatched_class(model: nn.Module) -> type:
    """The model's class as timm made it, patched or not (``patch`` records it)."""
    return getattr(type(model), "_dsm_original", type(model))


def _model_context(model: nn.Module) -> Dict[str, str]:
    """What the store's and the cache's keys both say of the model: weights, class and dtype."""
    return dict(weights=weights_fingerprint(model), model_class=_unpatched_class(model).__name__,
                dtype=str(next(model.parameters()).dtype))


def _cache_context(model: nn.Module, images, labels, batch_size: int) -> Dict[str, Any]:
    """The cache's key context: the model's, the photos' pixels and labels, and what the store
    leaves out because :func:`dsm_lite.store.verify` checks it (source, versions, device, batch)."""
    return dict(_model_context(model), format=CACHE_FORMAT, images=images_hash(images, labels), code=code_hash(),
                torch=torch.__version__, timm=timm.__version__, device=next(model.parameters()).device.type,
                batch_size=batch_size)


def _save_npz(path: Path, arrays: Dict[str, np.ndarray], meta: str) -> None:
    """Write atomically (:func:`~dsm_lite.assets.atomic_write`)."""
    with atomic_write(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, __meta__=np.array(meta), **arrays)


def _load_npz(path: Path, meta: str, n: int) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a cache file, or None if it is missing, corrupt, or for another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["__meta__"]) != meta:
                return None
            arrays = {k: z[k] for k in z.files if k != "__meta__"}  # reads (and CRC-checks) all
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RuntimeError):
        return None
    if any(len(v) != n for v in arrays.values()):
        return None
    return arrays


# --------------------------------------------------------------------------- sweep
#: the per-photo metrics a sweep reports, each with a bootstrap interval (:data:`dsm_lite.evaluation.METRIC_FIELDS`)
METRIC_COLUMNS = tuple(METRIC_FIELDS)


def sweep(model: nn.Module, images, configs: Sequence[Dict[str, Any]],
          cache_dir: Union[str, os.PathLike, None, bool] = None, dense: Optional[Tensor] = None,
          labels: Optional[Tensor] = None, batch_size: int = 64, progress: bool = True, n_boot: int = 2000,
          seed: int = 0, throughput: Union[bool, Dict[str, Any]] = False, keep_logits: bool = False, store=None):
    """Evaluate many merging configs on one photo set; a tidy DataFrame, one row per config.

    Args:
        model: a timm ViT (patched or not); it is left exactly as it was found.
        images: an ``ImageSet`` (labels from it) or an (N, 3, H, W) tensor with ``labels``.
        configs: dicts of ``method`` (default "tome"), ``r`` and any ``dsm_lite.patch`` option,
            e.g. ``dict(method="dsm", r=16, delay=2)``; an optional ``label`` names the curve.
        cache_dir: where per-config, per-photo results are cached (default
            :func:`sweep_cache_dir`); ``False`` disables the cache. An entry is keyed by everything
            that could change it (see the module's notes); files are written atomically and
            unreadable or mismatching files are recomputed, so a stale entry is never served.
        dense: (N, K) dense logits on these photos (any device); computed (and cached) when None.
        batch_size: photos per forward pass.
        progress: tqdm bars on stderr (pass False in notebooks).
        n_boot, seed: bootstrap over photos for the ``*_lo``/``*_hi`` columns.
        throughput: False, True or kwargs of :func:`dsm_lite.interleaved_throughput` (e.g.
            ``dict(batch_size=32, runs=50)``): adds ``throughput`` and ``throughput_std``
            columns (images/s, never cached, machine-dependent).
        keep_logits: keep the (N, K) logits in each row's ``result`` (the store has none, so
            every config is then computed or read from the cache).
        store: a :class:`dsm_lite.store_format.ResultStore` (the book passes
            :func:`dsm_lite.store_format.book_store`): configs it holds for these photos and weights
            are read from it, not run; in record mode every result is added to it. Bypassed
            when ``dense`` is given.

    Returns:
        DataFrame with columns ``label, method, r, delay, prop_attn, feature, reduction,
        window, window_growth, local_blocks, windows, seed`` (options, defaults resolved; ``delay``
        as the schedule resolves it), ``gmacs`` (GMACs per image, from the schedule, equal to
        ``count_macs``), ``tokens_out`` (tokens leaving the last block), ``n`` (photos),
        ``top1, top5, agreement`` (shares in [0, 1]), ``kl`` (mean KL(dense || merged), nats),
        each with ``<metric>_lo``/``<metric>_hi`` (percentile bootstrap 95% CI over photos),
        ``d_top1, d_top1_lo, d_top1_hi`` (top-1 minus the dense model's, paired bootstrap),
        ``cached`` (served from the store or the cache), optionally ``throughput, throughput_std``, and
        ``result``: the per-photo :class:`EvalResult` (for :func:`dsm_lite.stats.paired_bootstrap`).
    """
    sources = _Sources(model, images, labels, dense, _SweepCache(cache_dir), store, batch_size, progress)
    with unpatched(model):  # the sweep patches each config itself; the caller's patch comes back
        configs = list(configs)
        rows = _rows(sources, configs, keep_logits, n_boot, seed)
        if throughput:
            _add_throughput(model, configs, rows, throughput)
    return pd.DataFrame(rows)


def _rows(sources: _Sources, configs: List[Dict[str, Any]], keep_logits: bool, n_boot: int,
          seed: int) -> List[Dict[str, Any]]:
    """One :func:`_row` per config, each result from the store, the cache or the model."""
    dense_correct = sources.dense_correct_stored()
    rows = []
    with progress_bar(len(configs), "sweep", sources.progress) as outer:
        for config in configs:
            cfg = _normalise_config(config)
            opts = {k: v for k, v in cfg.items() if k not in ("method", "r")}
            sched = patching.schedule(sources.model, cfg["method"], cfg["r"], **opts)
            result, cached = sources.result(config, cfg, sched, keep_logits)
            if sources.labels is not None and dense_correct is None:
                dense_correct = (sources.dense().argmax(dim=1) == sources.labels).numpy()
            rows.append(_row(config, cfg, sched, result, cached, n_boot, seed, dense_correct))
            outer.update(1)
    return rows


def summary_table(df: pd.DataFrame, first: Sequence[str] = ()) -> pd.DataFrame:
    """A sweep's rows (:func:`sweep`) for reading on a page: strings, one unit per column.

    Columns: ``first`` (e.g. ``"set"``), then ``label``, ``r``, GMACs, tokens leaving the last
    block, top-1 and agreement in percent with their 95% bootstrap intervals, and KL in nats.
    Shows well as ``display(HTML(summary_table(df).to_html(index=False)))``.
    """
    def pct(name):
        return stats.ci_text(df[name], df[f"{name}_lo"], df[f"{name}_hi"], scale=100, signed=False)

    out = pd.DataFrame({c: df[c] for c in (*first, "label", "r")})
    out["GMACs"] = [f"{v:.3f}" for v in df["gmacs"]]
    out["tokens out"] = df["tokens_out"].astype(int)
    out["top-1 (%) [95% CI]"] = pct("top1")
    out["agreement (%) [95% CI]"] = pct("agreement")
    out["KL (nats)"] = [f"{v:.3f}" for v in df["kl"]]
    return out


class _Sources:
    """Where a sweep's per-photo results come from: the store, else the cache, else the model.

    Holds the sweep's photos and labels, and the dense logits, computed (or read from the
    cache) on first use: a sweep the store serves entirely runs nothing and hashes no photo.
    """

    def __init__(self, model: nn.Module, images, labels: Optional[Tensor], dense: Optional[Tensor],
                 cache: _SweepCache, store, batch_size: int, progress: bool):
        if labels is None:
            labels = getattr(images, "labels", None)
        if labels is not None:
            labels = labels.cpu()
        if dense is not None:  # analysis runs on the CPU, whatever device the logits came from
            dense = widen(dense.detach()).cpu()
        self.model, self.images, self.labels, self._dense, self.cache = model, images, labels, dense, cache
        self.n = len(images)  # an ImageSet's photos are decoded only if something must run
        self.batch_size, self.progress = batch_size, progress
        self.store = _StoreKeys(store, model, images, labels, dense is not None, batch_size)

    def dense(self) -> Tensor:
        """The dense model's logits (N, K) on the CPU."""
        if self._dense is None:
            self._dense = self.cache.dense(self.model, self.images, self.labels, self.batch_size, self.progress)
        return self._dense

    def dense_correct_stored(self) -> Optional[np.ndarray]:
        """The dense model's per-photo top-1 correctness, if the store holds it."""
        return self.store.dense_correct(self.n) if self.labels is not None else None

    def result(self, config: Dict[str, Any], cfg: Dict[str, Any], sched, keep_logits: bool) -> Tuple[EvalResult, bool]:
        """(per-photo results of one config, whether they were served rather than computed)."""
        result = self.store.get(cfg, self.n, keep_logits)
        if result is not None:
            return result, True
        result = self.cache.get(cfg, self, keep_logits)
        cached = result is not None
        if result is None:
            result = self._computed(config, cfg, sched)
            self.cache.put(cfg, self, result)
            if not keep_logits:
                result.logits = None
        self.store.record(cfg, _label(config, cfg), result, self.dense)
        return result, cached

    def _computed(self, config: Dict[str, Any], cfg: Dict[str, Any], sched) -> EvalResult:
        if not any(sched.r):  # nothing merges: exactly the dense model
            logits = self.dense()
        else:
            patch(self.model, **cfg)
            try:
                logits = predict(self.model, self.images, self.batch_size, self.progress, desc=_label(config, cfg))
            finally:
                unpatch(self.model)
        return per_image_metrics(logits, self.dense(), self.labels, keep_logits=True)


class _SweepCache:
    """The sweep cache: per-config, per-photo results (logits included) in ``<root>/<key>.npz``.

    A file's key is :func:`dsm_lite.store_format.result_key`, the store's, on a context
    (:func:`_cache_context`) that holds what the store's holds (weights fingerprint, model
    class, dtype), the photos' pixels and labels, the dense logits, and what the store leaves
    out because :func:`dsm_lite.store.verify` checks it and nothing checks the cache: the hash
    of dsm_lite's source, the torch and timm versions, the device type and the batch size. Each
    file holds the JSON its key hashes and is served only when that JSON matches.
    """

    def __init__(self, cache_dir: Union[str, os.PathLike, None, bool]):
        self.on = cache_dir is not False
        self.root = Path(cache_dir) if isinstance(cache_dir, (str, os.PathLike)) else sweep_cache_dir()
        self._context: Optional[Dict[str, Any]] = None

    def context(self, model: nn.Module, images, labels: Optional[Tensor], batch_size: int) -> Dict[str, Any]:
        if self._context is None:  # built on first use: it hashes every photo
            self._context = _cache_context(model, images, labels, batch_size)
        return self._context

    def _entry(self, cfg: Dict[str, Any], sources: _Sources) -> Tuple[Path, str]:
        """(path, the JSON its key hashes) of one config's file."""
        ctx = self.context(sources.model, sources.images, sources.labels, sources.batch_size)
        ctx = dict(ctx, dense=_tensor_hash(sources.dense()))
        return self.root / f"{result_key(_jsonable(cfg), ctx)}.npz", key_blob(_jsonable(cfg), ctx)

    def get(self, cfg: Dict[str, Any], sources: _Sources, keep_logits: bool) -> Optional[EvalResult]:
        if not self.on:
            return None
        arrays = _load_npz(*self._entry(cfg, sources), sources.n)
        if arrays is None or (keep_logits and "logits" not in arrays):
            return None
        return EvalResult.from_arrays(arrays)

    def put(self, cfg: Dict[str, Any], sources: _Sources, result: EvalResult) -> None:
        if self.on:
            path, meta = self._entry(cfg, sources)
            _save_npz(path, result._arrays(), meta)

    def dense(self, model: nn.Module, images, labels: Optional[Tensor], batch_size: int, progress: bool) -> Tensor:
        """The dense model's logits: read from the cache, else computed (and cached)."""
        if not self.on:
            return dense_logits(model, images, batch_size, progress)
        ctx = self.context(model, images, labels, batch_size)
        path = self.root / f"dense-{result_key({'dense': True}, ctx)}.npz"
        meta = key_blob({"dense": True}, ctx)
        arrays = _load_npz(path, meta, len(images))
        if arrays is not None and "logits" in arrays:
            return torch.from_numpy(arrays["logits"])
        logits = predict(model, images, batch_size, progress, desc="dense")
        _save_npz(path, {"logits": logits.numpy()}, meta)
        return logits


class _StoreKeys:
    """A sweep's view of a :class:`dsm_lite.store_format.ResultStore`: keys, lookups and records.

    Photos are identified by their relative paths and the preprocessing (data config) when
    ``images`` is an ``ImageSet``, else by the bytes of the image tensor; with caller-supplied
    dense logits the store is bypassed (they need not be this model's).
    """

    def __init__(self, store, model: nn.Module, images, labels: Optional[Tensor], given_dense: bool,
                 batch_size: int):
        self.store = None if given_dense else store
        self.labels, self.batch_size = labels, batch_size
        self.device = model_device(model).type
        if self.store is None:
            return
        paths = getattr(images, "paths", None)
        if paths is not None:  # an ImageSet knows its shape without decoding a photo
            blob = json.dumps(dict(paths=list(paths), shape=list(images.shape), dtype=str(images.dtype),
                                   transform=data_config(model)), sort_keys=True, default=str)
            photos = "paths:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        elif self.store.mode != "read":
            raise ValueError("recording into a result store needs an ImageSet (its paths let "
                             "dsm_lite.store.verify reload the photos), not a bare tensor")
        else:
            photos = "pixels:" + images_hash(images, labels)
        labels_hash = "none" if labels is None else _tensor_hash(labels.to(torch.int64))
        self.paths = None if paths is None else list(paths)
        self.context = dict(_model_context(model), labels=labels_hash, photos=photos)

    def _key(self, cfg: Optional[Dict[str, Any]]) -> str:
        return result_key(_jsonable(cfg) if cfg is not None else {"dense": True}, self.context)

    def get(self, cfg: Dict[str, Any], n: int, keep_logits: bool) -> Optional[EvalResult]:
        if self.store is None or keep_logits:  # the store keeps no logits
            return None
        arrays = self.store.get(self._key(cfg), n)
        return None if arrays is None else EvalResult.from_arrays(arrays)

    def dense_correct(self, n: int) -> Optional[np.ndarray]:
        arrays = None if self.store is None else self.store.get(self._key(None), n)
        return None if arrays is None else arrays["correct1"].astype(bool)

    def record(self, cfg: Dict[str, Any], label: str, result: EvalResult, dense_now) -> None:
        if self.store is None or self.store.mode == "read":
            return
        meta = dict(config=_jsonable(cfg), context=self.context, label=label, photos=self.paths,
                    recorded=dict(torch=torch.__version__, timm=timm.__version__, code=code_hash(),
                                  device=self.device, batch_size=self.batch_size))
        self.store.put(self._key(cfg), result._arrays(), meta)
        dense_key = self._key(None)
        if dense_key not in self.store.entries():  # its top-1 correctness serves d_top1
            dense = dense_now()
            dres = per_image_metrics(dense, dense, self.labels)
            self.store.put(dense_key, dres._arrays(), dict(meta, config={"dense": True}, label="dense"))


def _label(config: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    if "label" in config:
        return str(config["label"])
    return {"tome": "ToMe", "spatial": "spatial", "dsm": "DSM"}.get(cfg["method"], cfg["method"])


def _row(config, cfg, sched, result: EvalResult, cached: bool, n_boot: int, seed: int,
         dense_correct: Optional[np.ndarray]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"label": _label(config, cfg), "method": cfg["method"], "r": cfg["r"]}
    for k, v in cfg.items():
        if k not in ("method", "r"):
            row[k] = v
    row["delay"] = sched.options["delay"]
    row["gmacs"] = sched.macs / 1e9
    row["tokens_out"] = sched.tokens[-1]
    row["n"] = len(result)
    for name in METRIC_COLUMNS:
        ci = stats.bootstrap_ci(_float_vector(result.per_photo(name)), n_boot, seed)
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = ci.estimate, ci.lo, ci.hi
    if dense_correct is not None:
        d = stats.paired_bootstrap(_float_vector(result.correct1), _float_vector(dense_correct), n_boot, seed)
        row["d_top1"], row["d_top1_lo"], row["d_top1_hi"] = d.estimate, d.lo, d.hi
    row["cached"] = cached
    row["result"] = result
    return row


def _add_throughput(model, configs, rows, options) -> None:
    kwargs = dict(options) if isinstance(options, dict) else {}
    kwargs.setdefault("device", model_device(model))
    if next(model.parameters()).dtype == torch.float64:
        # speed is always measured in float32: the book evaluates in float64 only so that
        # every machine gives the same predictions (dsm_lite.numerics)
        model = copy.deepcopy(model).float()
    setups = []
    for config in configs:
        cfg = _normalise_config(config)
        setups.append(lambda cfg=cfg: repatch(model, cfg))
    try:
        results = interleaved_throughput([model] * len(configs), setups=setups, **kwargs)
    finally:
        unpatch(model)
    for row, t in zip(rows, results):
        row["throughput"], row["throughput_std"] = t.mean, t.std
