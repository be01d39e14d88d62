"""Sweeps: many merging configs on one photo set, one tidy DataFrame, cached and stored.

- :func:`sweep`: one row per config (method, r, options) with GMACs, accuracy, agreement and
  KL, each with a bootstrap interval over photos, and the per-photo :class:`EvalResult`.
- :func:`summary_table`: those rows for reading, one unit per column.
- The disk cache (:func:`sweep_cache_dir`): per-config, per-photo results keyed by
  everything that could change them (:func:`config_key`).
- The results store (:mod:`dsm_lite.store`): the book's per-photo results, read instead of
  running the model when the photos, weights and config match exactly.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import pandas as pd
import timm
import torch
from torch import Tensor, nn

from . import stats
from .assets import atomic_write, cache_dir
from .data import data_config, image_tensor
from .devices import model_device
from .evaluation import PER_PHOTO, EvalResult, dense_logits, per_image_metrics, repatch
from .measure import interleaved_throughput
from .models import predict, weights_fingerprint
from .numerics import widen
from .progress import progress_bar
from .patching import patch, patch_settings, unpatch
from .patching import schedule as make_schedule
from .store import store_key

__all__ = ["sweep", "summary_table", "sweep_cache_dir", "code_hash", "images_hash", "config_key",
           "METRIC_COLUMNS"]

CACHE_FORMAT = 1
#: patch() options that do not change a forward pass's outputs, left out of cache keys.
_NON_RESULT_OPTIONS = ("trace_source",)


def _per_photo(x) -> np.ndarray:
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
    sig = inspect.signature(patch)
    return {k: p.default for k, p in sig.parameters.items()
            if p.kind == p.KEYWORD_ONLY and k not in _NON_RESULT_OPTIONS}


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


def config_key(config: Dict[str, Any], context: Dict[str, Any]) -> str:
    """Cache file stem for one config: sha256 of the canonical JSON of config + context."""
    blob = json.dumps({"config": _jsonable(_normalise_config(config)), **context},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _context(model: nn.Module, images, labels, batch_size: int) -> Dict[str, Any]:
    param = next(model.parameters())
    return dict(format=CACHE_FORMAT, weights=weights_fingerprint(model),
                model_class=type(model).__name__.replace("Merging", "", 1),
                images=images_hash(images, labels), code=code_hash(), torch=torch.__version__,
                timm=timm.__version__, device=param.device.type, dtype=str(param.dtype),
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
METRIC_COLUMNS = ("top1", "top5", "agreement", "kl")


def sweep(
    model: nn.Module,
    images,
    configs: Sequence[Dict[str, Any]],
    cache_dir: Union[str, os.PathLike, None, bool] = None,
    dense: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    batch_size: int = 64,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    throughput: Union[bool, Dict[str, Any]] = False,
    keep_logits: bool = False,
    store=None,
):
    """Evaluate many merging configs on one photo set; a tidy DataFrame, one row per config.

    Args:
        model: a timm ViT (patched or not); it is left exactly as it was found.
        images: an ``ImageSet`` (labels from it) or an (N, 3, H, W) tensor with ``labels``.
        configs: dicts of ``method`` (default "tome"), ``r`` and any ``dsm_lite.patch`` option,
            e.g. ``dict(method="dsm", r=16, delay=2)``; an optional ``label`` names the curve.
        cache_dir: where per-config, per-photo results are cached (default
            :func:`sweep_cache_dir`); ``False`` disables the cache. A cache entry is keyed by
            the weights fingerprint, the image bytes and labels, the full config (defaults
            filled in), the dense logits, the hash of dsm_lite's source, the torch and timm
            versions, device type, dtype and batch size; files are written atomically and
            unreadable or mismatching files are recomputed, so a stale entry is never served.
        dense: (N, K) dense logits on these photos (any device); computed (and cached) when
            None.
        batch_size: photos per forward pass.
        progress: tqdm bars on stderr (pass False in notebooks).
        n_boot, seed: bootstrap over photos for the ``*_lo``/``*_hi`` columns.
        throughput: False, True or kwargs of :func:`dsm_lite.interleaved_throughput` (e.g.
            ``dict(batch_size=32, runs=50)``): adds ``throughput`` and ``throughput_std``
            columns (images/s, never cached, machine-dependent).
        keep_logits: keep the (N, K) logits in each row's ``result`` (the store has none, so
            every config is then computed or read from the cache).
        store: a :class:`dsm_lite.store.ResultStore` (the book passes
            :func:`dsm_lite.store.book_store`): configs it holds for these photos and weights
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
    if labels is None:
        labels = getattr(images, "labels", None)
    if labels is not None:
        labels = labels.cpu()
    if dense is not None:  # analysis runs on the CPU, whatever device the logits came from
        dense = widen(dense.detach()).cpu()
    n = len(images)  # an ImageSet's photos are decoded only if something must run
    saved = patch_settings(model)
    use_cache = cache_dir is not False
    root = Path(cache_dir) if isinstance(cache_dir, (str, os.PathLike)) else sweep_cache_dir()
    context: Optional[Dict[str, Any]] = None  # the cache's key context: hashes every image
    given_dense = dense is not None
    skeys = _StoreKeys(store, model, images, labels, given_dense, batch_size)

    def context_now() -> Dict[str, Any]:  # built on first use: nothing to hash when the store serves all
        nonlocal context
        if context is None:
            context = _context(model, images, labels, batch_size) if use_cache else {}
        return context

    def dense_now() -> Tensor:  # the dense logits, computed (or read from the cache) on first use
        nonlocal dense
        if dense is None:
            dense = _cached_dense(model, images, root, context_now(), n, batch_size, progress, use_cache)
        return dense

    unpatch(model)  # unpatched while the sweep runs; restored below
    try:
        dense_correct = skeys.dense_correct(n) if labels is not None else None
        rows = []
        configs = list(configs)
        with progress_bar(len(configs), "sweep", progress) as outer:
            for config in configs:
                cfg = _normalise_config(config)
                opts = {k: v for k, v in cfg.items() if k not in ("method", "r")}
                sched = make_schedule(model, cfg["method"], cfg["r"], **opts)
                result = skeys.get(cfg, n, keep_logits)
                served = cached = result is not None
                if not served and use_cache:
                    ctx = dict(context_now(), dense=_tensor_hash(dense_now()))
                    path = root / f"{config_key(config, ctx)}.npz"
                    meta = json.dumps({"config": _jsonable(cfg), **ctx}, sort_keys=True, default=str)
                    arrays = _load_npz(path, meta, n)
                    if arrays is not None and (not keep_logits or "logits" in arrays):
                        result, cached = EvalResult.from_arrays(arrays), True
                if result is None:
                    if not any(sched.r):  # nothing merges: exactly the dense model
                        logits = dense_now()
                    else:
                        patch(model, **cfg)
                        try:
                            logits = predict(model, images, batch_size, progress,
                                                    desc=_label(config, cfg))
                        finally:
                            unpatch(model)
                    result = per_image_metrics(logits, dense_now(), labels, keep_logits=True)
                    if use_cache:
                        _save_npz(path, result._arrays(), meta)
                    if not keep_logits:
                        result.logits = None
                if not served:
                    skeys.record(cfg, _label(config, cfg), result, dense_now)
                if labels is not None and dense_correct is None:
                    dense_correct = (dense_now().argmax(dim=1) == labels).numpy()
                rows.append(_row(config, cfg, sched, result, cached, n_boot, seed, dense_correct))
                outer.update(1)
        if throughput:
            _add_throughput(model, configs, rows, throughput)
    finally:
        repatch(model, saved)
    return pd.DataFrame(rows)


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


