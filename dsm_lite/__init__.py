"""dsm_lite: token merging (ToMe, spatial merging, DSM) for timm Vision Transformers."""

from .merging import Merge, bipartite_soft_matching, merge_source, merge_wavg, window_soft_matching
from .patching import attention_bias, is_patched, patch, schedule, trace_sources, unpatch
from .measure import Throughput, count_macs, interleaved_throughput, measure_throughput
from .schedules import BlockPlan, Schedule, default_delay, parse_r

__version__ = "0.1.0"
