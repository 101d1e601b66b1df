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


def _meta_module(folder, role: str):
    """A component built on the meta device from its config.json (no weights read, no memory)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        if role == "text_encoder":
            import transformers

            cfg = transformers.AutoConfig.from_pretrained(folder)
            names = ["T5EncoderModel"] if cfg.model_type == "t5" else list(config.get("architectures") or [])
            cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
            return cls._from_config(cfg) if cls is not transformers.AutoModel else cls.from_config(cfg)
        import diffusers

        return getattr(diffusers, config["_class_name"]).from_config(config)


def plan_checkpoint(folder, offload: str = "auto", memory: dict | None = None, device: torch.device | None = None,
                    storage_bytes: float | None = None, dtype_bytes: float = 2.0) -> MemoryPlan:
    """The plan CheckpointLoader would make for a diffusers pipeline folder, from its configs
    alone (for ``ditgraph explain`` and the UI before anything loads)."""
    from pathlib import Path

    folder, parts = Path(folder), {}
    for sub in sorted(p.parent for p in folder.glob("*/config.json")):
        role = "transformer" if sub.name == "transformer" else "vae" if sub.name == "vae" else \
            "text_encoder" if sub.name.startswith("text_encoder") else None
        if role is not None:
            parts[sub.name] = (_meta_module(sub, role), role)
    needs = [need_of(m, name, role, storage_bytes if role == "transformer" and storage_bytes else dtype_bytes)
             for name, (m, role) in parts.items()]
    budget, reserve = budget_of(memory or {}, device or torch.device("cpu"))
    return plan_memory(needs, budget, reserve, _requested(needs, offload))


def _requested(needs: list[ModelNeed], offload: str) -> dict[str, str]:
    """The loader's ``offload`` imposed on every part ("auto": none); parts without blocks (the VAE) move whole."""
    mode = LEGACY_OFFLOAD.get(offload, offload)
    if mode == "auto":
        return {}
    return {n.name: "model" if mode in ("stream", "blocks") and not n.blocks else mode for n in needs}


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
    budget, reserve = budget_of(memory, device)  # an explicit budget applies on any device (and in tests)
    make_room = memory.get("make_room")
    if make_room is not None and budget:
        make_room(sum(n.weight_bytes for n in needs))  # LRU: colder cached models leave the GPU first
    return plan_memory(needs, budget, reserve, _requested(needs, offload))


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
