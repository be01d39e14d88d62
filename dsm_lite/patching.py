"""Patch a timm VisionTransformer in place so that its blocks merge tokens, and undo it.

``patch`` swaps the classes of the model, its blocks and their attention modules for thin
subclasses (the ToMe recipe): :class:`DSMVisionTransformer`, :class:`DSMBlock` and
:class:`DSMAttention` in front of timm's classes, each docstring listing its modifications.
Parameters, hooks and ``state_dict`` stay untouched, and ``unpatch`` swaps the classes back.
Everything one forward pass needs (token sizes, source tracking, anchors of the tokens on
the patch grid for joint windows, the similarity feature of the current block) lives in one
:class:`MergeState` shared by the model and its blocks; it is reset wherever a forward
starts (``forward_features``, ``forward_intermediates``), so calling them in any order never
sees stale sizes.

A patched block computes, for ``x`` of shape (B, N, C)::

    x = x + ls1(attn(norm1(x)))          # attention, with log(size) bias if prop_attn
    x, size = merge(x, size)             # r tokens fewer, per the schedule
    x = x + ls2(mlp(norm2(x)))
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from . import fused_merge as fused
from .devices import to_model
from .merging import (FLOAT_DTYPES, HALF_DTYPES, Merge, WindowLayout, bipartite_soft_matching,
                      merge_source, merge_wavg, prune_lowest_norm, window_layout,
                      window_quota_matching, window_soft_matching)
from .schedules import BACKENDS, RANDOM_FEATURE_DIM, MergeOptions, ModelShape, RSpec, Schedule
from .windows import square_window_ids, window_ids


def _compiling() -> bool:
    """Whether torch.compile (dynamo) is tracing the current call."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


class _Prepared:
    """What one forward pass of a schedule needs that does not depend on the images.

    Built once per (batch size, device, grid) in eager mode and reused; under torch.compile
    it is rebuilt inside the traced forward, where it becomes graph constants.

    Attributes:
        window_table: block index -> (H * W,) window id of every raster position, for
            local blocks (one lookup replaces the window arithmetic on the anchors).
        first_layout: the :class:`WindowLayout` of the first merging block when it is local
            (every token is still its own patch there, so its windows are known).
        last_anchor_block: the last block whose output anchors anything reads (the last
            local block), -1 when none; anchors are not tracked beyond it.
    """

    def __init__(self, schedule: Schedule, batch: int, device: torch.device, num_prefix: int) -> None:
        h, w = schedule.shape.grid
        positions = torch.arange(h * w, device=device)
        self.window_table: Dict[int, Tensor] = {}
        self.first_layout: Optional[WindowLayout] = None
        self.last_anchor_block = -1
        first = next((b.index for b in schedule.blocks if b.r > 0), None)
        for step in schedule.blocks:
            if step.mode != "local":
                continue
            table = window_ids(positions[None], (h, w), step.window)[0]
            self.window_table[step.index] = table
            self.last_anchor_block = step.index
            if step.index == first:
                wid = table.expand(batch, -1)
                self.first_layout = window_layout(wid, step.num_windows, step.window * step.window,
                                                  num_prefix)

__all__ = ["MergeState", "patch", "unpatch", "is_patched", "patch_settings", "schedule", "attention_bias", "attention_qkv",
           "trace_sources", "trace_sources_per_block", "trace_windows", "SUPPORTED_POOLS", "BACKENDS", "repatch", "unpatched",
           "DSMVisionTransformer", "DSMBlock", "DSMAttention"]

SUPPORTED_POOLS = ("token", "avg", "")


