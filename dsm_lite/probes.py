"""Probes: look inside a timm Vision Transformer without changing what it computes.

The central object is :class:`AttentionProbe`, a context manager that installs
forward hooks on every ``model.blocks[l]`` (and its ``attn`` / ``ls1``
sub-modules), records what the block sees and produces, and removes every hook
on exit. Nothing in the model is replaced: with or without the probe, the
model's outputs are bit-identical.

For block ``l`` (pre-norm block, paper eq. 1) the probe can record

========== ================================================ =====================
name       meaning                                          shape
========== ================================================ =====================
x_in       block input X^l                                  (B, N_l, C)
attn_out   attention branch before the residual,            (B, N_l, C)
           ``ls1(attn(norm1(X^l)))``
x_mid      residual stream after attention,                 (B, N_l, C)
           X̄^l = X^l + attn_out (before any token merging)
x_out      block output X^{l+1} (after merging, if any)     (B, N_{l+1}, C)
attn       attention probabilities per head                 (B, H, N_l, N_l)
received   attention received per token, mean over heads    (B, N_l)
           and queries (each row sums to 1)
norms      L2 norm of every output token                    (B, N_{l+1})
norms_in   L2 norm of every input token                     (B, N_l)
========== ================================================ =====================

The attention probabilities are *recomputed* from the attention module's own
input with its own ``qkv``, ``q_norm``, ``k_norm`` and ``scale`` (timm uses
fused SDPA, which never materialises them). On a model patched by
:func:`dsm_lite.patch`, the proportional-attention bias of token merging
(:func:`dsm_lite.patching.attention_bias`) is added to the logits, so that the
probabilities are those the patched model actually uses.

On top of the probe, pure tensor functions compute the paper's quantities:
token similarity *Sim* (paper eq. 2) and its change during attention, the
attention received per token, the share of the top-k tokens, high-norm outlier
tokens, and :func:`transition_block`, the delay D of delayed merging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .devices import DeviceMismatchError, check_available, check_same_device, model_device, same_device, to_model
from .numerics import widen
from .patching import attention_bias, attention_qkv

__all__ = [
    "CAPTURABLE",
    "AttentionProbe",
    "ProbeResult",
    "run_probe",
    "attention_probs",
    "token_similarity",
    "sim_per_block",
    "delta_sim",
    "sim_extras",
    "measure_sim",
    "SimResult",
    "attention_received",
    "topk_share",
    "prefix_share",
    "token_norm_ratio",
    "find_outliers",
    "OutlierReport",
    "outlier_report",
    "emergence_block",
    "transition_block",
    "masked_mean",
    "topk_overlap",
    "patch_contrast",
    "rank_percentile",
]

CAPTURABLE = ("x_in", "attn_out", "x_mid", "x_out", "attn", "received", "norms", "norms_in")

Reducer = Union[Callable[[str, int, torch.Tensor], Any], Mapping[str, Callable[[torch.Tensor], Any]]]


# ---------------------------------------------------------------------------
# attention probabilities
# ---------------------------------------------------------------------------

def _resolve_mask(attn_mask: Optional[torch.Tensor], logits: torch.Tensor, is_causal: bool) -> Optional[torch.Tensor]:
    n = logits.shape[-1]
    if is_causal:
        return logits.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros_like(attn_mask, dtype=logits.dtype)
        return bias.masked_fill_(~attn_mask, float("-inf"))
    return attn_mask.to(logits.dtype)


@torch.no_grad()
def attention_probs(
    attn_module,
    x: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention probabilities of a timm ``Attention`` module for input ``x``.

    Recomputes ``softmax(q k^T * scale + bias)`` explicitly, with the module's
    own ``qkv`` weights, ``q_norm``/``k_norm`` and ``scale``; ``x`` is the
    module's input, i.e. ``norm1(X^l)``, shape (B, N, C). ``bias`` is an
    additive float bias broadcastable to (B, H, N, N), e.g. the (B, 1, 1, N)
    proportional-attention bias ``log(size)`` of token merging.
    Uses ``F.linear`` (not ``qkv(x)``) so that no hook on ``qkv`` fires.

    Returns a float32 tensor (B, H, N, N) whose rows sum to 1, on the module's device.

    Raises:
        DeviceMismatchError: ``x`` is not on the module's device (it is the module's own
            input, so a mismatch is a bug upstream: nothing is moved).
    """
    check_same_device(attn_module.qkv.weight.device, x, what="x", where="attention_probs")
    q, k, _ = attention_qkv(attn_module, x, fire_hooks=False)
    scale = getattr(attn_module, "scale", q.shape[-1] ** -0.5)
    logits = (widen(q) * scale) @ widen(k).transpose(-2, -1)
    mask = _resolve_mask(attn_mask, logits, is_causal)
    if mask is not None:
        logits = logits + mask
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(dim=-1)


