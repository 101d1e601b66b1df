"""The VRAM budget applied to loaded models: plan with app/models/memory.py, then place each
model (resident, whole-model offload, or block streaming with partial residency).

The fronts turn ``--vram 12GB --reserve-vram 1GB`` into plain data with
:func:`memory_settings` and hand it to ``Engine(memory=...)``; nodes read it back through
``current().memory``. Without ``--vram`` the budget is the GPU's memory (none on CPU).
"""

from __future__ import annotations

import torch

from app.models.memory import MemoryPlan, ModelNeed, describe, need_of, parse_size, plan_memory, should_tile_vae
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


def checkpoint_parts(folder) -> dict[str, tuple[object, str]]:
    """The parts CheckpointLoader plans for a model folder, named as it names them (transformer,
    the family's text encoder slots, vae), each built on the meta device from its config."""
    import json
    from pathlib import Path

    from app.models import families
    from app.models.text_encoder_packages import manifest_text_encoder

    folder = Path(folder)
    family = families.get(families.detect_folder_family(folder))
    transformer = folder / "transformer" if (folder / "transformer").is_dir() else folder
    folders = {"transformer": (transformer, "transformer")}
    if family.manifest_text_encoder:
        manifest = json.loads((folder / "ditgraph.json").read_text()) if (folder / "ditgraph.json").is_file() else {}
        folders["minilm"] = (manifest_text_encoder(manifest, folder), "text_encoder")
    else:
        folders.update((slot, (folder / component, "text_encoder"))
                       for slot, component in family.pipeline_text_slots.items()
                       if (folder / component / "config.json").is_file())
    if (folder / "vae" / "config.json").is_file():
        folders["vae"] = (folder / "vae", "vae")
    return {name: (_meta_module(sub, role), role) for name, (sub, role) in folders.items()}


def plan_checkpoint(folder, offload: str = "auto", memory: dict | None = None, device: torch.device | None = None,
                    storage_bytes: float | None = None, dtype_bytes: float = 2.0) -> MemoryPlan:
    """The plan CheckpointLoader would make for a model folder, from its configs alone (no
    weights read): for ``ditgraph explain`` and the editor, before anything loads."""
    needs = [need_of(module, name, role, storage_bytes if role == "transformer" and storage_bytes else dtype_bytes)
             for name, (module, role) in checkpoint_parts(folder).items()]
    budget, reserve = budget_of(memory or {}, device or torch.device("cpu"))
    return plan_memory(needs, budget, reserve, _requested(needs, offload))


def describe_checkpoint(folder, offload: str, storage: str, dtype: torch.dtype, device: torch.device,
                        memory: dict | None) -> dict:
    """CheckpointLoader's VRAM plan for a model folder as data and as lines for people (the one
    description ``ditgraph explain``, the HTTP API and the editor show)."""
    from app.models.storage import bytes_per_param

    stored = bytes_per_param(storage, dtype) if storage != "auto" else None
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return describe(plan_checkpoint(folder, offload, memory, device, stored, dtype_bytes))


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