class MergeState:
    """Per-model merging state, shared by the model and its blocks.

    ``options`` is the :class:`~dsm_lite.schedules.MergeOptions` of the patch, ``active``
    the :class:`~dsm_lite.schedules.Schedule` the current forward runs (for its patch grid).
    Attributes set per forward: ``size`` (B, N, 1) tokens per token, ``source`` (B, N, N0) which input
    tokens each token holds (when tracing; ``trace_source`` switches it, and the tracing
    helpers turn it on for one forward), ``anchors`` (B, N - P) raster index of one
    original patch per token (spatial methods with joint windows).
    """

    def __init__(self, model: nn.Module, options: MergeOptions) -> None:
        if options.backend == "triton":
            fused.require_triton()
        if options.backend == "triton" or (options.backend == "auto" and torch.cuda.is_available()
                                           and fused.triton_available()):
            fused.prepare()  # now, not in a forward that torch.compile may be tracing
        self.options = options
        self.method = options.method
        self.trace_source = options.trace_source
        self.num_prefix = model.num_prefix_tokens
        self._shape = ModelShape.from_model(model)
        self._schedules: Dict[Tuple[int, int], Schedule] = {}
        # paper windows: window id per sequence position, per (grid, block, device)
        self._square_ids: Dict[tuple, Tensor] = {}
        # paper windows for the fused kernel: (quotas, their exclusive prefix sums), same keys
        self._quotas: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        # joint windows: window tables and the first block's layout, per (batch, device, grid)
        self._prepared_cache: Dict[tuple, _Prepared] = {}
        self.active = self.schedule_for(self._shape.grid)
        self.generator: Optional[torch.Generator] = None
        self.grid = self._shape.grid
        self._clear()

    def _clear(self) -> None:
        self.size: Optional[Tensor] = None
        self.source: Optional[Tensor] = None
        self.anchors: Optional[Tensor] = None
        self.prepared: Optional[_Prepared] = None

    def schedule_for(self, grid: Tuple[int, int]) -> Schedule:
        """The schedule for a patch grid (cached: it depends on the grid, not the image)."""
        grid = tuple(int(g) for g in grid)
        if grid not in self._schedules:
            shape = ModelShape(**{**self._shape.__dict__, "grid": grid})
            self._schedules[grid] = self.options.plan(shape)
        return self._schedules[grid]

    def reset(self, model: nn.Module, images: Tensor) -> None:
        """Start a forward pass on images (B, C, H, W)."""
        if images.dtype not in FLOAT_DTYPES:
            raise TypeError(f"token merging runs on {', '.join(map(str, FLOAT_DTYPES))} images and "
                            f"activations; got images of dtype {images.dtype}")
        self._clear()
        pe = model.patch_embed
        if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            # ints, not tensors: under a jit trace (count_macs) the sizes come back as tensors
            grid = tuple(int(g) for g in pe.dynamic_feat_size(images.shape[-2:]))
        else:
            grid = tuple(pe.grid_size)
        self.grid = grid
        self.active = self.schedule_for(grid)
        b, device = images.shape[0], images.device
        joint = (self.method in ("spatial", "dsm") and self.active.local_blocks
                 and self.options.windows == "joint")
        self.prepared = None
        if joint and _compiling():
            self.prepared = _Prepared(self.active, b, device, self.num_prefix)
        elif joint:
            key = (b, device, grid)
            if key not in self._prepared_cache:
                self._prepared_cache[key] = _Prepared(self.active, b, device, self.num_prefix)
            self.prepared = self._prepared_cache[key]
        if joint:
            n = grid[0] * grid[1]
            self.anchors = torch.arange(n, device=device).expand(b, n)
        if self.options.feature == "random":
            self.generator = torch.Generator().manual_seed(self.options.seed)

    def attn_bias(self, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
        """Proportional attention's additive bias log(size), (B, 1, 1, N), or None."""
        if not self.options.prop_attn or self.size is None:
            return None
        return log_size_bias(self.size, dtype or self.size.dtype)

    def _per_block(self, cache: dict, index: int, device: torch.device, build):
        """``build(step, device)`` for block ``index``'s plan, cached per (grid, block, device).

        Under torch.compile it is built afresh: traced into the graph, a cached tensor made
        there would be a graph output that torch.compile's CUDA graphs overwrite at the next
        replay.
        """
        if _compiling():
            return build(self.active.blocks[index], device)
        key = (self.grid, index, device)
        if key not in cache:
            cache[key] = build(self.active.blocks[index], device)
        return cache[key]

    def square_ids(self, index: int, device: torch.device) -> Tensor:
        """(M,) paper window of each patch position entering local block ``index`` (cached)."""
        return self._per_block(self._square_ids, index, device, lambda step, dev: square_window_ids(
            step.tokens_in - self.num_prefix, step.window, device=dev))

    def match(self, index: int, x: Tensor, metric: Optional[Tensor]) -> Merge:
        """The merge of block ``index`` for tokens x (B, N, C) by their similarity feature
        ``metric`` (B, N, C'); None for random features, drawn here.

        Only called where the schedule merges (r > 0): never in the delay, the first D blocks.
        """
        step = self.active.blocks[index]
        metric = self.feature(x, metric)
        if self.options.reduction == "prune":
            return prune_lowest_norm(metric, step.r, self.num_prefix)
        if step.mode == "local":
            return self.merge_in_windows(index, metric)
        return self.merge_globally(metric, step.r)

    def merge(self, index: int, x: Tensor, metric: Optional[Tensor]) -> Tensor:
        """Block ``index``'s merge of x (B, N, C) by ``metric``: (B, N - r, C). The sizes, the
        source map (when tracing) and the anchors (joint windows) follow it."""
        unmerged, anchors = x, None
        if self.uses_triton(x):  # anchors: the kernel's own, for joint windows
            x, size, merge, anchors = self.merge_fused(index, x, metric)
        else:
            merge = self.match(index, x, metric)
            x, size = merge_wavg(merge, x, self.size)
        if self.trace_source:
            self.source = merge_source(merge, unmerged, self.source)
        if self.anchors is not None:
            if index <= self.prepared.last_anchor_block:
                p = self.num_prefix
                self.anchors = anchors if anchors is not None else self.anchors.gather(1, merge.keep[:, p:] - p)
            else:  # no local block reads them any more
                self.anchors = None
        self.size = size
        return x

    def feature(self, x: Tensor, metric: Optional[Tensor]) -> Tensor:
        """The similarity feature: ``metric`` as the attention gave it, or for
        ``feature="random"`` (metric None) a draw of (B, N, RANDOM_FEATURE_DIM) on the CPU
        generator (the same draws on every device), moved to the tokens' device."""
        if self.options.feature != "random":
            return metric
        shape = (x.shape[0], x.shape[1], RANDOM_FEATURE_DIM)
        return torch.randn(shape, generator=self.generator).to(x.device, x.dtype)

    def uses_triton(self, x: Tensor) -> bool:
        """Whether this forward's merges of tokens x (B, N, C) run the fused Triton kernels:
        always for ``backend="triton"`` (``fused_merge`` raises where they cannot run), for
        ``"auto"`` on CUDA tensors of a dtype and length they take when Triton imports."""
        if self.options.backend != "auto":
            return self.options.backend == "triton"
        return (x.is_cuda and x.dtype in fused.KERNEL_DTYPES and x.shape[1] <= fused.MAX_TOKENS
                and fused.triton_available())

    def merge_fused(self, index: int, x: Tensor, metric: Optional[Tensor]
                    ) -> Tuple[Tensor, Tensor, Merge, Optional[Tensor]]:
        """Block ``index``'s matching and merge of x (B, N, C) in the fused Triton kernels.

        Returns the merged tokens, their sizes, the :class:`Merge` (for source tracing) and,
        for joint windows, the survivors' anchors (else None); the same decisions as
        :meth:`match` then ``merge_wavg``.
        """
        step = self.active.blocks[index]  # step.r is already clamped by the plan (> 0 here)
        kw: dict = {}
        if self.options.reduction == "prune":
            kw["mode"] = fused.PRUNE
        elif step.mode == "local" and self.options.windows == "paper":
            kw["mode"] = fused.PAPER
            kw["window_ids"] = self.square_ids(index, x.device)
            kw["quotas"], kw["quota_starts"] = self.quota_tensors(index, x.device)
        elif step.mode == "local":
            kw["mode"] = fused.JOINT
            kw["anchors"], kw["window_table"] = self.anchors, self.prepared.window_table[index]
        else:
            kw["mode"], kw["tome_order"] = fused.GLOBAL, self.method == "tome"
        return fused.fused_merge(x, self.size, self.feature(x, metric), step.r, self.num_prefix, **kw)

    def quota_tensors(self, index: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """(W,) merges of each paper window entering local block ``index`` and their exclusive
        prefix sums (int32; cached like :meth:`square_ids`)."""
        def build(step, dev):
            quotas = torch.tensor(step.window_quotas, dtype=torch.int32)
            return quotas.to(dev), (quotas.cumsum(0, dtype=torch.int32) - quotas).to(dev)
        return self._per_block(self._quotas, index, device, build)

    def merge_in_windows(self, index: int, metric: Tensor) -> Merge:
        """The local phase (spatial merging, DSM): matching only inside each window."""
        step = self.active.blocks[index]
        if self.options.windows == "paper":
            # the paper's reading: tokens laid on a square in sequence order, a quota per window
            return window_quota_matching(metric, self.square_ids(index, metric.device),
                                         step.num_windows, step.window * step.window,
                                         step.quota, step.r, self.num_prefix)
        # joint windows: of the original patch grid, through each token's anchor patch; the
        # first merging block's layout is known in advance, later ones follow the anchors
        prep = self.prepared
        layout = prep.first_layout if self.size is None else None
        wid = prep.window_table[index].take(self.anchors)
        return window_soft_matching(metric, step.r, wid, step.num_windows,
                                    step.window * step.window, self.num_prefix, layout)

    def merge_globally(self, metric: Tensor, r: int) -> Merge:
        """The global phase: ToMe's bipartite matching over the whole sequence (ToMe itself
        alternates A/B after its own reordering; spatial methods keep sequence order)."""
        order = "tome" if self.method == "tome" else "sequence"
        return bipartite_soft_matching(metric, r, self.num_prefix, order=order)


# --------------------------------------------------------------------------- forwards
def attention_qkv(attn: nn.Module, x: Tensor, fire_hooks: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of a timm ``Attention`` for its input x (B, N, C).

    Returns q, k, v, each (B, H, N, head_dim), with the module's ``q_norm``/``k_norm``
    applied. ``fire_hooks=False`` projects with ``F.linear`` on the ``qkv`` weights, so that
    no hook on ``attn.qkv`` fires (the probes' recomputation).
    """
    b, n, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
    qkv = attn.qkv(x) if fire_hooks else F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k)), v


def log_size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """log(size) (B, N, 1) as an additive attention bias (B, 1, 1, N) in ``dtype``.

    The log is taken of the float32 sizes and rounded once into ``dtype`` (SDPA wants the
    bias in q's dtype). The bias is a view of the first N columns of a zero-filled buffer
    whose last dimension is padded to a multiple of 16, so that its rows are 16-element
    aligned. On an H100 under fp16 (``benchmarks/results/gpu-h100-prop-attn.txt``) an
    unaligned mask made the attention call of ViT-B at batch 256 take 490 µs and the aligned
    one 267 µs (164 µs without a bias).
    """
    b, n, _ = size.shape
    bias = size.new_zeros(b, 1, 1, -(-n // 16) * 16, dtype=dtype)[..., :n]
    return bias.copy_(size.log().view(b, 1, 1, n))


def sized_sdpa(q: Tensor, k: Tensor, v: Tensor, size: Optional[Tensor],
               attn_mask: Optional[Tensor] = None, is_causal: bool = False,
               dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention`` with proportional attention's size bias.

    q, k, v: (B, H, N, head_dim); size: (B, N, 1) token sizes (None: plain attention).
    The bias log(size) enters as a float ``attn_mask`` of shape (B, 1, 1, N) in q's dtype,
    added to ``attn_mask`` if one is given (built by ``log_size_bias``). Returns
    (B, H, N, head_dim).
    """
    bias = None if size is None else log_size_bias(size, q.dtype)
    if attn_mask is not None:
        bias = attn_mask if bias is None else attn_mask + bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal,
                                          dropout_p=dropout_p)


class DSMAttention(Attention):
    """timm ``Attention`` that merges tokens.

    Modifications:

    - proportional attention: log(size) of every token enters the softmax as an additive
      bias (``sized_sdpa``; the explicit path adds ``MergeState.attn_bias``);
    - in a block that merges (``_dsm_wants_metric``), it returns ``(output, metric)``: the
      similarity feature, the heads' mean of ``q``, ``k`` or ``v``, as ToMe's attention does.
    """

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """timm ``Attention.forward`` plus proportional attention's size bias.

        Returns the output (B, N, C); in a block that merges, ``(output, metric)`` with the
        similarity feature (B, N, head_dim), the heads' mean of ``q``, ``k`` or ``v`` (None for
        the other features), as ToMe's attention does.
        """
        st: MergeState = self._dsm_state
        b, n, _ = x.shape
        attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = attention_qkv(self, x)
        size = st.size if st.options.prop_attn else None
        if self.fused_attn:
            out = sized_sdpa(q, k, v, size, attn_mask=attn_mask, is_causal=is_causal,
                             dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            bias = st.attn_bias(q.dtype)
            if attn_mask is not None:
                bias = attn_mask if bias is None else attn_mask + bias
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        out = out.transpose(1, 2).reshape(b, n, attn_dim)
        out = getattr(self, "norm", nn.Identity())(out)
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        if not self._dsm_wants_metric:
            return out
        # a merging block: return the similarity feature with the output, as ToMe does
        feature = st.options.feature
        metric = None
        if feature in ("k", "q", "v"):
            metric = {"k": k, "q": q, "v": v}[feature]
            # half precision: average the heads straight into float32 (matching scores there)
            metric = metric.mean(dim=1, dtype=torch.float32) if metric.dtype in HALF_DTYPES else metric.mean(dim=1)
        return out, metric


class DSMBlock(Block):
    """timm ``Block`` that merges tokens after its attention.

    Modifications, for ``x`` (B, N, C)::

        x = x + ls1(attn(norm1(x)))     # DSMAttention: size bias; the similarity feature
        x, size = merge(x, size)        # r tokens fewer, per the schedule (eager or fused)
        x = x + ls2(mlp(norm2(x)))

    Source maps and joint windows' anchors follow each merge.
    """

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        st: MergeState = self._dsm_state
        step = st.active.blocks[self._dsm_index]
        merging = step.r > 0  # False in the delay (the first D blocks) and wherever r is 0
        if (attn_mask is not None or is_causal) and (merging or st.size is not None):
            raise ValueError("token merging cannot be combined with attn_mask or is_causal")
        self.attn._dsm_wants_metric = merging
        if merging and x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"token merging runs on {', '.join(map(str, FLOAT_DTYPES))} activations; "
                            f"got {x.dtype}")
        attn_out = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        metric = None
        if merging:  # the attention returned (output, its q/k/v feature) for this block
            attn_out, metric = attn_out
            if st.options.feature == "x":
                metric = x  # the block input, before attention
        x = x + self.drop_path1(self.ls1(attn_out))
        if merging:
            x = st.merge(self._dsm_index, x, metric)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class DSMVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` that merges tokens.

    Modifications:

    - ``forward_features`` and ``forward_intermediates`` reset the per-forward merging state
      (sizes, sources, anchors, the schedule for this grid) before the blocks run;
    - ``forward_intermediates`` refuses ``output_fmt="NCHW"`` when tokens merge;
    - ``forward_head`` with ``global_pool="avg"`` averages tokens weighted by their sizes.
    """

    def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
        self._dsm_state.reset(self, x)
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        st: MergeState = self._dsm_state
        fmt = kwargs.get("output_fmt", args[4] if len(args) > 4 else "NCHW")
        if fmt == "NCHW" and any(st.active.r):
            raise ValueError("token merging changes the number of tokens, so intermediates cannot "
                             "be reshaped to NCHW; pass output_fmt='NLC'")
        st.reset(self, x)
        return super().forward_intermediates(x, *args, **kwargs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        st: MergeState = self._dsm_state
        if self.global_pool == "avg" and st.size is not None:
            # a merged token stands for `size` patches: pool as if they were all still there
            start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
            w = st.size[:, start:]
            x = ((x[:, start:] * w).sum(dim=1) / w.sum(dim=1)).to(x.dtype)
            x = self.head_drop(self.fc_norm(x))
            return x if pre_logits else self.head(x)
        return super().forward_head(x, pre_logits=pre_logits)


_CLASS_CACHE: Dict[Tuple[type, type], type] = {}
for _dsm, _timm in ((DSMVisionTransformer, VisionTransformer), (DSMBlock, Block), (DSMAttention, Attention)):
    _dsm._dsm_original = _timm  # what unpatch restores


def _patched_class(cls: type, dsm: type) -> type:
    """The class a ``cls`` module becomes: ``dsm`` itself for timm's own class (``DSMBlock``
    for ``Block``); for a subclass of it, ``DSM<name>`` with ``dsm``'s modifications in front
    of the subclass's own (one class per pair, remembered, so repatching makes none anew)."""
    if cls is dsm._dsm_original:
        return dsm
    key = (cls, dsm)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"DSM{cls.__name__}", (dsm, cls), dict(_dsm_original=cls, __module__=__name__))
    return _CLASS_CACHE[key]


# --------------------------------------------------------------------------- public API
def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"dsm_lite.patch supports timm VisionTransformer models (vit_*, deit_*); "
                        f"got {type(model).__name__}")
    bad = [type(b).__name__ for b in model.blocks if not isinstance(b, Block)
           or not isinstance(b.attn, Attention)]
    if bad:
        raise TypeError(f"dsm_lite.patch supports timm's standard Block and Attention; this model "
                        f"uses {sorted(set(bad))}")
    if model.global_pool not in SUPPORTED_POOLS or getattr(model, "attn_pool", None) is not None:
        raise TypeError(f"global_pool={model.global_pool!r} is not supported; use one of "
                        f"{SUPPORTED_POOLS}")


def _check_r(r: RSpec) -> None:
    """Reject tensors in r with one clear message (parse_r checks the rest)."""
    values = r if isinstance(r, (list, tuple)) else [r]
    if any(isinstance(v, Tensor) for v in values):
        raise TypeError("r must be a Python int, a list of ints or an (r, inflection) tuple, not a "
                        "tensor: every block removes a fixed number of tokens, decided before any "
                        "image is seen (a batch, and a compiled graph, needs the same token counts "
                        f"for every image), so r cannot depend on the images; got {r!r}")


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by dsm_lite."""
    return hasattr(model, "_dsm_state")


def patch(
    model: nn.Module,
    method: str = "tome",
    r: RSpec = 0,
    *,
    prop_attn: bool = True,
    trace_source: bool = False,
    feature: str = "k",
    reduction: str = "merge",
    delay: Optional[int] = None,
    window: int = 7,
    window_growth: int = 1,
    local_blocks: Optional[int] = None,
    windows: str = "paper",
    seed: int = 0,
    backend: str = "auto",
) -> nn.Module:
    """Make a timm ViT merge tokens, in place; returns the model.

    Args:
        model: a timm ``VisionTransformer`` (vit_*, deit_* including distilled, with
            registers or LayerScale). Patching an already patched model replaces the options.
        method: ``"tome"``, ``"spatial"`` or ``"dsm"`` (see :func:`dsm_lite.schedules.plan`).
            Spatial merging and DSM use the paper's windows by default: the tokens are laid
            on a square in sequence order and each window merges ``ceil(r / windows)`` of its
            own tokens (at most half of them), so local blocks remove about r.
        r: tokens removed per block: int, per-block list, or ToMe's ``(r, inflection)``.
        prop_attn: proportional attention (add log(size) to attention logits).
        trace_source: track which patches each token holds (``model._dsm_state.source``).
        feature: similarity feature: ``"k"`` (keys averaged over heads, default), ``"q"``,
            ``"v"``, ``"x"`` (the block input) or ``"random"`` (seeded by ``seed``: drawn on
            a CPU generator and moved to the tokens' device, so a seed gives the same draws
            on every device).
        reduction: ``"merge"`` or ``"prune"`` (drop the lowest-norm tokens of ``feature``).
        delay, window, window_growth, local_blocks: spatial/DSM options, see ``plan``.
        windows: ``"paper"`` (default) or ``"joint"`` (windows of the original patch grid via
            each token's anchor, the best r merges over all windows together), see ``plan``.
        backend: where each merging block matches and merges: ``"eager"`` (PyTorch ops, any
            device and dtype), ``"triton"`` (two fused kernels per block,
            :mod:`dsm_lite.fused_merge`: CUDA tensors, or CPU ones under Triton's interpreter;
            float16, bfloat16, float32) or ``"auto"`` (default: Triton on CUDA when it imports
            and takes the dtype, eager otherwise, so CPU and float64 runs stay eager). Both
            make the same merge decisions; outputs agree to float32 rounding.

    Raises:
        TypeError: the model is not a supported timm ViT (nothing is changed).
        ValueError: an option is invalid (nothing is changed).
        dsm_lite.fused_merge.TritonUnavailableError: ``backend="triton"`` without Triton
            (nothing is changed); at the forward pass, on CPU tensors with the interpreter off.

    The patched model runs wherever it is: every tensor the merging creates (indices,
    anchors, sizes, source maps) is made on the device of the tokens it works on.
    """
    _check_supported(model)
    _check_r(r)
    # validated here, before the model is touched: a rejected call leaves any previous patch
    options = MergeOptions(method, r, prop_attn=prop_attn, trace_source=trace_source, feature=feature,
                           reduction=reduction, delay=delay, window=window, window_growth=window_growth,
                           local_blocks=local_blocks, windows=windows, seed=seed, backend=backend)
    state = MergeState(model, options)
    if is_patched(model):
        unpatch(model)
    model._dsm_state = state
    model.__class__ = _patched_class(model.__class__, DSMVisionTransformer)
    for i, block in enumerate(model.blocks):
        block._dsm_state, block._dsm_index = state, i
        block.attn._dsm_state, block.attn._dsm_wants_metric = state, False
        block.__class__ = _patched_class(block.__class__, DSMBlock)
        block.attn.__class__ = _patched_class(block.attn.__class__, DSMAttention)
    return model


def patch_settings(model: nn.Module) -> Optional[dict]:
    """The keywords of the :func:`patch` call that made ``model``'s current patch (so that
    ``patch(model, **patch_settings(model))`` re-creates it), or None when unpatched."""
    if not is_patched(model):
        return None
    return model._dsm_state.options.as_dict()


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the exact original classes and behaviour; a no-op on an unpatched model."""
    if not is_patched(model):
        return model
    for block in model.blocks:
        block.attn.__class__ = block.attn._dsm_original
        block.__class__ = block._dsm_original
        del block._dsm_state, block._dsm_index, block.attn._dsm_state, block.attn._dsm_wants_metric
    model.__class__ = model._dsm_original
    del model._dsm_state
    return model


def repatch(model: nn.Module, settings: Optional[Dict[str, Any]]) -> None:
    """Unpatch ``model``, then patch it with ``settings`` (``patch`` keywords, as
    :func:`patch_settings` returns them) unless they are None."""
    unpatch(model)
    if settings is not None:
        patch(model, **settings)


@contextlib.contextmanager
def unpatched(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily dense: ``model`` without merging inside the ``with`` block, patched again
    exactly as before on exit, also when the block raises (a no-op pair on an unpatched model)."""
    saved = patch_settings(model)
    unpatch(model)
    try:
        yield model
    finally:
        repatch(model, saved)


def schedule(model: nn.Module, method: Optional[str] = None, r: Optional[RSpec] = None,
             grid: Optional[Tuple[int, int]] = None, **options) -> Schedule:
    """The block-by-block :class:`Schedule` of a method on a model.

    With no ``method``, the schedule the patched model runs now. Otherwise, the schedule
    ``patch(model, method, r, **options)`` would run, without patching anything (options as
    :func:`patch`, e.g. ``windows="joint"``; spatial merging and DSM default to the paper's
    windows). ``grid`` overrides the patch grid.
    """
    if method is None:
        if not is_patched(model):
            raise ValueError("model is not patched: pass method= and r=")
        return model._dsm_state.active if grid is None else model._dsm_state.schedule_for(grid)
    _check_supported(model)
    return MergeOptions(method, r if r is not None else 0, **options).plan(ModelShape.from_model(model, grid))


def attention_bias(module: nn.Module) -> Optional[Tensor]:
    """The additive float bias (B, 1, 1, N) a patched attention module applies to its current
    input (proportional attention), or None when unpatched or when it applies none."""
    state = getattr(module, "_dsm_state", None)
    return None if state is None else state.attn_bias()


@torch.no_grad()
def trace_sources(model: nn.Module, images: Tensor,
                  after_block: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Run a patched model with source tracking; return (logits, groups).

    Args:
        model: a model patched by :func:`patch`.
        images: (B, 3, H, W) on any device: they are moved to the model's device (so a CPU
            image set works with a model on the GPU).
        after_block: read the groups right after this block (default: the last block).

    Returns:
        ``logits`` (B, K) and ``groups`` (B, h, w) long, both on the CPU. ``groups`` holds,
        for each patch of the h x w grid, the index of the token holding it (among the patch
        tokens, prefix excluded) at the end of the network, or right after block
        ``after_block``. Patches sharing an index were merged together.
    """
    if not is_patched(model):
        raise ValueError("trace_sources needs a model patched by dsm_lite.patch")
    st: MergeState = model._dsm_state
    depth = len(model.blocks)
    last = depth - 1 if after_block is None else after_block
    if not 0 <= last < depth:
        raise ValueError(f"after_block must be in [0, {depth}), got {after_block}")
    seen = {}
    hook = model.blocks[last].register_forward_hook(lambda *_: seen.update(source=st.source))
    logits = _forward_tracing(model, images, [hook])
    return logits.cpu(), _groups(seen.get("source"), st, images.shape[0], logits.device).cpu()


@torch.no_grad()
def trace_sources_per_block(model: nn.Module, images: Tensor) -> Tuple[Tensor, Tensor]:
    """Like :func:`trace_sources`, with the groups read right after *every* block, in one pass.

    Returns:
        ``logits`` (B, K) and ``groups`` (L, B, h, w) long, both on the CPU: ``groups[l]`` is
        what ``trace_sources(model, images, after_block=l)[1]`` gives.
    """
    if not is_patched(model):
        raise ValueError("trace_sources_per_block needs a model patched by dsm_lite.patch")
    st: MergeState = model._dsm_state
    seen: dict = {}
    hooks = [blk.register_forward_hook(
        lambda *_, i=i: seen.__setitem__(i, None if st.source is None else st.source.clone()))
        for i, blk in enumerate(model.blocks)]
    logits = _forward_tracing(model, images, hooks)
    b = images.shape[0]
    groups = torch.stack([_groups(seen[i], st, b, logits.device) for i in range(len(model.blocks))]).cpu()
    return logits.cpu(), groups


@torch.no_grad()
def trace_windows(model: nn.Module, images: Tensor) -> Dict[str, Tensor]:
    """Where joint windows put every patch, block by block: the anchor rule made visible.

    For a model patched with ``windows="joint"`` (spatial merging or DSM), reads at the input
    of every local block which token holds each patch, that token's anchor patch, and the
    window of the anchor, which is the window the whole token is matched in.

    Returns:
        ``blocks`` (T,) indices of the local blocks; ``window`` (T, B, h, w) window of each
        patch's token; ``anchor`` (T, B, h, w) bool, True where the patch is its token's
        anchor; ``groups`` (T, B, h, w) token index of each patch, as :func:`trace_sources`
        gives it (all on the CPU).

    Raises:
        ValueError: the model is not patched, or its windows are not joint, or it has no
            local block.
    """
    if not is_patched(model):
        raise ValueError("trace_windows needs a model patched by dsm_lite.patch")
    st: MergeState = model._dsm_state
    if st.method not in ("spatial", "dsm") or st.options.windows != "joint":
        raise ValueError("trace_windows follows anchors, which only joint windows have: patch with "
                         "method='spatial' or 'dsm' and windows='joint'")
    local = [b.index for b in st.schedule_for(st.grid).blocks if b.mode == "local"]
    if not local:
        raise ValueError("this schedule has no local block")
    seen: dict = {}

    def grab(i):
        def hook(*_):
            seen[i] = (st.anchors.clone(), None if st.source is None else st.source.clone())
        return hook

    hooks = [model.blocks[i].register_forward_pre_hook(grab(i)) for i in local]
    _forward_tracing(model, images, hooks)
    b, (h, w) = images.shape[0], st.grid
    out = {"blocks": torch.tensor(local), "window": [], "anchor": [], "groups": []}
    for i in local:
        anchors, source = seen[i]
        groups = _groups(source, st, b, anchors.device).view(b, -1)  # token per patch
        anchor_of_patch = anchors.gather(1, groups)  # (B, h * w): the anchor of each patch's token
        table = st.prepared.window_table[i].to(anchors.device)
        out["window"].append(table[anchor_of_patch].view(b, h, w).cpu())
        out["anchor"].append((anchor_of_patch == torch.arange(h * w, device=anchors.device)).view(b, h, w).cpu())
        out["groups"].append(groups.view(b, h, w).cpu())
    return {k: v if k == "blocks" else torch.stack(v) for k, v in out.items()}


def _forward_tracing(model: nn.Module, images: Tensor, hooks: List) -> Tensor:
    """One forward pass with source tracking on; ``hooks`` (already registered) are removed
    afterwards, whatever happens."""
    st: MergeState = model._dsm_state
    old, st.trace_source = st.trace_source, True
    try:
        return model(to_model(model, images))
    finally:
        st.trace_source = old
        for hook in hooks:
            hook.remove()


def _groups(source: Optional[Tensor], st: "MergeState", b: int, device) -> Tensor:
    """(B, h, w) group index per patch from a source map (B, N, N0), None: nothing merged; on
    ``device`` (the source's, when there is one)."""
    h, w = st.grid
    p = st.num_prefix
    if source is None:  # nothing merged yet: every patch is its own group
        groups = torch.arange(h * w, device=device).expand(b, -1)
    else:
        groups = source[:, p:, p:].argmax(dim=1)
    return groups.reshape(b, h, w)
