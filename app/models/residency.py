"""Devices, dtypes and residency: where module weights live between uses.

``Resident`` is the mixin of every value wrapping modules (MODEL, VAE, TEXT_ENCODER):
``offload()`` to CPU, ``ensure_device()`` back, ``release()`` after each use per policy.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(choice: str, default: torch.device | None = None) -> torch.device:
    """"auto" -> the engine's device (CUDA when there is one), else the named device."""
    if choice in ("auto", "", None):
        if default is not None:
            return torch.device(default)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} requested but CUDA is not available on this machine")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere."""
    if choice in ("auto", "", None):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[choice]
    except KeyError:
        raise ValueError(f"unknown dtype {choice!r}; expected auto, {', '.join(DTYPES)}") from None


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device (when 0 is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


GROUP_OFFLOAD_FLAG = "_ditgraph_group_offload"


def is_group_offloaded(module: torch.nn.Module) -> bool:
    """Weights managed block by block by diffusers' group-offloading hooks (never moved whole)."""
    return bool(getattr(module, GROUP_OFFLOAD_FLAG, False))


def apply_block_offload(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Keep ``module``'s weights in RAM and stream them to ``device`` one block at a time
    (diffusers group offloading; overlapping copies on a CUDA stream). For models larger
    than the GPU: slower, but only one block is resident at a time."""
    from diffusers.hooks import apply_group_offloading

    module.to("cpu")
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1,
                           use_stream=device.type == "cuda")
    setattr(module, GROUP_OFFLOAD_FLAG, True)
    return module


class Resident:
    """Mixin for values wrapping modules: ``offload()`` to CPU, ``ensure_device()`` back.

    ``residency`` "resident" keeps the weights on ``device``; "offload" keeps them in RAM and
    moves them to ``device`` only while they run (``release()`` after each use); "blocks"
    streams them block by block (:func:`apply_block_offload`).
    """

    device: torch.device
    residency: str

    def _modules(self) -> list[torch.nn.Module]:
        return []

    def release(self) -> None:
        """Called after each use: offloads when the residency policy says so."""
        if getattr(self, "residency", "resident") == "offload":
            self.offload()

    def offload(self) -> None:
        for m in self._modules():
            if module_device(m).type != "cpu" and not is_group_offloaded(m):
                m.to("cpu")

    def ensure_device(self) -> None:
        for m in self._modules():
            if not is_group_offloaded(m) and not same_device(module_device(m), self.device):
                m.to(self.device)
