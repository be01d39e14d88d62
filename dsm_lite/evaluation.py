"""Running models on photo sets: per-photo accuracy, agreement with the dense model and KL.

Shapes: ``N`` photos, ``K`` classes (1000 for ImageNet-1k heads).

- :func:`evaluate`: per-photo results (:class:`EvalResult`) of one (patched) model.
- :func:`per_image_metrics`: the same from logits already computed.
- :func:`dense_logits`: the model's logits with merging switched off for the call.
- :func:`predict_among`: the model's choice among a few classes, from a stored top-5.

Many configs at once, cached, are :func:`dsm_lite.sweeps.sweep`'s; intervals over photos are
:mod:`dsm_lite.stats`'s.

Agreement with the dense model is the headline measure for the book's photos: they are
mostly ImageNet *training* images, so labels overstate accuracy, while agreement and
KL(dense || merged) measure exactly what merging changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .models import predict
from .numerics import widen
from .patching import unpatched

__all__ = ["EvalResult", "METRIC_FIELDS", "evaluate", "dense_logits", "per_image_metrics", "predict_among"]

#: sweep column -> the :class:`EvalResult` field holding its per-photo values (:meth:`EvalResult.per_photo`)
METRIC_FIELDS = {"top1": "correct1", "top5": "correct5", "agreement": "agree", "kl": "kl"}


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

    def per_photo(self, metric: str) -> np.ndarray:
        """(N,) per-photo values of the sweep column ``metric`` (``top1`` -> :attr:`correct1`, ...:
        :data:`METRIC_FIELDS`)."""
        if metric not in METRIC_FIELDS:
            raise ValueError(f"metric must be one of {sorted(METRIC_FIELDS)}, got {metric!r}")
        return getattr(self, METRIC_FIELDS[metric])

    def summary(self) -> Dict[str, float]:
        return dict(n=len(self), top1=self.top1_acc, top5=self.top5_acc,
                    agreement=self.agreement, kl=self.mean_kl)

    def __repr__(self) -> str:
        return (f"EvalResult(n={len(self)}, top1={self.top1_acc:.4f}, top5={self.top5_acc:.4f}, "
                f"agreement={self.agreement:.4f}, kl={self.mean_kl:.4f})")

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray]) -> "EvalResult":
        """The result whose :meth:`_arrays` are ``arrays`` (as saved by a cache or a store)."""
        conf = arrays.get("confidence")
        return cls(arrays["pred"], arrays["top5"], arrays["correct1"].astype(bool),
                   arrays["correct5"].astype(bool), arrays["agree"].astype(bool),
                   arrays["kl"].astype(np.float64), arrays.get("logits"),
                   None if conf is None else conf.astype(np.float64))

    def _arrays(self) -> Dict[str, np.ndarray]:
        out = dict(pred=self.pred, top5=self.top5, correct1=self.correct1, correct5=self.correct5,
                   agree=self.agree, kl=self.kl)
        if self.confidence is not None:
            out["confidence"] = self.confidence
        if self.logits is not None:
            out["logits"] = self.logits
        return out



# --------------------------------------------------------------------------- forward passes
def dense_logits(model: nn.Module, images, batch_size: int = 64, progress: bool = True) -> Tensor:
    """Logits (N, K) float32 on CPU of the model *without* merging (temporarily unpatched if
    patched); ``images`` as in :func:`dsm_lite.models.predict` (any device)."""
    with unpatched(model):
        return predict(model, images, batch_size, progress, desc="dense")


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
    logits = predict(model, images, batch_size, progress, desc="merged")
    return per_image_metrics(logits, dense, labels, keep_logits)


def predict_among(classes: Sequence[int], top5: np.ndarray, model: nn.Module, images,
                  batch_size: int = 64) -> np.ndarray:
    """(N,) int64: each photo's most probable class among ``classes`` only, as an index into
    ``classes`` (e.g. Imagenette's 10-way prediction of an ImageNet-1k model).

    Read from ``top5`` (N, 5), the model's five best classes best first (as in
    :attr:`EvalResult.top5`, e.g. from the results store) where it holds one of ``classes``:
    the first such class outscores every class of ``classes`` outside the top five. Only the
    photos whose top five hold none of them are run through ``model`` (as it is patched);
    ``images`` is an ``ImageSet`` (only those photos are decoded) or an (N, 3, H, W) tensor.
    """
    classes = [int(c) for c in classes]
    top5 = np.asarray(top5, dtype=np.int64)
    index_of = np.full(max(classes + [int(top5.max(initial=0))]) + 1, -1)  # class -> index in classes
    index_of[classes] = np.arange(len(classes))
    pos = index_of[top5]                                      # (N, 5), -1 outside ``classes``
    first = (pos >= 0).argmax(axis=1)                         # best-ranked of ``classes``
    out = np.where((pos >= 0).any(axis=1), pos[np.arange(len(pos)), first], -1)
    ask = np.flatnonzero(out < 0)
    if len(ask):
        x = images.take(ask) if hasattr(images, "take") else images[torch.from_numpy(ask)]
        out[ask] = predict(model, x, batch_size)[:, classes].argmax(dim=1).numpy()
    return out.astype(np.int64)
