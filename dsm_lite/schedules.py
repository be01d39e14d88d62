"""Merging schedules: what every block does, decided before any image is seen.

A schedule depends only on the model's shape and the options, never on the photo, because
every method removes a fixed number of tokens per block (with the paper's windows, each
window's share depends only on the token count and the window size). It says, block by
block, whether the block merges (``none``, ``local`` inside windows, or ``global``), with
which windows and per-window quotas, how many tokens go in and out, and the MACs the block
will cost. :class:`MergeOptions` holds every option of a method, validated once, and its
:meth:`~MergeOptions.plan` builds the schedule (:func:`plan` is the same with keywords);
``dsm_lite.patch`` runs exactly this plan, and ``dsm_lite.count_macs`` measures it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from .merging import max_reduction
from .windows import num_windows, square_layout, square_side, window_quotas

__all__ = ["RSpec", "MergeOptions", "BlockPlan", "Schedule", "ModelShape", "parse_r", "default_delay", "plan",
           "delayed_tome_r", "closest_macs", "BACKENDS"]

RSpec = Union[int, Sequence[int], Tuple[int, float]]
METHODS = ("tome", "spatial", "dsm")
#: window readings of spatial merging and DSM (see :func:`plan`)
WINDOWS = ("paper", "joint")
FEATURES = ("k", "q", "v", "x", "random")
#: where a merging block's matching and merge run: ``"eager"`` PyTorch ops
#: (:mod:`dsm_lite.merging`), ``"triton"`` two fused kernels (:mod:`dsm_lite.fused_merge`),
#: ``"auto"`` Triton for CUDA tensors of a dtype it takes when it imports, else eager
BACKENDS = ("auto", "triton", "eager")
#: channels of the random similarity feature (the paper's "random" ablation)
RANDOM_FEATURE_DIM = 64


def parse_r(num_blocks: int, r: RSpec) -> List[int]:
    """Tokens to remove in each block, as ToMe's ``parse_r``.

    ``r`` is an int (the same in every block), a per-block list (padded with zeros), or,
    as in ToMe, any 2-tuple ``(r, inflection)``: a linear ramp from ``r * (1 - inflection)``
    to ``r * (1 + inflection)`` with the same total, truncated to ints as ToMe does
    (``(r, -1)`` decreases to zero). Per-block values must therefore be a list.
    """
    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(r, bool):
        raise TypeError("r must be an int, a list of ints or an (r, inflection) tuple")
    if isinstance(r, int):
        r, inflect = r, 0.0
    elif isinstance(r, tuple) and len(r) == 2 and all(map(is_number, r)):
        r, inflect = int(r[0]), float(r[1])
    elif isinstance(r, list):
        values = [int(v) for v in r]
        if len(values) > num_blocks:
            raise ValueError(f"r lists {len(values)} blocks but the model has {num_blocks}")
        if any(v < 0 for v in values):
            raise ValueError(f"r must be non-negative, got {values}")
        return values + [0] * (num_blocks - len(values))
    else:
        raise TypeError(f"r must be an int, a list of ints or an (r, inflection) tuple, got {r!r}")
    if r < 0:
        raise ValueError(f"r must be non-negative, got {r}")
    if not -1.0 <= inflect <= 1.0:
        raise ValueError(f"inflection must be in [-1, 1], got {inflect}")
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / max(num_blocks - 1, 1)
    return [int(low + step * i) for i in range(num_blocks)]


def default_delay(depth: int) -> int:
    """The paper's delay D: the block where convergent attention begins, about depth / 6."""
    return int(math.floor(depth / 6 + 0.5))


