"""What a quantization method is, which layers it touches, and where fp8 runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from app.models.accelerators.runtime import stack_blocks

# Layer skip lists, from least to most kept in full precision. The embedders (patch, text,
# timestep), the adaLN modulation linears ("norm*") and the final projection are small and
# the most sensitive; the first and last blocks are the next most sensitive.
SKIP_NONE = "none"
SKIP_IO = "embedders+norms+final"
SKIP_EDGES = "embedders+norms+final+first&last blocks"
SKIPS = (SKIP_NONE, SKIP_IO, SKIP_EDGES)


class QuantizeError(ValueError):
    """A quantization that cannot run here (missing torchao, fp8 on an unsupported device)."""


@dataclass(frozen=True)
class Quantizer:
    """One torchao method: ``config()`` builds its ``quantize_`` config (imports torchao)."""

    name: str
    config: Callable[[], Any]
    tooltip: str
    fp8: bool = False  # needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell)


def fp8_supported(device: torch.device | str) -> bool:
    """fp8 matmuls run on CUDA devices of compute capability 8.9 or newer."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_runnable(quantizer: Quantizer, device: torch.device | str) -> None:
    """Refuse, with a message a user can act on, what would fail or run silently slow."""
    if quantizer.fp8 and not fp8_supported(device):
        where = torch.device(device)
        detail = (f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability(where)))}"
                  if where.type == "cuda" and torch.cuda.is_available() else f"device {where.type}")
        raise QuantizeError(f"{quantizer.name} needs an fp8-capable GPU (CUDA compute capability 8.9+: Ada, "
                            f"Hopper, Blackwell); this model runs on {detail}. Use int8-weight-only or "
                            "int8-dynamic instead")
    try:
        import torchao  # noqa: F401
    except Exception as exc:
        raise QuantizeError(f"QuantizeModel needs torchao (pip install 'ditgraph[fast]', torchao>=0.17): "
                            f"{type(exc).__name__}: {exc}") from exc


def layer_filter(transformer: nn.Module, skip: str) -> Callable[[nn.Module, str], bool]:
    """``quantize_``'s filter: the Linear layers to quantize under the skip list ``skip``."""
    if skip not in SKIPS:
        raise QuantizeError(f"unknown skip list {skip!r}; expected one of {', '.join(SKIPS)}")
    names = {id(m): name for name, m in transformer.named_modules()}
    blocks = [names[id(b)] + "." for b in stack_blocks(transformer)]
    edges = (blocks[0], blocks[-1]) if skip == SKIP_EDGES else ()

    def wanted(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if skip == SKIP_NONE:
            return True
        inside = any(fqn.startswith(prefix) for prefix in blocks)
        is_norm = any(part.startswith("norm") for part in fqn.split("."))
        return inside and not is_norm and not any(fqn.startswith(prefix) for prefix in edges)

    return wanted

