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

Each SDPA kernel takes only some calls (:func:`kernel_refusal`, torch's selection rules as a
pure function): flash takes no attention mask and no fp32, cuDNN and flash need Ampere or
newer, and so on. What the model never satisfies (dtype, device, head size) is refused when
the node runs; a call that brings an attention mask (PixArt's, Sana's text mask) where the
chosen kernel takes none runs with the chosen kernel first and mask-capable kernels after it
(torch picks per attention: flash for the unmasked self-attention, cuDNN or memory-efficient
for the masked cross-attention), announced once per run as a warning event. Should torch
still find no kernel, the call is re-run with torch's own choice, with a warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from app.models.events import warn
from app.models.handles import ModelCall, ModelHandle, ModelPatch, SamplingRun


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


@dataclass(frozen=True)
class CallNeeds:
    """What an attention call asks of a kernel."""

    dtype: torch.dtype
    device_type: str
    capability: tuple[int, int] | None = None  # CUDA compute capability (None: unknown or not CUDA)
    has_mask: bool = False
    head_dim: int | None = None


HALF = (torch.float16, torch.bfloat16)
# the order a call falls back in: fastest first on an H200 (Flux-dev step, eager: cuDNN 184 ms,
# flash 198 ms, memory-efficient 242 ms); math takes everything
# torch's errors when no allowed SDPA kernel takes a call (CUDA, CPU)
NO_KERNEL = ("No available kernel", "No viable backend")
FALLBACK = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def kernel_refusal(kernel: str, needs: CallNeeds) -> str:
    """Why torch's SDPA would not run ``kernel`` (an SDPBackend member name) on such a call;
    "" when it would. torch's rules (sdp_utils), kept to those our models meet."""
    if kernel == "MATH":
        return ""
    if needs.device_type == "cpu":  # torch's CPU kernels: math and a flash that takes masks and fp32
        return "" if kernel == "FLASH_ATTENTION" else f"{kernel} runs on CUDA only"
    if needs.device_type != "cuda":
        return f"{kernel} runs on CUDA only"
    cap = needs.capability or (0, 0)
    if kernel in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
        if needs.capability is not None and cap < (8, 0):
            return f"{kernel} needs compute capability 8.0+ (this GPU: {cap[0]}.{cap[1]})"
        if needs.dtype not in HALF:
            return f"{kernel} takes fp16/bf16 only (this model: {needs.dtype})"
    if kernel == "FLASH_ATTENTION":
        if needs.has_mask:
            return "FLASH_ATTENTION takes no attention mask"
        if needs.head_dim is not None and needs.head_dim > 256:
            return f"FLASH_ATTENTION takes head sizes up to 256 (this model: {needs.head_dim})"
    if kernel == "CUDNN_ATTENTION":
        if needs.has_mask and torch_version() < (2, 6):  # masks (as a bias) since torch 2.6
            return "CUDNN_ATTENTION takes no attention mask before torch 2.6"
        limit = 256 if cap >= (9, 0) else 128
        if needs.head_dim is not None and needs.head_dim > limit:
            return f"CUDNN_ATTENTION takes head sizes up to {limit} here (this model: {needs.head_dim})"
    if kernel == "EFFICIENT_ATTENTION" and needs.dtype == torch.bfloat16 and needs.capability is not None \
            and cap < (8, 0):
        return "EFFICIENT_ATTENTION takes bf16 on compute capability 8.0+ only"
    return ""


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def kernel_plan(backend: Backend, needs: CallNeeds) -> tuple[tuple[str, ...], str]:
    """The SDPA kernels (priority order) to offer a call and a note when some of the chosen ones
    cannot take it ("" otherwise). The chosen kernels come first; kernels able to take the
    call follow when one of them cannot, so torch falls back per attention, never to no kernel."""
    if not backend.sdpa:
        return (), ""
    refused = {k: r for k in backend.sdpa if (r := kernel_refusal(k, needs))}
    # a mask refusal only bites the masked attentions of the call: the kernel stays for the others
    chosen = tuple(k for k in backend.sdpa if k not in refused or "mask" in refused[k])
    if len(refused) < len(backend.sdpa):  # torch picks among the chosen ones that take it
        return chosen, ""
    fallback = tuple(k for k in FALLBACK if k not in chosen and not kernel_refusal(k, needs))
    note = f"{'; '.join(refused.values())}: falls back to {', '.join(fallback).lower()} where needed"
    return chosen + fallback, note