@dataclass(frozen=True)
class ModelShape:
    """What a schedule needs to know about a ViT: sizes only, no weights."""

    depth: int
    dim: int
    heads: int
    head_dim: int
    mlp_hidden: int
    grid: Tuple[int, int]
    patch: Tuple[int, int]
    in_chans: int
    num_prefix: int
    num_classes: int
    layer_scale: bool = False
    qk_norm: bool = False
    attn_norm: bool = False
    mlp_norm: bool = False
    norm_pre: bool = False
    final_norm: bool = True
    fc_norm: bool = False
    global_pool: str = "token"
    distilled_head: bool = False

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_model(cls, model, grid: Optional[Tuple[int, int]] = None) -> "ModelShape":
        """Read the shape of a timm VisionTransformer (``grid`` overrides the patch grid)."""
        block = model.blocks[0]
        attn = block.attn
        is_ln = lambda m: isinstance(m, nn.LayerNorm)  # noqa: E731
        pe = model.patch_embed
        return cls(
            depth=len(model.blocks),
            dim=model.embed_dim,
            heads=attn.num_heads,
            head_dim=attn.head_dim,
            mlp_hidden=block.mlp.fc1.out_features,
            grid=tuple(grid or pe.grid_size),
            patch=tuple(pe.patch_size),
            in_chans=pe.proj.in_channels,
            num_prefix=model.num_prefix_tokens,
            num_classes=getattr(model, "num_classes", 0),
            layer_scale=not isinstance(block.ls1, nn.Identity),
            qk_norm=is_ln(attn.q_norm),
            attn_norm=is_ln(getattr(attn, "norm", None)),
            mlp_norm=is_ln(getattr(block.mlp, "norm", None)),
            norm_pre=is_ln(model.norm_pre),
            final_norm=is_ln(model.norm),
            fc_norm=is_ln(model.fc_norm),
            global_pool=model.global_pool,
            distilled_head=isinstance(getattr(model, "head_dist", None), nn.Linear),
        )


@dataclass(frozen=True)
class BlockPlan:
    """One block of a schedule.

    ``tokens_in`` and ``tokens_out`` count every token (prefix included) and ``r`` is what
    the block removes. For local blocks, ``num_windows`` is the windows per image and
    ``window`` the window side: in original patches with joint windows; in tokens of the
    current ``side x side`` square with paper windows, where ``quota`` is each window's
    quota and ``window_quotas`` the merges of each window (the quota, capped at half the
    window's real tokens; they sum to ``r``).
    """

    index: int
    mode: str
    r: int
    tokens_in: int
    tokens_out: int
    window: Optional[int] = None
    num_windows: Optional[int] = None
    macs: int = 0
    side: Optional[int] = None
    quota: Optional[int] = None
    window_quotas: Optional[Tuple[int, ...]] = None


