"""Where a model and its inputs live: one clear error when they disagree or a device is missing.

Every public dsm_lite function that takes a model and images follows one of two policies,
stated in its docstring:

- **moves**: the images are moved, batch by batch, to the model's device (analysis helpers
  such as :func:`dsm_lite.predict`, :func:`dsm_lite.trace_sources`, the probes). Image sets
  can then stay on the CPU however large they are.
- **raises**: the images must already be on the model's device, else
  :class:`DeviceMismatchError` (timing helpers such as
  :func:`dsm_lite.measure.time_breakdown`, where a silent copy would be timed too and hide
  that the caller fed the wrong batch).

Analysis outputs (logits, statistics, group maps) are returned on the CPU where the
docstring says so.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["DeviceMismatchError", "DeviceUnavailableError", "model_device", "check_same_device",
           "check_available", "same_device", "to_model"]

DeviceLike = Union[str, torch.device]


class DeviceMismatchError(ValueError):
    """A model and a tensor given to the same function live on different devices."""


class DeviceUnavailableError(ValueError):
    """A device was asked for (e.g. ``"cuda"``) that this machine does not have."""


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (of its buffers when it has no parameters).

    Raises:
        ValueError: the model has neither parameters nor buffers.
        DeviceMismatchError: its parameters and buffers are spread over several devices.
    """
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if not devices:
        raise ValueError(f"{type(model).__name__} has no parameters or buffers, so it has no device")
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise DeviceMismatchError(f"{type(model).__name__} has parameters on several devices ({names}); "
                                  f"move it to one with model.to(device)")
    return devices.pop()


def same_device(a: DeviceLike, b: DeviceLike) -> bool:
    """Whether two devices are the same; ``"cuda"`` (no index) matches any ``"cuda:N"``."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_same_device(model: Union[nn.Module, DeviceLike], x: Tensor, what: str = "images",
                      where: Optional[str] = None) -> torch.device:
    """Raise :class:`DeviceMismatchError` unless tensor ``x`` is on ``model``'s device.

    Args:
        model: a module (its device is :func:`model_device`) or a device.
        x: the tensor that must live there.
        what: how the message names ``x`` (e.g. ``"images"``, ``"x"``).
        where: the public function that checks, named in the message.

    Returns:
        The model's device.
    """
    device = model_device(model) if isinstance(model, nn.Module) else torch.device(model)
    if not same_device(device, x.device):
        fn = f"{where}: " if where else ""
        raise DeviceMismatchError(
            f"{fn}model on {device}, {what} on {x.device}: put both on one device first, e.g. "
            f"{what}.to({str(device)!r}) (or model.to({str(x.device)!r}))")
    return device


def check_available(device: DeviceLike) -> torch.device:
    """``torch.device(device)``, after checking that this machine has it.

    Raises:
        DeviceUnavailableError: e.g. ``"cuda"`` on a machine where
            ``torch.cuda.is_available()`` is False, or ``"cuda:3"`` with two GPUs.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceUnavailableError(
                f"device {str(dev)!r} was asked for, but torch sees no CUDA GPU here "
                f"(torch.cuda.is_available() is False); use device='cpu', or leave device=None "
                f"so that dsm_lite.pick_device() chooses")
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailableError(
                f"device {str(dev)!r} was asked for, but torch sees {count} CUDA GPU(s) "
                f"(cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceUnavailableError(f"device {str(dev)!r} was asked for, but torch has no MPS "
                                         f"device here; use device='cpu'")
    return dev


def to_model(model: nn.Module, x: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """``x`` on the model's device and, if floating, in its parameters' dtype (the "moves" policy).

    A float32 photo batch thus feeds a float64 model (the book's numerics) or a half-precision
    one unchanged in value; ``device`` skips looking the device up again.
    """
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and x.is_floating_point() else None
    return x.to(device if device is not None else model_device(model), dtype, non_blocking=True)
