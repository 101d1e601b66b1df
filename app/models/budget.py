"""The VRAM budget applied to loaded models: plan with app/models/memory.py, then place each
model (resident, whole-model offload, or block streaming with partial residency).

The fronts turn ``--vram 12GB --reserve-vram 1GB`` into plain data with
:func:`memory_settings` and hand it to ``Engine(memory=...)``; nodes read it back through
``current().memory``. Without ``--vram`` the budget is the GPU's memory (none on CPU).
"""

from __future__ import annotations

import torch

from app.models.memory import MemoryPlan, ModelNeed, need_of, parse_size, plan_memory, should_tile_vae
from app.models.residency import apply_block_offload

LEGACY_OFFLOAD = {"none": "resident", "cpu": "model"}  # the loader's choices before the planner


def memory_settings(vram: str | int | None = None, reserve: str | int | None = None) -> dict:
    """``Engine(memory=...)`` from the CLI/server flags ``--vram`` and ``--reserve-vram``."""
    settings = {}
    if vram not in (None, ""):
        settings["vram"] = parse_size(vram)
    if reserve not in (None, ""):
        settings["reserve"] = parse_size(reserve)
    if settings.get("vram") and settings.get("reserve", 0) >= settings["vram"]:
        raise ValueError(f"--reserve-vram ({reserve}) must be smaller than --vram ({vram})")
    return settings


def budget_of(memory: dict, device: torch.device) -> tuple[int, int]:
    """(budget, reserve) in bytes: the configured one, else the CUDA device's memory, else none (0)."""
    vram = int(memory.get("vram") or 0)
    if not vram and device.type == "cuda" and torch.cuda.is_available():
        vram = torch.cuda.get_device_properties(device).total_memory
    return vram, int(memory.get("reserve") or 0)


def decode_needs_tiles(height: int, width: int, device: torch.device, memory: dict, frames: int = 1,
                       element_size: int = 2) -> bool:
    """Whether an untiled VAE decode of ``height`` × ``width`` pixels would overrun what the
    budget leaves free beside the tensors already allocated (no budget: never)."""
    budget, reserve = budget_of(memory, device)
    if not budget:
        return False
    used = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return should_tile_vae(height, width, max(1, budget - reserve - used), frames, element_size)


def plan_loaded(parts: dict[str, tuple[torch.nn.Module, str]], offload: str, memory: dict, device: torch.device,
                transformer_bytes: float | None = None) -> MemoryPlan:
    """Plan ``parts`` (name -> (module, role)); ``offload`` other than "auto" is imposed on
    every part. ``transformer_bytes`` is the storage format's bytes per parameter."""
    needs: list[ModelNeed] = [need_of(module, name, role, transformer_bytes if role == "transformer" else None)
                              for name, (module, role) in parts.items()]
    mode = LEGACY_OFFLOAD.get(offload, offload)
    requested = {} if mode == "auto" else {name: mode for name in parts}
    if mode in ("stream", "blocks"):  # modules without blocks (the VAE) move whole
        requested.update({n.name: "model" for n in needs if not n.blocks})
    budget, reserve = budget_of(memory, device)  # an explicit budget applies on any device (and in tests)
    make_room = memory.get("make_room")
    if make_room is not None and budget:
        make_room(sum(n.weight_bytes for n in needs))  # LRU: colder cached models leave the GPU first
    return plan_memory(needs, budget, reserve, requested)


def place(plan: MemoryPlan, values: dict[str, object], modules: dict[str, torch.nn.Module],
          device: torch.device) -> None:
    """Apply ``plan`` to loaded (CPU) values: residency flags, block streaming, device moves.
    Several parts may share one value (the text encoders): it offloads after use if any part
    moves whole. Streamed parts keep their resident blocks between uses (only a memo spill
    moves them off)."""
    for value in values.values():
        value.device, value.residency, value.memory = device, "resident", []
    for placement in plan.placements:
        value, module = values[placement.name], modules[placement.name]
        value.memory.append(placement.as_dict())
        if placement.mode in ("stream", "blocks"):
            apply_block_offload(module, device, keep=placement.resident_blocks)
        elif placement.mode == "model":
            value.residency = "offload"
    for placement in plan.placements:
        if placement.mode == "resident" and values[placement.name].residency == "resident":
            modules[placement.name].to(device)