@dataclass
class Schedule:
    """A full plan: every block's :class:`BlockPlan` plus the model-level MACs."""

    method: str
    shape: ModelShape
    blocks: List[BlockPlan]
    options: dict = field(default_factory=dict)
    stem_macs: int = 0
    head_macs: int = 0

    @property
    def macs(self) -> int:
        """Predicted MACs for one image, counted as torchprofile counts them."""
        return self.stem_macs + sum(b.macs for b in self.blocks) + self.head_macs

    @property
    def tokens(self) -> List[int]:
        """Tokens entering each block, then the count leaving the last one."""
        return [b.tokens_in for b in self.blocks] + [self.blocks[-1].tokens_out]

    @property
    def r(self) -> List[int]:
        return [b.r for b in self.blocks]

    @property
    def local_blocks(self) -> int:
        return sum(b.mode == "local" for b in self.blocks)

    def to_frame(self):
        """The schedule as a pandas DataFrame, one row per block."""
        import pandas as pd  # here, not at the top: `import dsm_lite` stays free of pandas

        rows = [
            dict(block=b.index, mode=b.mode, side=b.side, window=b.window, windows=b.num_windows,
                 quota=b.quota, window_quotas=b.window_quotas, tokens_in=b.tokens_in, r=b.r,
                 tokens_out=b.tokens_out, mmacs=b.macs / 1e6)
            for b in self.blocks
        ]
        return pd.DataFrame(rows).set_index("block")

    def table(self) -> str:
        """A plain-text table, one line per block, for printing."""
        windows = self.options.get("windows")
        name = f"{self.method} ({windows} windows)" if self.method != "tome" and windows else self.method
        lines = [f"{name}: {self.macs / 1e9:.3f} GMACs per image, "
                 f"{self.tokens[0]} -> {self.tokens[-1]} tokens, "
                 f"{self.local_blocks} local block(s)",
                 # at most 80 characters a line: the book's text outputs show about 86
                 "block  mode    side  window  windows  per-window merges    in    r   out   MMACs"]
        for b in self.blocks:
            win = f"{b.window}x{b.window}" if b.window else "-"
            nw = str(b.num_windows) if b.num_windows else "-"
            side = str(b.side) if b.side else "-"
            lines.append(f"{b.index:5d}  {b.mode:<6}  {side:>4}  {win:>6}  {nw:>7}  "
                         f"{_quota_text(b):<17}  {b.tokens_in:4d}  {b.r:3d}  "
                         f"{b.tokens_out:4d}  {b.macs / 1e6:6.1f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _quota_text(b: BlockPlan) -> str:
    """Per-window merges of a paper-windows block, e.g. ``4,4,4,1``; long lists summarised."""
    if b.window_quotas is None:
        return "-"
    qs = b.window_quotas
    if len(qs) <= 6:
        return ",".join(map(str, qs))
    capped = sum(q < b.quota for q in qs)
    return f"{b.quota} each, {capped} capped"


def _block_macs(s: ModelShape, n_in: int, n_out: int, mode: str, windows: int,
                window: Optional[int], feature: str, reduction: str) -> int:
    """MACs of one block with ``n_in`` tokens before the merge and ``n_out`` after it.

    Counted the way torchprofile counts timm's ops: linear layers, fused attention
    (QK^T and AV), affine LayerNorms and elementwise multiplies (LayerScale, the merge's
    size-weighted pull of each moved row)
    one MAC per output element; the matching's similarity matmul and the head-average of the
    similarity feature are counted too, because they are real work added by merging.
    """
    c, a, hd = s.dim, s.heads * s.head_dim, s.head_dim
    macs = n_in * c  # norm1
    macs += n_in * c * 3 * a  # qkv
    macs += 2 * n_in * a if s.qk_norm else 0
    macs += 2 * n_in * n_in * a  # softmax(QK^T) V
    macs += n_in * a if s.attn_norm else 0
    macs += n_in * a * c  # proj
    macs += n_in * c if s.layer_scale else 0
    if n_out < n_in:
        if feature in ("k", "q", "v"):
            macs += n_in * hd  # mean over heads
        if reduction == "merge":
            fd = {"x": c, "random": RANDOM_FEATURE_DIM}.get(feature, hd)
            if mode == "local":
                half = (window * window + 1) // 2
                macs += windows * half * half * fd
            else:
                macs += ((n_in + 1) // 2) * (n_in // 2) * fd
            macs += (n_in - n_out) * c  # each moved row's pull towards its destination
    macs += n_out * c  # norm2
    macs += n_out * c * s.mlp_hidden * 2  # fc1 + fc2
    macs += n_out * s.mlp_hidden if s.mlp_norm else 0
    macs += n_out * c if s.layer_scale else 0
    return macs


def plan(
    shape: ModelShape,
    method: str = "tome",
    r: RSpec = 0,
    *,
    delay: Optional[int] = None,
    window: int = 7,
    window_growth: int = 1,
    local_blocks: Optional[int] = None,
    feature: str = "k",
    reduction: str = "merge",
    prop_attn: bool = True,
    windows: str = "paper",
) -> Schedule:
    """Build the block-by-block schedule of a method.

    Args:
        shape: the model's :class:`ModelShape`.
        method: ``"tome"`` (global merging in every block), ``"spatial"`` (windowed merging
            growing to global, from block 0) or ``"dsm"`` (no merging for ``delay`` blocks, then
            as spatial).
        r: tokens removed per merging block (int, per-block list, or ``(r, inflection)``);
            blocks before the delay remove none. Each global block's r is clamped to what is
            possible; local blocks remove what their windows give (see ``windows``).
        delay: D, blocks without merging. DSM's default is :func:`dsm_lite.default_delay`; ToMe's and
            spatial's is 0.
        window: initial window side w (block 0's), see ``windows``.
        window_growth: how much the window grows per block, see ``windows``.
        local_blocks: optional cap on the number of local blocks, counted from block D
            (None: until the window covers the tokens; 0: no local merging).
        feature: similarity feature, one of ``k q v x random``.
        reduction: ``"merge"`` (size-weighted average) or ``"prune"`` (drop lowest-norm;
            always global).
        prop_attn: proportional attention (does not change MACs; kept for the record).
        windows: how spatial merging and DSM choose windows and merges.

            ``"paper"`` (default), the reading that fits the paper's Table 2 MACs: before
            block i, the M patch tokens are laid row-major, in sequence order, on a square
            of side ``S = ceil(sqrt(M))`` padded at the bottom right, and cut into windows
            ``w_i = window + i * window_growth`` tokens wide (the window grows in every
            block, merging or not, so DSM's first local block uses ``window + D * growth``),
            ``ceil(S / w_i)`` per side. While ``w_i < S`` the block is local: each window
            merges ``ceil(r / windows)`` of its own tokens (``ceil(r / 4)`` on a 14 x 14
            grid), but never more than half of its real tokens, so a block may remove a
            few more or fewer than r; from the first block with ``w_i >= S`` on, merging is
            global (r per block, as ToMe).

            ``"joint"``, this package's earlier reading: windows are squares of the original
            patch grid, a token's window is the one of its anchor patch, and the best r
            proposals over all windows of an image are merged (exactly r per block). Local
            block j (counted from D) uses windows of ``round((w + j * growth) * sqrt(N0 / M_j))``
            original patches, i.e. windows that hold about ``(w + j * growth)^2`` tokens at
            the current token density (N0 patches at the start, M_j entering block j). Once a
            window covers the whole grid, merging is global for the rest of the network.
    """
    return MergeOptions(method, r, prop_attn=prop_attn, feature=feature, reduction=reduction, delay=delay,
                        window=window, window_growth=window_growth, local_blocks=local_blocks,
                        windows=windows).plan(shape)


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merging method, validated once: what ``dsm_lite.patch`` takes.

    ``patch`` builds one, the model's :class:`~dsm_lite.patching.MergeState` keeps it, its
    :meth:`plan` gives the schedule (with ``r`` per block), and ``patch_settings`` and the
    sweeps read its fields. The fields and their meaning are :func:`dsm_lite.patch`'s
    keywords (``method``, ``r`` and the rest); :func:`plan` documents the schedule's.

    Raises:
        ValueError: an unknown method, feature, reduction, window reading or backend, or an
            impossible delay or window.
    """

    method: str = "tome"
    r: RSpec = 0
    prop_attn: bool = True
    trace_source: bool = False
    feature: str = "k"
    reduction: str = "merge"
    delay: Optional[int] = None
    window: int = 7
    window_growth: int = 1
    local_blocks: Optional[int] = None
    windows: str = "paper"
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("feature", self.feature, FEATURES),
                                     ("reduction", self.reduction, ("merge", "prune")),
                                     ("windows", self.windows, WINDOWS), ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.method == "spatial" and self.delay not in (None, 0):
            raise ValueError("method='spatial' merges from block 0; use method='dsm' for a delay")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive int, got {self.window!r}")
        if self.window_growth < 0:
            raise ValueError(f"window_growth must be >= 0, got {self.window_growth}")
        if self.delay is not None and self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")

    def as_dict(self) -> Dict[str, Any]:
        """Every field: ``patch(model, **options.as_dict())`` re-creates the patch."""
        return asdict(self)

    def delay_for(self, depth: int) -> int:
        """D, the blocks without merging: ``delay``, or by default depth/6 for DSM, 0 otherwise."""
        if self.delay is not None:
            return self.delay
        return default_delay(depth) if self.method == "dsm" else 0

    def plan(self, shape: ModelShape) -> Schedule:
        """The block-by-block :class:`Schedule` of these options on a model of ``shape``:
        ``r`` per block (:func:`parse_r`), none in the delay, each block's r then clamped
        to what its windows or the sequence allow."""
        delay = self.delay_for(shape.depth)
        wanted = [0 if i < delay else v for i, v in enumerate(parse_r(shape.depth, self.r))]
        n, blocks = shape.num_prefix + shape.num_patches, []
        for i, want in enumerate(wanted):
            block = self._block(shape, i, i - delay, n, want)
            blocks.append(block)
            n = block.tokens_out
        stem, head = _stem_head_macs(shape, n, any(b.r for b in blocks))
        options = dict(r=self.r, delay=delay, window=self.window, window_growth=self.window_growth,
                       local_blocks=self.local_blocks, feature=self.feature, reduction=self.reduction,
                       prop_attn=self.prop_attn, windows=self.windows)
        return Schedule(self.method, shape, blocks, options, stem, head)

    def _block(self, shape: ModelShape, i: int, j: int, n: int, want: int) -> BlockPlan:
        """Block ``i`` (``j`` counted from the delay) with ``n`` tokens in and ``want`` to remove."""
        p, n0 = shape.num_prefix, shape.num_patches
        may_be_local = (self.method in ("spatial", "dsm") and self.reduction == "merge" and j >= 0
                        and (self.local_blocks is None or j < self.local_blocks))
        if self.windows == "paper":
            side = self.window + i * self.window_growth
            if want > 0 and may_be_local and side < square_side(n - p):
                block = _paper_local_block(shape, i, n, want, side, self.feature)
                if block.r > 0:
                    return block
                want = 0  # windows too small to merge anything (e.g. 1 x 1)
            may_be_local = False
        mode, win, nwin = "none", None, None
        if want > 0 and may_be_local:
            side = int(math.floor((self.window + j * self.window_growth) * math.sqrt(n0 / (n - p)) + 0.5))
            if side < max(shape.grid):
                mode, win = "local", max(side, 1)
                wy, wx = num_windows(shape.grid, win)
                nwin = wy * wx
        if want > 0 and mode == "none":
            mode = "global"
        if mode == "local":
            limit = max((n - p - nwin) // 2, 0)
        elif self.reduction == "prune":
            limit = max(n - p - 1, 0)
        else:
            limit = max_reduction(n, p)
        got = min(want, limit)
        if got == 0:
            mode, win, nwin = "none", None, None
        macs = _block_macs(shape, n, n - got, mode, nwin or 1, win, self.feature, self.reduction)
        return BlockPlan(i, mode, got, n, n - got, win, nwin, macs)


def _stem_head_macs(shape: ModelShape, n_out: int, merged: bool) -> Tuple[int, int]:
    """MACs of the patch embedding (and pre-norm), and of the head for ``n_out`` tokens."""
    c, p, n0 = shape.dim, shape.num_prefix, shape.num_patches
    stem = n0 * c * shape.in_chans * shape.patch[0] * shape.patch[1]
    stem += (p + n0) * c if shape.norm_pre else 0
    head = n_out * c if shape.final_norm else 0
    if shape.global_pool == "avg":
        head += (n_out - p) * c if merged else c  # size-weighted once merged
    head += c if shape.fc_norm else 0
    head += c * shape.num_classes * (2 if shape.distilled_head else 1)
    return stem, head


def _paper_local_block(shape: ModelShape, index: int, n: int, r: int, window: int,
                       feature: str) -> BlockPlan:
    """A local block with paper windows: ``n`` tokens in (prefix included), ``r`` wanted."""
    p = shape.num_prefix
    layout = square_layout(n - p, window)
    quota = -(-r // layout.num_windows)
    quotas = window_quotas(layout.counts, quota)
    got = sum(quotas)
    macs = _block_macs(shape, n, n - got, "local", layout.num_windows, window, feature, "merge")
    return BlockPlan(index, "local", got, n, n - got, window, layout.num_windows, macs,
                     side=layout.side, quota=quota, window_quotas=quotas)


def delayed_tome_r(shape: ModelShape, r: int, delay: int) -> List[int]:
    """Per-block r of ToMe delayed by ``delay`` blocks, at the MACs of ToMe(r) from block 0.

    The first ``delay`` blocks merge nothing; the rest merge ``base + 1`` tokens in their
    first ``extra`` blocks and ``base`` after. Of every ``base`` in [r, 4r] and ``extra`` in
    [0, depth - delay), the schedule whose MACs are closest to ToMe(r)'s wins (the first one
    found on a tie). Chapter 2 compares delayed and undelayed ToMe at equal compute with it.
    """
    target = plan(shape, "tome", r).macs
    rest = shape.depth - delay
    best: Optional[Schedule] = None
    for base in range(r, 4 * r + 1):
        for extra in range(rest):
            s = plan(shape, "tome", [0] * delay + [base + 1] * extra + [base] * (rest - extra))
            if best is None or abs(s.macs - target) < abs(best.macs - target):
                best = s
    return list(best.r)


def closest_macs(shape: ModelShape, method: str, target: float, rs: Sequence[int] = range(1, 64),
                 **options) -> Schedule:
    """The schedule of ``method`` whose MACs come closest to ``target``, over the r in ``rs``
    (the first one on a tie): how the book puts methods at equal compute."""
    return min((plan(shape, method, r, **options) for r in rs), key=lambda s: abs(s.macs - target))