# ---------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------

@dataclass
class ProbeResult:
    """What a probe recorded.

    ``blocks[l][name]`` is the recorded (or reduced) value for block ``l``;
    batches are concatenated along dim 0 by :func:`run_probe`. Use
    ``result["x_in"]`` to get the list over blocks for one name.
    """

    blocks: List[Dict[str, Any]]
    num_prefix_tokens: int
    grid_size: Optional[Tuple[int, int]] = None
    logits: Optional[torch.Tensor] = None

    def __getitem__(self, name: str) -> List[Any]:
        return [b.get(name) for b in self.blocks]

    def stack(self, name: str, dim: int = 1) -> torch.Tensor:
        """Stack one per-block quantity over blocks (same shape in every block),
        e.g. ``stack("sim")`` -> (B, L) if each block holds (B,)."""
        return torch.stack(self[name], dim=dim)

    @property
    def depth(self) -> int:
        return len(self.blocks)


class AttentionProbe:
    """Context manager that records block internals of a timm ViT via hooks.

    Args:
        model: a timm ``VisionTransformer`` (anything with ``.blocks`` of pre-norm blocks
            having ``norm1``, ``attn``, ``ls1``), patched by dsm_lite or not.
        what: names to record, a subset of :data:`CAPTURABLE`. Only what is asked for is
            kept; ``attn`` (B x H x N^2 per block) is the expensive one, ask for
            ``received`` if the per-token mean is enough.
        blocks: block indices to probe (default: all).
        reduce: optional on-the-fly reduction, applied to each recorded tensor before it is
            kept: either a callable ``reduce(name, block, tensor) -> value`` or a mapping
            ``{name: fn(tensor) -> value}`` (names not in the mapping are kept as they
            are). Return tensors with the batch as dim 0 so that :func:`run_probe` can
            concatenate batches.
        extra: optional mapping ``{name: fn(record) -> value}`` computed per block from the
            raw records of that block (a dict of the names in ``what``) after the block has
            run; the raw tensors are then dropped unless listed in ``keep``. Example:
            ``extra={"sim_in": lambda r: token_similarity(r["x_in"])}``.
        keep: names to keep raw when ``extra`` is used (default: all of ``what``).

    Usage::

        with AttentionProbe(model, what=("x_in", "x_mid")) as probe:
            model(images)
        probe.records[3]["x_mid"]      # (B, N, C)

    Each forward appends nothing: records are overwritten per forward (call
    :meth:`pop` between batches, or use :func:`run_probe`). Records stay on the
    device the model runs on (:func:`run_probe` moves them to the CPU).
    """

    def __init__(
        self,
        model,
        what: Iterable[str] = CAPTURABLE,
        blocks: Optional[Iterable[int]] = None,
        reduce: Optional[Reducer] = None,
        extra: Optional[Mapping[str, Callable[[Dict[str, torch.Tensor]], Any]]] = None,
        keep: Optional[Iterable[str]] = None,
    ):
        what = tuple(what)
        unknown = set(what) - set(CAPTURABLE)
        if unknown:
            raise ValueError(f"unknown capture names {sorted(unknown)}; choose from {CAPTURABLE}")
        self.model = model
        self.what = set(what)
        self.block_ids = list(range(len(model.blocks))) if blocks is None else list(blocks)
        self.reduce = reduce
        self.extra = dict(extra or {})
        self.keep = set(self.what if keep is None else keep)
        self.records: Dict[int, Dict[str, Any]] = {}
        self._raw: Dict[int, Dict[str, torch.Tensor]] = {}
        self._handles: list = []

    # -- bookkeeping -------------------------------------------------------
    def _reduce(self, name: str, block: int, t: torch.Tensor):
        r = self.reduce
        if r is None:
            return t
        if isinstance(r, Mapping):
            fn = r.get(name)
            return t if fn is None else fn(t)
        return r(name, block, t)

    def _put(self, block: int, name: str, t: torch.Tensor) -> None:
        self._raw.setdefault(block, {})[name] = t
        if name in self.what and name in self.keep:
            self.records.setdefault(block, {})[name] = self._reduce(name, block, t)

    # -- hooks ---------------------------------------------------------------
    def _block_pre(self, block: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            self._raw[block] = {}
            with torch.no_grad():
                x = x.detach()
                self._raw[block]["_x_in"] = x
                if "x_in" in self.what:
                    self._put(block, "x_in", x)
                if "norms_in" in self.what:
                    self._put(block, "norms_in", widen(x).norm(dim=-1))
            return None

        return hook

    def _attn_post(self, block: int):
        def hook(module, args, kwargs, output):
            if not ({"attn", "received"} & self.what):
                return None
            x = args[0] if args else kwargs["x"]
            attn_mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            is_causal = bool(kwargs.get("is_causal", False))
            with torch.no_grad():
                p = attention_probs(module, x.detach(), attn_mask=attn_mask, is_causal=is_causal,
                                    bias=attention_bias(module))
                if "attn" in self.what:
                    self._put(block, "attn", p)
                if "received" in self.what:
                    self._put(block, "received", p.mean(dim=(1, 2)))
            return None

        return hook

    def _ls1_post(self, block: int):
        def hook(module, args, output):
            with torch.no_grad():
                a = output.detach()
                if "attn_out" in self.what:
                    self._put(block, "attn_out", a)
                if "x_mid" in self.what:
                    x_in = self._raw.get(block, {}).get("_x_in")
                    if x_in is not None and x_in.shape == a.shape:
                        self._put(block, "x_mid", x_in + a)
            return None

        return hook

    def _block_post(self, block: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            with torch.no_grad():
                out = out.detach()
                if "x_out" in self.what:
                    self._put(block, "x_out", out)
                if "norms" in self.what:
                    self._put(block, "norms", widen(out).norm(dim=-1))
                raw = self._raw.pop(block, {})
                for name, fn in self.extra.items():
                    self.records.setdefault(block, {})[name] = fn(raw)
            return None

        return hook

    # -- install / remove -----------------------------------------------------
    def install(self) -> "AttentionProbe":
        if self._handles:
            return self
        for l in self.block_ids:
            blk = self.model.blocks[l]
            self._handles.append(blk.register_forward_pre_hook(self._block_pre(l), with_kwargs=True))
            self._handles.append(blk.attn.register_forward_hook(self._attn_post(l), with_kwargs=True))
            ls1 = getattr(blk, "ls1", None)
            if ls1 is None:
                raise TypeError(f"block {l} has no ls1 module; not a timm pre-norm Block")
            self._handles.append(ls1.register_forward_hook(self._ls1_post(l)))
            self._handles.append(blk.register_forward_hook(self._block_post(l)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._raw = {}

    def pop(self) -> Dict[int, Dict[str, Any]]:
        """Return the records of the last forward and forget them."""
        rec, self.records = self.records, {}
        return rec

    def __enter__(self) -> "AttentionProbe":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def _cat(values: List[Any]) -> Any:
    v0 = values[0]
    if isinstance(v0, torch.Tensor):
        if v0.dim() == 0:
            return torch.stack(values)
        return torch.cat(values, dim=0)
    if isinstance(v0, (tuple, list)) and not isinstance(v0, str):
        return type(v0)(_cat([v[i] for v in values]) for i in range(len(v0)))
    return values


@torch.no_grad()
def run_probe(
    model,
    images: torch.Tensor,
    what: Iterable[str] = ("x_in", "x_mid", "received", "norms"),
    batch_size: int = 32,
    blocks: Optional[Iterable[int]] = None,
    reduce: Optional[Reducer] = None,
    extra: Optional[Mapping[str, Callable[[Dict[str, torch.Tensor]], Any]]] = None,
    keep: Optional[Iterable[str]] = None,
    device: Union[str, torch.device, None] = None,
    to_cpu: bool = True,
) -> ProbeResult:
    """Run ``model`` on ``images`` (N, 3, H, W) in batches with an
    :class:`AttentionProbe` installed; return a :class:`ProbeResult` with the
    batches concatenated (dim 0) per block, plus the logits.

    The probe is removed afterwards, even on error.

    Devices: ``images`` may be on any device; each batch is moved to the model's
    device. ``device`` (optional) is where the caller expects the model to be: it
    must be the model's device (else :class:`~dsm_lite.devices.DeviceMismatchError`;
    a device this machine lacks, e.g. ``"cuda"`` without a GPU, raises
    :class:`~dsm_lite.devices.DeviceUnavailableError`); nothing moves the model.
    The logits are returned on the CPU; the records too unless ``to_cpu=False``
    (then they stay on the model's device).
    """
    model_dev = model_device(model)
    if device is not None:
        device = check_available(device)
        if not same_device(device, model_dev):
            raise DeviceMismatchError(f"run_probe: device={str(device)!r} was asked for but the model is "
                                      f"on {model_dev}; move the model with model.to({str(device)!r})")
    device = model_dev
    probe = AttentionProbe(model, what=what, blocks=blocks, reduce=reduce, extra=extra, keep=keep)
    per_block: Dict[int, Dict[str, list]] = {}
    logits = []
    with probe:
        for i in range(0, len(images), batch_size):
            out = model(to_model(model, images[i:i + batch_size], device))
            logits.append(widen(out.detach()).cpu())
            for l, rec in probe.pop().items():
                slot = per_block.setdefault(l, {})
                for name, v in rec.items():
                    if to_cpu and isinstance(v, torch.Tensor):
                        v = v.cpu()
                    slot.setdefault(name, []).append(v)
    ids = probe.block_ids
    blocks_out = [{name: _cat(vs) for name, vs in per_block.get(l, {}).items()} for l in ids]
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return ProbeResult(
        blocks=blocks_out,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
        grid_size=tuple(grid) if grid is not None else None,
        logits=torch.cat(logits) if logits else None,
    )


# ---------------------------------------------------------------------------
# token similarity (paper eq. 2)
# ---------------------------------------------------------------------------

def token_similarity(x: torch.Tensor, num_prefix_tokens: int = 0, include_prefix: bool = True) -> torch.Tensor:
    """Mean pairwise cosine similarity over tokens, i != j (paper eq. 2).

    ``x``: (..., N, C) tokens. With unit vectors u_i,
    sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - n, so the cost is O(n C), not O(n^2 C).
    ``include_prefix=False`` drops the first ``num_prefix_tokens`` tokens (class
    token, registers) before computing. Returns (...,) float32 (computed in
    float64 for accuracy).
    """
    if not include_prefix and num_prefix_tokens:
        x = x[..., num_prefix_tokens:, :]
    n = x.shape[-2]
    if n < 2:
        raise ValueError("Sim needs at least two tokens")
    u = F.normalize(x.double(), dim=-1)
    s = u.sum(dim=-2)
    total = (s * s).sum(dim=-1) - (u * u).sum(dim=(-1, -2))
    return widen(total / (n * (n - 1)))


def sim_per_block(
    result: ProbeResult, which: str = "x_in", include_prefix: bool = True
) -> torch.Tensor:
    """Sim of ``which`` ('x_in' = X^l entering attention, 'x_mid' = X̄^l leaving
    it) for every image and probed block: (B, L)."""
    vals = [token_similarity(t, result.num_prefix_tokens, include_prefix) for t in result[which]]
    return torch.stack(vals, dim=1)


def delta_sim(sim_in: torch.Tensor, sim_mid: torch.Tensor) -> torch.Tensor:
    """Change of Sim during attention, ΔSim = Sim(X̄^l) - Sim(X^l), same shape as
    the inputs, e.g. (B, L). Negative: divergent attention (tokens become less
    similar); positive: convergent attention."""
    return sim_mid - sim_in


def sim_extras(num_prefix_tokens: int) -> Dict[str, Callable[[Dict[str, torch.Tensor]], torch.Tensor]]:
    """``extra=`` callables for :class:`AttentionProbe` / :func:`run_probe` that
    compute Sim per image on the fly (so the (B, N, C) tensors need not be kept):
    ``sim_in``/``sim_mid`` over all tokens, ``sim_in_patches``/``sim_mid_patches``
    without the prefix tokens. Needs ``what`` to include ``x_in`` and ``x_mid``."""
    p = num_prefix_tokens
    return {
        "sim_in": lambda r: token_similarity(r["x_in"]),
        "sim_mid": lambda r: token_similarity(r["x_mid"]),
        "sim_in_patches": lambda r: token_similarity(r["x_in"], p, include_prefix=False),
        "sim_mid_patches": lambda r: token_similarity(r["x_mid"], p, include_prefix=False),
    }


@dataclass
class SimResult:
    """Sim per image and block, (B, L) each: entering attention (X^l) and
    leaving it (X̄^l), over all tokens and over patch tokens only."""

    sim_in: torch.Tensor
    sim_mid: torch.Tensor
    sim_in_patches: torch.Tensor
    sim_mid_patches: torch.Tensor
    logits: Optional[torch.Tensor] = None

    def delta(self, include_prefix: bool = True) -> torch.Tensor:
        """ΔSim per image and block, (B, L)."""
        if include_prefix:
            return delta_sim(self.sim_in, self.sim_mid)
        return delta_sim(self.sim_in_patches, self.sim_mid_patches)


def measure_sim(model, images: torch.Tensor, batch_size: int = 32, device=None) -> SimResult:
    """Sim entering and leaving attention for every image and block of an
    (unpatched) ViT, computed batch by batch without keeping the activations.
    ``transition_block(measure_sim(model, images).delta())`` is the delay D.

    ``images`` may be on any device (batches are moved to the model's device;
    ``device`` as in :func:`run_probe`); every (B, L) result is on the CPU."""
    res = run_probe(model, images, what=("x_in", "x_mid"), batch_size=batch_size, keep=(),
                    extra=sim_extras(int(getattr(model, "num_prefix_tokens", 1))), device=device)
    return SimResult(res.stack("sim_in"), res.stack("sim_mid"), res.stack("sim_in_patches"),
                     res.stack("sim_mid_patches"), res.logits)


# ---------------------------------------------------------------------------
# attention sinks
# ---------------------------------------------------------------------------

def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """Attention received per key token: attn (B, H, N, N) -> (B, N), the mean
    over heads and queries. Each row sums to 1 (uniform attention = 1/N)."""
    return attn.mean(dim=(1, 2))


def topk_share(received: torch.Tensor, k: int = 1, num_prefix_tokens: int = 0, include_prefix: bool = True) -> torch.Tensor:
    """Share of all attention taken by the k tokens receiving most: (B, N) -> (B,).

    With ``include_prefix=False`` only patch tokens compete for the top k (the
    share is still a fraction of *all* attention)."""
    r = received if include_prefix else received[..., num_prefix_tokens:]
    return r.topk(k, dim=-1).values.sum(dim=-1)


def prefix_share(received: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Share of attention received by the prefix tokens (class token, registers): (B, N) -> (B,)."""
    return received[..., :num_prefix_tokens].sum(dim=-1)


def token_norm_ratio(norms: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Norm of every patch token divided by the median patch-token norm of its
    image: (B, N) -> (B, N - num_prefix_tokens)."""
    p = norms[..., num_prefix_tokens:]
    med = p.median(dim=-1, keepdim=True).values
    return p / med


def find_outliers(norms: torch.Tensor, num_prefix_tokens: int = 0, ratio: float = 2.0) -> torch.Tensor:
    """Boolean mask (B, N - num_prefix_tokens) of high-norm outlier patch tokens:
    norm > ``ratio`` x the image's median patch-token norm."""
    return token_norm_ratio(norms, num_prefix_tokens) > ratio


@dataclass
class OutlierReport:
    """High-norm outlier tokens per block.

    ratio:          (B, L, P) norm / median patch norm, per image, block and patch
    is_outlier:     (B, L, P) bool, ratio > threshold
    frac_images:    (L,) share of images with at least one outlier in the block
    mean_count:     (L,) mean number of outlier tokens per image
    max_ratio:      (B, L) largest ratio per image and block
    emergence:      first block from which most images have outliers (see
                    :func:`emergence_block`), or None
    threshold:      the ratio threshold used
    """

    ratio: torch.Tensor
    is_outlier: torch.Tensor
    frac_images: torch.Tensor
    mean_count: torch.Tensor
    max_ratio: torch.Tensor
    emergence: Optional[int]
    threshold: float


def outlier_report(norms: Sequence[torch.Tensor], num_prefix_tokens: int, ratio: float = 2.0,
                   min_frac: float = 0.5) -> OutlierReport:
    """Outlier statistics from per-block token norms (list over blocks of (B, N),
    unpatched model so N is the same in every block)."""
    r = torch.stack([token_norm_ratio(n, num_prefix_tokens) for n in norms], dim=1)
    is_out = r > ratio
    frac = is_out.any(dim=-1).float().mean(dim=0)
    return OutlierReport(
        ratio=r,
        is_outlier=is_out,
        frac_images=frac,
        mean_count=is_out.sum(dim=-1).float().mean(dim=0),
        max_ratio=r.max(dim=-1).values,
        emergence=emergence_block(frac, min_frac=min_frac),
        threshold=ratio,
    )


def emergence_block(frac_images: torch.Tensor, min_frac: float = 0.5) -> Optional[int]:
    """First block l such that, from l to the last block, at least ``min_frac``
    of the images have an outlier token (``frac_images``: (L,)). None if never."""
    ok = (torch.as_tensor(frac_images) >= min_frac).tolist()
    for l in range(len(ok)):
        if all(ok[l:]):
            return l
    return None


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, P) over the entries where ``mask`` (B, P) is True,
    per row: (B,); NaN for a row with an empty mask. E.g. the attention received
    per outlier token: ``masked_mean(received[:, npt:], is_outlier)``."""
    m = mask.to(values.dtype)
    cnt = m.sum(dim=-1)
    out = (values * m).sum(dim=-1) / cnt
    return torch.where(cnt > 0, out, torch.full_like(out, float("nan")))


def topk_overlap(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the share of the k highest-``scores`` entries that are in
    ``mask``, with k = the row's mask count: (B, P), (B, P) -> (B,), NaN where
    the mask is empty. 1 means "the k tokens receiving most attention are
    exactly the k masked (e.g. high-norm) tokens". The result is on ``scores``'
    device (``mask`` is moved there)."""
    mask = mask.to(scores.device)
    out = torch.full((scores.shape[0],), float("nan"), device=scores.device)
    for b in range(scores.shape[0]):
        k = int(mask[b].sum())
        if k:
            top = scores[b].topk(k).indices
            out[b] = mask[b, top].float().mean()
    return out


def patch_contrast(images: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """Pixel standard deviation inside every patch, a simple proxy for how much
    information a patch holds (flat background ~ low): (B, 3, H, W) -> (B, P),
    patches row-major as timm's patch embedding lays them out."""
    B, C, H, W = images.shape
    p = images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    p = p.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // patch_size) * (W // patch_size), -1)
    return p.float().std(dim=-1)


def rank_percentile(values: torch.Tensor) -> torch.Tensor:
    """Per row, each entry's rank among the row as a fraction in [0, 1]
    (0: smallest, 1: largest): (B, P) -> (B, P)."""
    n = values.shape[-1]
    return values.argsort(dim=-1).argsort(dim=-1).float() / max(n - 1, 1)


# ---------------------------------------------------------------------------
# the transition block (delay D)
# ---------------------------------------------------------------------------

def transition_block(delta_sim: torch.Tensor, min_later: float = 0.75) -> Optional[int]:
    """First block from which attention is convergent: the delay D.

    ``delta_sim``: (L,) mean ΔSim per block, or (B, L) per image (averaged over
    images first). Rule: the first block ``l`` such that

    * mean ΔSim at ``l`` is > 0, and
    * mean ΔSim is > 0 in at least ``min_later`` (default 3/4) of the blocks
      ``l, l+1, ..., L-1``.

    Why: the paper's reading of its Figures 2 and 8 is "the first few blocks
    are divergent, then tokens consistently become more similar"; a single
    isolated positive block early on must not count (hence the look-ahead), and
    one or two late negative blocks must not push D to the end of the network
    (hence "most", not "all"). Returns None if no block qualifies. D = l means
    "merge nothing in blocks 0..l-1".
    """
    d = torch.as_tensor(delta_sim, dtype=torch.float64)
    if d.dim() == 2:
        d = d.mean(dim=0)
    pos = (d > 0).tolist()
    L = len(pos)
    for l in range(L):
        if pos[l] and sum(pos[l:]) >= min_later * (L - l):
            return l
    return None