class _StoreKeys:
    """A sweep's view of a :class:`dsm_lite.store.ResultStore`: keys, lookups and records.

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
        self.context = dict(weights=weights_fingerprint(model), labels=labels_hash, photos=photos,
                            model_class=type(model).__name__.replace("Merging", "", 1),
                            dtype=str(next(model.parameters()).dtype))

    def _key(self, cfg: Optional[Dict[str, Any]]) -> str:
        return store_key(_jsonable(cfg) if cfg is not None else {"dense": True}, self.context)

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


def _cached_dense(model, images, root, context, n, batch_size, progress, use_cache) -> Tensor:
    if not use_cache:
        return dense_logits(model, images, batch_size, progress)
    meta = json.dumps({"dense": True, **context}, sort_keys=True, default=str)
    path = root / f"dense-{hashlib.sha256(meta.encode()).hexdigest()[:32]}.npz"
    arrays = _load_npz(path, meta, n)
    if arrays is not None and "logits" in arrays:
        return torch.from_numpy(arrays["logits"])
    logits = predict(model, images, batch_size, progress, desc="dense")
    _save_npz(path, {"logits": logits.numpy()}, meta)
    return logits


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
    for name, field in PER_PHOTO.items():
        ci = stats.bootstrap_ci(_per_photo(getattr(result, field)), n_boot, seed)
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = ci.estimate, ci.lo, ci.hi
    if dense_correct is not None:
        d = stats.paired_bootstrap(_per_photo(result.correct1), _per_photo(dense_correct), n_boot, seed)
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
