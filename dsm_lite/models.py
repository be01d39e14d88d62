"""Pretrained timm Vision Transformers: loaded offline or from the hub, fingerprinted, and run on photos."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Union

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .assets import (DEFAULT_MODEL, AssetNotFoundError, ChecksumError, OfflineError, assets_dir, assets_sums, manifest,
                     sha256_file)
from .data import image_tensor
from .devices import DeviceUnavailableError, check_available, model_device, to_model
from .numerics import widen
from .progress import progress_bar

__all__ = [
    "DEFAULT_MODEL", "UnknownModelError", "NotAViTError", "DeviceUnavailableError",
    "pick_device", "load_model", "book_dtype", "weights_fingerprint", "predict", "topk_accuracy",
]


class UnknownModelError(ValueError):
    """timm has no model (or no pretrained tag) of that name."""


class NotAViTError(ValueError):
    """The model is not a ``timm.models.VisionTransformer``, so dsm_lite cannot patch it."""


def pick_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """The device to run on: ``device`` when given (checked to exist), else ``cuda`` if a GPU
    is visible and ``cpu`` otherwise.

    Raises:
        DeviceUnavailableError: ``device`` names a device this machine lacks, e.g. ``"cuda"``
            without a GPU.
    """
    if device is not None:
        return check_available(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_name(name: str) -> None:
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        raise UnknownModelError(
            f"timm has no model called {arch!r}; see timm.list_models('vit_*') for the ViTs it knows."
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        raise UnknownModelError(
            f"timm has no pretrained weights called {name!r}; see timm.list_pretrained({arch + '*'!r})."
        )
    # Building on the meta device allocates nothing, so even a huge model is checked in ~0.1 s.
    with torch.device("meta"):
        skeleton = timm.create_model(name, pretrained=False)
    if not isinstance(skeleton, timm.models.VisionTransformer):
        raise NotAViTError(
            f"{name!r} builds a {type(skeleton).__name__}, not a timm VisionTransformer; "
            "dsm_lite only handles ViTs (e.g. vit_tiny_patch16_224.augreg_in21k_ft_in1k)."
        )


def _verified_weights_file(name: str) -> Optional[str]:
    """Path of ``$DSM_LITE_ASSETS/weights/<name>.safetensors`` after checking its sha256.

    Returns None when ``DSM_LITE_ASSETS`` is unset, or lists no such file (weights then come
    from the hub).
    The file must match ``SHA256SUMS`` in the assets folder and, for models whose checksum
    ships with dsm_lite, that checksum too, so a swapped ``SHA256SUMS`` does not pass.
    """
    root = assets_dir()
    if root is None:
        return None
    rel = f"weights/{name}.safetensors"
    path = root / rel
    if not path.is_file() and rel not in assets_sums(root) and rel not in manifest("weights"):
        return None  # a model the assets folder does not ship: from the hub
    if not path.is_file():
        raise AssetNotFoundError(
            f"{path} not found. Put the weights there (listed in SHA256SUMS), or unset "
            f"DSM_LITE_ASSETS to download {name!r} from the Hugging Face hub."
        )
    listed = {src: sums[rel] for src, sums in (("SHA256SUMS", assets_sums(root)),
                                                ("dsm_lite's manifest", manifest("weights"))) if rel in sums}
    if not listed:
        raise ChecksumError(f"No sha256 for {rel} in {root / 'SHA256SUMS'}; add its line there.")
    actual = sha256_file(path)
    for src, expected in listed.items():
        if actual != expected:
            raise ChecksumError(
                f"{path} has sha256 {actual}, but {src} says {expected}. "
                "The file is corrupt or not the published one; re-copy it."
            )
    return str(path)


def load_model(name: str = DEFAULT_MODEL, device: Union[str, torch.device, None] = None,
               pretrained: bool = True) -> nn.Module:
    """A pretrained timm ViT in eval mode on ``device`` (None: :func:`pick_device`).

    With ``$DSM_LITE_ASSETS`` set, the weights of a model the assets folder ships (its
    ``SHA256SUMS`` or dsm_lite's manifest lists ``weights/<name>.safetensors``) are read from
    there (sha256-checked) into timm's model with ``load_state_dict`` (strict); any other model,
    and every model without ``$DSM_LITE_ASSETS``, is downloaded by timm from the hub.
    ``pretrained=False`` gives timm's random initialisation under the current torch seed,
    downloading nothing: for what depends only on the architecture (schedules, MACs, timings)
    and for smoke tests, never for an accuracy.
    Raises :class:`UnknownModelError`, :class:`NotAViTError`, ``AssetNotFoundError``,
    ``ChecksumError`` or ``OfflineError``, each saying what to set or download, and
    :class:`~dsm_lite.devices.DeviceUnavailableError` (before loading anything) when ``device``
    names a device this machine lacks, e.g. ``"cuda"`` without a GPU.
    """
    device = pick_device(device)
    _check_name(name)
    if not pretrained:
        return timm.create_model(name, pretrained=False).eval().to(device)
    file = _verified_weights_file(name)
    if file is not None:
        # the state dict ourselves, not timm's file loader: some timm 1.0.x releases route a
        # ViT's local file to the JAX .npz loader and cannot read safetensors
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(load_file(file))
        return model.eval().to(device)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # hub errors come from several libraries; only network ones are remapped
        if not _is_network_error(e):
            raise
        raise OfflineError(
            f"Could not download {name!r} from the Hugging Face hub ({type(e).__name__}). "
            "Without internet, put weights/<name>.safetensors (and its line in SHA256SUMS) in "
            "the DSM_LITE_ASSETS folder."
        ) from e
    return model.eval().to(device)


def book_dtype(name: str = DEFAULT_MODEL, device: Union[str, torch.device, None] = None) -> torch.dtype:
    """The dtype a chapter computes in (:func:`~dsm_lite.numerics.book_numerics`): float64
    wherever the stored outputs must reproduce, that is for the book's model on any device and
    for every model on a CPU (see :mod:`dsm_lite.numerics`). Another model on a GPU runs in its
    own float32: nothing stored is there to match, and float64 runs at a small fraction of
    float32's speed on most GPUs (1/32 on a T4)."""
    if name == DEFAULT_MODEL or torch.device(device or "cpu").type == "cpu":
        return torch.float64
    return torch.float32


def _is_network_error(e: BaseException) -> bool:
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
        hub = (LocalEntryNotFoundError, OfflineModeIsEnabled)
    except ImportError:  # older huggingface_hub
        hub = ()
    return isinstance(e, hub + (ConnectionError, TimeoutError)) or "connect" in type(e).__name__.lower()


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """First 12 hex digits of a sha256 over the state dict (names, shapes, float32 CPU bytes).

    Same weights give the same fingerprint on any device or dtype they were loaded in.
    """
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 100, progress: bool = False,
            desc: str = "forward") -> torch.Tensor:
    """Logits (N, num_classes) float32 on the CPU of ``model`` (as currently patched, if at all).

    Args:
        model: a timm ViT; it runs in eval mode and is left in the mode it was found in.
        images: (N, 3, H, W) preprocessed images or an ``ImageSet``, on any device: each batch
            is moved to the model's device.
        batch_size: photos per forward pass.
        progress, desc: a tqdm bar on stderr, and its title.
    """
    x = image_tensor(images)
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with progress_bar(len(x), desc, progress) as bar:
            for i in range(0, len(x), batch_size):
                batch = to_model(model, x[i:i + batch_size], device)
                out.append(widen(model(batch)).cpu())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """``{k: fraction of rows whose label is among the k largest logits}``; logits (N, C), labels (N,),
    each on any device (labels are moved to the logits' device)."""
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels.to(top.device).view(-1, 1)
    return {k: hit[:, :k].any(dim=1).double().mean().item() for k in ks}  # float64: k/N prints exactly
