"""Evaluation of merged models on photo sets: accuracy, agreement with the dense model,
uncertainty over photos, cached sweeps over methods and r, and trade-off plots.

Shapes: ``N`` photos, ``K`` classes (1000 for ImageNet-1k heads).

The main entry points:

- :func:`evaluate`: per-photo results (:class:`EvalResult`) of one (patched) model.
- :func:`sweep`: many configs (method, r, options) in one tidy DataFrame, cached on disk.
- :func:`paired_bootstrap`, :func:`bootstrap_ci`, :func:`wilson_ci`: uncertainty over photos
  (implemented in :mod:`dsm_lite.stats`; kept here under their evaluation names).
- :func:`plot_tradeoff`, :func:`plot_tradeoffs`: the paper's Figure 4 (metric vs GMACs or
  throughput, one curve per method, with bootstrap bands).

Agreement with the dense model is the headline measure for the book's photos: they are
mostly ImageNet *training* images, so labels overstate accuracy, while agreement and
KL(dense || merged) measure exactly what merging changes.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import stats
from .devices import model_device, to_model
from .numerics import widen
from .stats import BootstrapCI, wilson_ci

__all__ = [
    "EvalResult", "BootstrapCI", "predict_logits", "dense_logits", "per_image_metrics",
    "evaluate", "sweep", "sweep_cache_dir", "code_hash", "images_hash", "config_key",
    "bootstrap_ci", "paired_bootstrap", "wilson_ci",
    "PER_PHOTO", "METRIC_LABELS", "plot_tradeoff", "plot_tradeoffs",
]

#: sweep column -> the :class:`EvalResult` field holding its per-photo values
PER_PHOTO = {"top1": "correct1", "top5": "correct5", "agreement": "agree", "kl": "kl"}

CACHE_FORMAT = 1
#: patch() options that do not change a forward pass's outputs, left out of cache keys.
_NON_RESULT_OPTIONS = ("trace_source",)


# --------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    """Per-photo results of one model on one photo set.

    Attributes:
        pred: (N,) int64 top-1 class of the evaluated model.
        top5: (N, 5) int64 its five best classes, best first.
        correct1, correct5: (N,) bool, label among the top-1 / top-5.
        agree: (N,) bool, same top-1 class as the dense model.
        kl: (N,) float64, KL(dense || model) of the softmax outputs, in nats.
        logits: (N, K) float32 logits (None when not kept).
        confidence: (N,) float64, the model's softmax probability of its top-1 class (None
            for results made before it was recorded).
    """

    pred: np.ndarray
    top5: np.ndarray
    correct1: np.ndarray
    correct5: np.ndarray
    agree: np.ndarray
    kl: np.ndarray
    logits: Optional[np.ndarray] = None
    confidence: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.pred)

    @property
    def top1_acc(self) -> float:
        """Share of photos whose label is the top-1 class."""
        return float(self.correct1.mean())

    @property
    def top5_acc(self) -> float:
        return float(self.correct5.mean())

    @property
    def agreement(self) -> float:
        """Share of photos with the dense model's top-1 class."""
        return float(self.agree.mean())

    @property
    def mean_kl(self) -> float:
        """Mean KL(dense || model) over photos, nats."""
        return float(self.kl.mean())

    def summary(self) -> Dict[str, float]:
        return dict(n=len(self), top1=self.top1_acc, top5=self.top5_acc,
                    agreement=self.agreement, kl=self.mean_kl)

    def __repr__(self) -> str:
        return (f"EvalResult(n={len(self)}, top1={self.top1_acc:.4f}, top5={self.top5_acc:.4f}, "
                f"agreement={self.agreement:.4f}, kl={self.mean_kl:.4f})")

    def _arrays(self) -> Dict[str, np.ndarray]:
        out = dict(pred=self.pred, top5=self.top5, correct1=self.correct1, correct5=self.correct5,
                   agree=self.agree, kl=self.kl)
        if self.confidence is not None:
            out["confidence"] = self.confidence
        if self.logits is not None:
            out["logits"] = self.logits
        return out


