"""Attention backends as a MODEL patch, over diffusers' attention dispatcher.

Processors written for the dispatcher (Flux, Sana, Lumina 2, Wan, ...) call
``dispatch_attention_fn``, which follows the active backend (``attention_backend`` context
manager). Others (SD3's ``JointAttnProcessor2_0``, PixArt's ``AttnProcessor2_0``) call
``F.scaled_dot_product_attention`` directly: ``set_attention_backend`` silently does nothing
on them. Here the choice is applied to both kinds where it can be: torch's SDPA kernels
(cuDNN, flash, memory-efficient, math) also through ``torch.nn.attention.sdpa_kernel``, which
those direct calls obey. Backends that only the dispatcher offers (flex, sage) on a model
with direct-SDPA processors are refused with the processor names instead of doing nothing.
The patch enters the contexts around each transformer call, so the shared transformer and
its processors are never changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from app.models.handles import ModelCall, ModelHandle, ModelPatch


@dataclass(frozen=True)
class Backend:
    """One choice: the dispatcher's backend name and the SDPA kernels that mean the same."""

    name: str
    dispatcher: str
    sdpa: tuple[str, ...] = ()  # torch.nn.attention.SDPBackend members, in priority order; () = dispatcher only
    cuda_only: bool = True
    needs: str = ""  # a module that must be importable


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("native", "native", cuda_only=False),
    Backend("cudnn", "_native_cudnn", ("CUDNN_ATTENTION",)),
    Backend("flash", "_native_flash", ("FLASH_ATTENTION",)),
    Backend("efficient", "_native_efficient", ("EFFICIENT_ATTENTION",)),
    Backend("math", "_native_math", ("MATH",), cuda_only=False),
    Backend("flex", "flex", cuda_only=False),
    Backend("sage", "sage", needs="sageattention"),
)}
# "auto" on Hopper and newer: cuDNN first (the fastest SDPA kernel there), falling back per call
# to flash, memory-efficient and math where cuDNN does not take the shape or mask
HOPPER_AUTO = Backend("auto (cudnn first)", "native", ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION",
                                                       "MATH"))
CHOICES = ("auto", *(name for name, b in BACKENDS.items() if not b.needs or importlib.util.find_spec(b.needs)))


class AttentionBackendError(ValueError):
    """A backend that cannot run on this model or device."""


def auto_backend(device: torch.device) -> Backend:
    """cuDNN-first SDPA on Hopper and newer, torch's own kernel choice elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (9, 0):
        return HOPPER_AUTO
    return BACKENDS["native"]


def processors(transformer: nn.Module) -> tuple[set[str], set[str]]:
    """(class names of processors that use the dispatcher, of those that call SDPA directly)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    dispatched, direct = set(), set()
    for module in transformer.modules():
        if isinstance(module, Attention | AttentionModuleMixin) and module.processor is not None:
            # the test diffusers' own set_attention_backend uses to decide whom to tell
            kind = dispatched if hasattr(module.processor, "_attention_backend") else direct
            kind.add(type(module.processor).__name__)
    return dispatched, direct


def check_backend(model: ModelHandle, choice: str) -> tuple[Backend, str]:
    """The backend ``choice`` resolves to on ``model`` and a one-line report of where it applies."""
    backend = auto_backend(model.device) if choice == "auto" else BACKENDS.get(choice)
    if backend is None or choice not in CHOICES:
        raise AttentionBackendError(f"unknown or unavailable attention backend {choice!r}; "
                                    f"expected one of {', '.join(CHOICES)}")
    name = backend.name
    if backend.cuda_only and model.device.type != "cuda":
        raise AttentionBackendError(f"attention backend {name!r} needs a CUDA GPU; this model runs on "
                                    f"{model.device.type} (use native)")
    dispatched, direct = processors(model.transformer)
    if direct and not backend.sdpa and backend.dispatcher != "native":
        raise AttentionBackendError(
            f"attention backend {name!r} only reaches processors written for diffusers' dispatcher; "
            f"{type(model.transformer).__name__} uses {', '.join(sorted(direct))}, which call torch SDPA "
            "directly and would silently ignore it. Use native, cudnn, flash, efficient or math")
    parts = []
    if dispatched:
        parts.append(f"{', '.join(sorted(dispatched))} via diffusers' dispatcher")
    if direct:
        parts.append(f"{', '.join(sorted(direct))} via torch's SDPA kernel choice")
    return backend, f"attention {name}: " + ("; ".join(parts) or "no attention processors found")


class AttentionPatch(ModelPatch):
    """Runs every transformer call under one attention backend."""

    def __init__(self, backend: Backend, report: str):
        self.backend = backend
        self.report = report
        self.key = f"attention({backend.name})"

    def wrap(self, state: Any, call: ModelCall, forward: Callable[[ModelCall], torch.Tensor]) -> torch.Tensor:
        from diffusers.models.attention_dispatch import attention_backend

        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_backend(self.backend.dispatcher))
            if self.backend.sdpa:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                kernels = [getattr(SDPBackend, k) for k in self.backend.sdpa]
                stack.enter_context(sdpa_kernel(kernels, set_priority=len(kernels) > 1))
            return forward(call)


def with_attention_backend(model: ModelHandle, choice: str) -> tuple[ModelHandle, str]:
    """A MODEL view whose sampling runs use ``choice``; returns it and the report line."""
    backend, report = check_backend(model, choice)
    patches = tuple(p for p in model.patches if not isinstance(p, AttentionPatch))  # the last choice wins
    return replace(model, patches=(*patches, AttentionPatch(backend, report)), _active=[]), report
