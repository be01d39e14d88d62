"""dsm_lite: token merging (ToMe, spatial merging, DSM) for timm Vision Transformers.

The engine is imported here; ``dsm_lite.__all__`` lists it. The book's analysis lives in
namespaced modules, loaded on first use: :mod:`dsm_lite.evaluation` (models on photos),
:mod:`dsm_lite.sweeps` (many configs, cached), :mod:`dsm_lite.store_format` (stored per-photo
results) and :mod:`dsm_lite.store` (their checks), :mod:`dsm_lite.stats` (intervals, tests,
verdicts), :mod:`dsm_lite.compare` (methods at equal GMACs), :mod:`dsm_lite.claims` (the paper's
claims, judged), :mod:`dsm_lite.probes` (hooks and token statistics), :mod:`dsm_lite.plots` and
:mod:`dsm_lite.matching_steps` (figures). The patch grid, its windows and the merged groups on it
are :mod:`dsm_lite.windows`'s.
"""
from __future__ import annotations

import importlib
from typing import Any

from .devices import DeviceMismatchError, DeviceUnavailableError
from .merging import (Merge, bipartite_soft_matching, merge_source, merge_wavg, window_quota_matching,
                      window_soft_matching)
from .schedules import BlockPlan, MergeOptions, ModelShape, Schedule, closest_macs, default_delay, delayed_tome_r, parse_r
from .patching import (attention_bias, is_patched, patch, schedule, trace_sources, trace_sources_per_block, unpatch,
                       unpatched)
from .measure import Throughput, count_macs, interleaved_throughput, measure_throughput, time_breakdown
from .assets import DEFAULT_MODEL
from .models import book_dtype, load_model, pick_device, predict, topk_accuracy, weights_fingerprint
from .data import ImageSet, data_config, load_images, load_photo
from .numerics import book_numerics

__version__ = "0.1.0"

__all__ = [
    # patching a model
    "patch", "unpatch", "unpatched", "is_patched", "schedule", "Schedule", "BlockPlan", "MergeOptions", "default_delay", "parse_r",
    "ModelShape", "closest_macs", "delayed_tome_r", "trace_sources", "trace_sources_per_block", "attention_bias",
    # the merging primitives (pure functions on tensors)
    "Merge", "bipartite_soft_matching", "window_soft_matching", "window_quota_matching",
    "merge_wavg", "merge_source",
    # cost and speed
    "count_macs", "measure_throughput", "interleaved_throughput", "time_breakdown", "Throughput",
    # models and photos
    "DEFAULT_MODEL", "book_dtype", "load_model", "pick_device", "predict", "topk_accuracy", "weights_fingerprint",
    "ImageSet", "load_images", "load_photo", "data_config", "book_numerics",
    # errors
    "DeviceMismatchError", "DeviceUnavailableError",
]

_SUBMODULES = ("assets", "claims", "compare", "data", "devices", "evaluation", "matching_steps", "measure",
               "merging", "models", "numerics", "package", "patching", "plots", "probes", "progress", "schedules",
               "stats", "store", "store_format", "sweeps", "windows")


def __getattr__(name: str) -> Any:
    """``dsm_lite.<module>`` imports an analysis module on first use (they pull in pandas and
    matplotlib, which patching a model does not need)."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dsm_lite' has no attribute {name!r}")
