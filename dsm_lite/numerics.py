"""The numerics the book runs with, set in one place.

Every chapter calls :func:`book_numerics` before it computes anything, so that a CPU of
another kind or a GPU reproduces the stored outputs as closely as float32 allows: no TF32
(a 10-bit mantissa) in cuBLAS matmuls or cuDNN convolutions (the patch embedding), the
``"highest"`` float32 matmul precision, and no cuDNN autotuning, whose kernel choice can change
from run to run.
"""
from __future__ import annotations

import torch

__all__ = ["book_numerics", "numerics_report"]


def book_numerics(seed: int = 0) -> None:
    """Full float32 everywhere, deterministic kernel choice, and ``torch.manual_seed(seed)``."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(seed)


def numerics_report() -> dict:
    """The settings :func:`book_numerics` controls, as they are now (for tests and notes)."""
    return dict(
        matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )
