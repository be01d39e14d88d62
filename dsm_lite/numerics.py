"""The numerics the book runs with, set in one place.

Every chapter calls :func:`book_numerics` before it computes anything, so that a CPU of another
kind or a GPU reproduces the stored outputs:

* **float64 by default** for everything the chapter creates afterwards (the model's parameters,
  the preprocessed photos, random tensors). In float32, another instruction set moves ViT-Ti
  logits by about 2e-5, and that is enough to flip a token-merging decision between two nearly
  equally similar tokens, which then changes a photo's prediction or KL (two cells of the
  book failed nbval on another AMD machine for exactly this reason). In float64 the same
  noise is about 1e-13, far below any similarity gap that occurs on real photos, so merge
  decisions, predictions and the statistics built on them are the same on every machine.
  Accuracy is what is measured here, not speed: the model computes the same function, and
  throughput is always measured in float32 (see ``dsm_lite.measure``).
* no TF32 (a 10-bit mantissa) in cuBLAS matmuls or cuDNN convolutions, the ``"highest"``
  float32 matmul precision, and no cuDNN autotuning, whose kernel choice can change from run
  to run; these matter wherever float32 is still used.
"""
from __future__ import annotations

import torch

__all__ = ["book_numerics", "numerics_report", "widen"]


def book_numerics(seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
    """Set the book's numerics: default ``dtype`` (float64; a chapter passes
    :func:`dsm_lite.models.book_dtype`), no TF32, deterministic kernel choice, and
    ``torch.manual_seed(seed)``. Call it before creating models or tensors."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.set_float32_matmul_precision("highest")
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)


def numerics_report() -> dict:
    """The settings :func:`book_numerics` controls, as they are now (for tests and notes)."""
    return dict(
        default_dtype=torch.get_default_dtype(),
        matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or wider: half precision is upcast, float32 and float64 are kept, so
    outputs of a float64 model stay float64 all the way into the statistics."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