# --------------------------------------------------------------------------- forward passes
def _images_tensor(images) -> Tensor:
    return images.images if hasattr(images, "images") else images


def _progress(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, file=sys.stderr,
                unit="img")


@torch.no_grad()
def predict_logits(model: nn.Module, images, batch_size: int = 64, progress: bool = True,
                   desc: str = "forward") -> Tensor:
    """Logits (N, K) float32 on CPU of ``model`` (as currently patched) on ``images``.

    ``images``: (N, 3, H, W) tensor or an ``ImageSet``, on any device: each batch is moved to
    the model's device (``load_model`` puts it on CUDA when present). Runs in batches, in eval
    mode; a tqdm bar on stderr unless ``progress=False``.
    """
    x = _images_tensor(images)
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with _progress(len(x), desc, progress) as bar:
            for i in range(0, len(x), batch_size):
                batch = to_model(model, x[i:i + batch_size], device)
                out.append(widen(model(batch)).cpu())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


class _Unpatched:
    """Context manager: the model without merging inside, patched again as before on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = None

    def __enter__(self) -> nn.Module:
        self.saved = _patch_state(self.model)
        _repatch(self.model, None)
        return self.model

    def __exit__(self, *exc) -> None:
        _repatch(self.model, self.saved)


def _patch_state(model: nn.Module):
    from .patching import is_patched

    if not is_patched(model):
        return None
    st = model._dsm_state
    return (st.method, dict(st.options), st.trace_source, st.seed)


def _repatch(model: nn.Module, saved) -> None:
    from .patching import patch, unpatch

    if saved is None:
        unpatch(model)
        return
    method, options, trace_source, seed = saved
    options = dict(options)
    r = options.pop("r")
    seed = options.pop("seed", seed)
    options.pop("trace_source", None)
    patch(model, method, r, trace_source=trace_source, seed=seed, **options)


def dense_logits(model: nn.Module, images, batch_size: int = 64, progress: bool = True) -> Tensor:
    """Logits (N, K) float32 on CPU of the model *without* merging (temporarily unpatched if
    patched); ``images`` as in :func:`predict_logits` (any device)."""
    with _Unpatched(model):
        return predict_logits(model, images, batch_size, progress, desc="dense")


def per_image_metrics(logits: Tensor, dense: Tensor, labels: Optional[Tensor],
                      keep_logits: bool = False) -> EvalResult:
    """Per-photo results from logits (N, K), the dense model's logits (N, K) and labels (N,).

    Without labels, ``correct1``/``correct5`` are all False. KL(dense || model) is computed
    in float64 from log-softmaxes, so it is exactly 0 when the logits are equal.

    The inputs may be on any device (each is moved to the CPU first); the result holds numpy
    arrays.
    """
    t = _metric_tensors(logits, dense, labels)
    return EvalResult(*(t[k].numpy() for k in ("pred", "top5", "correct1", "correct5", "agree", "kl")),
                      t["logits"].numpy() if keep_logits else None, t["confidence"].numpy())


def _metric_tensors(logits: Tensor, dense: Tensor, labels: Optional[Tensor]) -> Dict[str, Tensor]:
    """The tensor part of :func:`per_image_metrics` (no host synchronisation): the fields of
    :class:`EvalResult` as CPU tensors, whatever device the inputs are on."""
    logits, dense = widen(logits).cpu(), widen(dense).cpu()
    if logits.shape != dense.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and dense logits {tuple(dense.shape)} differ")
    k = min(5, logits.shape[1])
    top5 = logits.topk(k, dim=1).indices
    pred = top5[:, 0]
    dense_pred = dense.argmax(dim=1)
    if labels is not None:
        labels = labels.cpu().view(-1, 1)
        hit = top5 == labels
        correct1, correct5 = hit[:, 0], hit.any(dim=1)
    else:
        correct1 = correct5 = torch.zeros(len(logits), dtype=torch.bool)
    lp = torch.log_softmax(logits.double(), dim=1)
    lq = torch.log_softmax(dense.double(), dim=1)
    kl = (lq.exp() * (lq - lp)).sum(dim=1).clamp_min(0.0)
    confidence = torch.softmax(logits, dim=1).max(dim=1).values.double()
    return dict(pred=pred, top5=top5, correct1=correct1, correct5=correct5,
                agree=pred == dense_pred, kl=kl, logits=logits, confidence=confidence)


def evaluate(model: nn.Module, images, labels: Optional[Tensor] = None,
             dense: Optional[Tensor] = None, batch_size: int = 64, progress: bool = True,
             keep_logits: bool = False) -> EvalResult:
    """Per-photo results of ``model`` as currently patched (or dense) on ``images``.

    Args:
        model: a timm ViT, patched by ``dsm_lite.patch`` or not.
        images: an ``ImageSet`` (labels taken from it) or an (N, 3, H, W) tensor, on any
            device (batches are moved to the model's device).
        labels: (N,) ImageNet-1k class indices (default: ``images.labels``), any device.
        dense: (N, K) logits of the dense model on the same photos, any device; computed
            (model temporarily unpatched) when None.
        batch_size: photos per forward pass.
        progress: show tqdm bars on stderr (pass False in notebooks).
        keep_logits: keep the (N, K) logits in the result.
    """
    if labels is None:
        labels = getattr(images, "labels", None)
    if dense is None:
        dense = dense_logits(model, images, batch_size, progress)
    logits = predict_logits(model, images, batch_size, progress, desc="merged")
    return per_image_metrics(logits, dense, labels, keep_logits)


# --------------------------------------------------------------------------- uncertainty
# The statistics live in dsm_lite.stats; these keep the evaluation names and signatures
# (1-D per-photo arrays, NumPy's resampling stream whatever the input's type).
def bootstrap_ci(x, n_boot: int = 2000, seed: int = 0, stat: Callable = np.mean,
                 level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of ``stat`` over photos (:func:`dsm_lite.stats.bootstrap_ci`).

    Args:
        x: (N,) per-photo values (bools count as 0/1; tensors are converted to NumPy).
        stat: a statistic taking ``axis=`` (np.mean, np.median), or any callable of a 1-D array.
    """
    return stats.bootstrap_ci(_per_photo(x), n_boot, seed, level, stat=stat)


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, stat: Callable = np.mean,
                     level: float = 0.95) -> BootstrapCI:
    """CI of ``stat(a) - stat(b)`` for two methods on the *same* photos
    (:func:`dsm_lite.stats.paired_bootstrap`).

    Args:
        a, b: (N,) per-photo values in the same photo order (e.g. ``EvalResult.correct1`` of
            two configs). Identical arrays give exactly [0, 0].
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"a and b must be 1-D arrays of equal length, got {a.shape} and {b.shape}")
    return stats.paired_bootstrap(a, b, n_boot, seed, level, stat=stat)


def _per_photo(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"x must be a non-empty 1-D array, got shape {x.shape}")
    return x


# --------------------------------------------------------------------------- cache keys
def sweep_cache_dir() -> Path:
    """Default sweep cache: ``$DSM_LITE_CACHE/sweeps``, else ``~/.cache/dsm_lite/sweeps``."""
    from ._assets import cache_dir

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
    x = _images_tensor(images).detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|".encode())
    h.update(x.numpy().tobytes())
    if labels is not None:
        h.update(b"labels|" + labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _tensor_hash(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


@lru_cache(maxsize=None)
def _patch_defaults() -> Dict[str, Any]:
    from .patching import patch

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
    import timm

    from .models import weights_fingerprint

    param = next(model.parameters())
    return dict(format=CACHE_FORMAT, weights=weights_fingerprint(model),
                model_class=type(model).__name__.replace("Merging", "", 1),
                images=images_hash(images, labels), code=code_hash(), torch=torch.__version__,
                timm=timm.__version__, device=param.device.type, dtype=str(param.dtype),
                batch_size=batch_size)


def _save_npz(path: Path, arrays: Dict[str, np.ndarray], meta: str) -> None:
    """Write atomically: a temp file beside ``path``, renamed into place when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.array(meta), **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def _result_from(arrays: Dict[str, np.ndarray]) -> EvalResult:
    conf = arrays.get("confidence")
    return EvalResult(arrays["pred"], arrays["top5"], arrays["correct1"].astype(bool),
                      arrays["correct5"].astype(bool), arrays["agree"].astype(bool),
                      arrays["kl"].astype(np.float64), arrays.get("logits"),
                      None if conf is None else conf.astype(np.float64))


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
        ``result``: the per-photo :class:`EvalResult` (for :func:`paired_bootstrap`).
    """
    import pandas as pd

    from .patching import schedule as make_schedule

    if labels is None:
        labels = getattr(images, "labels", None)
    if labels is not None:
        labels = labels.cpu()
    if dense is not None:  # analysis runs on the CPU, whatever device the logits came from
        dense = widen(dense.detach()).cpu()
    n = len(_images_tensor(images))
    saved = _patch_state(model)
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

    _repatch(model, None)  # unpatched while the sweep runs; restored below
    try:
        dense_correct = skeys.dense_correct(n) if labels is not None else None
        rows = []
        configs = list(configs)
        with _progress(len(configs), "sweep", progress) as outer:
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
                        result, cached = _result_from(arrays), True
                if result is None:
                    if not any(sched.r):  # nothing merges: exactly the dense model
                        logits = dense_now()
                    else:
                        _repatch(model, (cfg["method"], dict(opts, r=cfg["r"]), False, cfg["seed"]))
                        try:
                            logits = predict_logits(model, images, batch_size, progress,
                                                    desc=_label(config, cfg))
                        finally:
                            _repatch(model, None)
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
        _repatch(model, saved)
    return pd.DataFrame(rows)


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
        from .data import data_config
        from .models import weights_fingerprint

        paths = getattr(images, "paths", None)
        if paths is not None:
            x = _images_tensor(images)
            blob = json.dumps(dict(paths=list(paths), shape=list(x.shape), dtype=str(x.dtype),
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
        from .store import store_key

        return store_key(_jsonable(cfg) if cfg is not None else {"dense": True}, self.context)

    def get(self, cfg: Dict[str, Any], n: int, keep_logits: bool) -> Optional[EvalResult]:
        if self.store is None or keep_logits:  # the store keeps no logits
            return None
        arrays = self.store.get(self._key(cfg), n)
        return None if arrays is None else _result_from(arrays)

    def dense_correct(self, n: int) -> Optional[np.ndarray]:
        arrays = None if self.store is None else self.store.get(self._key(None), n)
        return None if arrays is None else arrays["correct1"].astype(bool)

    def record(self, cfg: Dict[str, Any], label: str, result: EvalResult, dense_now) -> None:
        if self.store is None or self.store.mode == "read":
            return
        import timm

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
    logits = predict_logits(model, images, batch_size, progress, desc="dense")
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
        ci = bootstrap_ci(getattr(result, field), n_boot, seed)
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = ci.estimate, ci.lo, ci.hi
    if dense_correct is not None:
        d = paired_bootstrap(result.correct1, dense_correct, n_boot, seed)
        row["d_top1"], row["d_top1_lo"], row["d_top1_hi"] = d.estimate, d.lo, d.hi
    row["cached"] = cached
    row["result"] = result
    return row


def _add_throughput(model, configs, rows, options) -> None:
    from .measure import interleaved_throughput

    kwargs = dict(options) if isinstance(options, dict) else {}
    kwargs.setdefault("device", model_device(model))
    if next(model.parameters()).dtype == torch.float64:
        # speed is always measured in float32: the book evaluates in float64 only so that
        # every machine gives the same predictions (dsm_lite.numerics)
        model = copy.deepcopy(model).float()
    setups = []
    for config in configs:
        cfg = _normalise_config(config)
        opts = {k: v for k, v in cfg.items() if k not in ("method", "r")}
        state = (cfg["method"], dict(opts, r=cfg["r"]), False, cfg["seed"])
        setups.append(lambda s=state: _repatch(model, s))
    try:
        results = interleaved_throughput([model] * len(configs), setups=setups, **kwargs)
    finally:
        _repatch(model, None)
    for row, t in zip(rows, results):
        row["throughput"], row["throughput_std"] = t.mean, t.std


# --------------------------------------------------------------------------- plots
#: axis labels (with units) for sweep columns
METRIC_LABELS = {
    "gmacs": "GMACs per image",
    "throughput": "throughput (images/s, machine-dependent)",
    "tokens_out": "tokens leaving the last block",
    "r": "r (tokens merged per block)",
    "top1": "top-1 accuracy (%)",
    "top5": "top-5 accuracy (%)",
    "agreement": "top-1 agreement with dense model (%)",
    "kl": "mean KL(dense ‖ merged) (nats)",
    "d_top1": "top-1 change vs dense (percentage points)",
}
_PERCENT = {"top1", "top5", "agreement", "d_top1"}


def plot_tradeoff(ax, df, x: str = "gmacs", y: str = "agreement", by: Union[str, Sequence[str]] = "label",
                  band: bool = True, annotate_r: bool = False, markers: Sequence[str] = "os^vDP",
                  colors: Optional[Dict[Any, str]] = None, legend: bool = True, **kw):
    """One curve of ``y`` versus ``x`` per group of ``by`` (the paper's Figure 4).

    Args:
        ax: matplotlib axes.
        df: a :func:`sweep` DataFrame (or concatenation of several).
        x: ``"gmacs"``, ``"throughput"``, ``"tokens_out"`` or ``"r"``.
        y: ``"top1"``, ``"top5"``, ``"agreement"``, ``"kl"`` or ``"d_top1"``; shares are drawn
            in percent.
        by: column(s) whose values make one curve each (default ``label``).
        band: shade ``<y>_lo``..``<y>_hi`` (bootstrap 95% CI over photos) when present.
        annotate_r: write each point's r beside it.
    Returns the axes.
    """
    by = [by] if isinstance(by, str) else list(by)
    scale = 100.0 if y in _PERCENT else 1.0
    for i, (key, g) in enumerate(df.groupby(by, sort=False)):
        g = g.sort_values(x)
        name = ", ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        style = dict(marker=markers[i % len(markers)], label=str(name))
        if colors and name in colors:
            style["color"] = colors[name]
        style.update(kw)
        line, = ax.plot(g[x], g[y] * scale, **style)
        if band and f"{y}_lo" in g and f"{y}_hi" in g:
            ax.fill_between(g[x], g[f"{y}_lo"] * scale, g[f"{y}_hi"] * scale,
                            color=line.get_color(), alpha=0.2, linewidth=0)
        if annotate_r:
            for xv, yv, r in zip(g[x], g[y] * scale, g["r"]):
                ax.annotate(f"r={r}", (xv, yv), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=line.get_color())
    ax.set_xlabel(METRIC_LABELS.get(x, x))
    ax.set_ylabel(METRIC_LABELS.get(y, y))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    return ax


def plot_tradeoffs(df, ys: Sequence[str] = ("top1", "agreement", "kl"), x: str = "gmacs",
                   by: Union[str, Sequence[str]] = "label", title: Optional[str] = None,
                   size: Tuple[float, float] = (4.2, 3.4), **kw):
    """A row of :func:`plot_tradeoff` panels, one per metric in ``ys``; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(size[0] * len(ys), size[1]), squeeze=False)
    for j, (ax, y) in enumerate(zip(axes[0], ys)):
        plot_tradeoff(ax, df, x=x, y=y, by=by, legend=(j == 0), **kw)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