def model_needs(model: ModelHandle) -> CallNeeds:
    """What every call of ``model`` asks (the mask is known per call: :func:`call_has_mask`)."""
    device = model.device
    capability = (torch.cuda.get_device_capability(device)
                  if device.type == "cuda" and torch.cuda.is_available() else None)
    head_dim = getattr(model.config, "attention_head_dim", None)
    return CallNeeds(model.dtype, device.type, capability, head_dim=head_dim if isinstance(head_dim, int) else None)


def call_has_mask(call: ModelCall) -> bool:
    """An attention mask among the transformer's inputs (PixArt's, Sana's text masks)."""
    return any("mask" in name and isinstance(value, torch.Tensor) for name, value in call.kwargs.items())


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
    needs = model_needs(model)
    refusals = [r for k in backend.sdpa if (r := kernel_refusal(k, needs))]
    if refusals and len(refusals) == len(backend.sdpa):  # the chosen kernel(s) take no call of this model
        raise AttentionBackendError(f"attention backend {name!r} cannot run this model: {'; '.join(refusals)} "
                                    "(use auto or native)")
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
    masked = kernel_plan(backend, replace(needs, has_mask=True))[1]
    if masked:
        parts.append(f"calls with an attention mask: {masked}")
    return backend, f"attention {name}: " + ("; ".join(parts) or "no attention processors found")


class AttentionPatch(ModelPatch):
    """Runs every transformer call under one attention backend."""

    def __init__(self, backend: Backend, report: str):
        self.backend = backend
        self.report = report
        self.key = f"attention({backend.name})"

    def begin_run(self, run: SamplingRun) -> dict:
        return {"needs": model_needs(run.handle), "warned": set()}

    def wrap(self, state: dict, call: ModelCall, forward: Callable[[ModelCall], torch.Tensor]) -> torch.Tensor:
        kernels, note = kernel_plan(self.backend, replace(state["needs"], has_mask=call_has_mask(call)))
        # a fallback goes through torch's SDPA: diffusers' pinned dispatcher backends check
        # the call themselves and raise (its _native_flash on a mask)
        dispatcher = "native" if note else self.backend.dispatcher
        self._warn_once(state, note)
        try:
            with _kernels(dispatcher, kernels):
                return forward(call)
        except RuntimeError as exc:
            if not any(marker in str(exc) for marker in NO_KERNEL):
                raise
        self._warn_once(state, f"torch found no {self.backend.name} kernel for this call; re-ran it with "
                               "torch's own choice (native)")
        with _kernels("native", ()):
            return forward(call)

    def _warn_once(self, state: dict, note: str) -> None:
        if note and note not in state["warned"]:
            state["warned"].add(note)
            warn(note, self.key)


@contextlib.contextmanager
def _kernels(dispatcher: str, kernels: tuple[str, ...]):
    """diffusers' dispatcher backend and torch's SDPA kernel list (priority order), entered."""
    from diffusers.models.attention_dispatch import attention_backend

    with contextlib.ExitStack() as stack:
        stack.enter_context(attention_backend(dispatcher))
        if kernels:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            chosen = [getattr(SDPBackend, k) for k in kernels]
            stack.enter_context(sdpa_kernel(chosen, set_priority=len(chosen) > 1))
        yield


def with_attention_backend(model: ModelHandle, choice: str) -> tuple[ModelHandle, str]:
    """A MODEL view whose sampling runs use ``choice``; returns it and the report line."""
    backend, report = check_backend(model, choice)
    patches = tuple(p for p in model.patches if not isinstance(p, AttentionPatch))  # the last choice wins
    return replace(model, patches=(*patches, AttentionPatch(backend, report)), _active=[]), report
