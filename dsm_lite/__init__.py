"""dsm_lite: token merging (ToMe, spatial merging, DSM) for timm Vision Transformers."""

from .merging import (Merge, bipartite_soft_matching, merge_source, merge_wavg, window_quota_matching,
                      window_soft_matching)
from .patching import attention_bias, is_patched, patch, schedule, trace_sources, unpatch
from .measure import Throughput, count_macs, interleaved_throughput, measure_throughput, time_breakdown
from .devices import DeviceMismatchError, DeviceUnavailableError
from .schedules import BlockPlan, Schedule, default_delay, parse_r
from .numerics import book_numerics

__version__ = "0.1.0"

from .models import DEFAULT_MODEL, load_model, pick_device, predict, topk_accuracy, weights_fingerprint
from .data import ImageSet, load_images, load_photo

from . import plots, probes
from .probes import AttentionProbe, ProbeResult, measure_sim, run_probe, token_similarity, transition_block

from . import devices, evaluation, matching_steps, stats
from .evaluation import (BootstrapCI, EvalResult, bootstrap_ci, evaluate, paired_bootstrap, plot_tradeoff,
                         plot_tradeoffs, sweep, wilson_ci)
