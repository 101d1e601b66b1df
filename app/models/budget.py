"""The VRAM budget applied to loaded models: plan with app/models/memory.py, then place each
model (resident, whole-model offload, or block streaming with partial residency).

The fronts turn ``--vram 12GB --reserve-vram 1GB`` into plain data with
:func:`memory_settings` and hand it to ``Engine(memory=...)``; nodes read it back through
``current().memory``. Without ``--vram`` the budget is the GPU's memory (none on CPU).
"""

from __future__ import annotations

import torch

from app.models.memory import (
    MemoryPlan,
    ModelNeed,
    activation_work,
    describe,
    model_width,
    need_of,
    parse_size,
    plan_alone,
    plan_memory,
    should_tile_vae,
    vae_work,
)
from app.models.residency import apply_block_offload

LEGACY_OFFLOAD = {"none": "resident", "cpu": "model"}  # the loader's choices before the planner
# Text tokens beside the image in a joint transformer and a text encoder's prompt length: an
# upper bound (Flux's T5 512, SD3 77 + 256, PixArt 300).
TEXT_TOKENS = 512


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


def run_size(memory: dict, family: str | None) -> tuple[int, int, int]:
    """(height, width, frames) the plan sizes working memory for: ``memory["size"]`` when a
    front knows the run's size, else the family's default (1024² for the image DiTs)."""
    if memory.get("size"):
        height, width, *frames = memory["size"]
        return int(height), int(width), int(frames[0] if frames else 1)
    from app.models import families

    fam = families.get(family) if family else None
    side = fam.default_size if fam else 1024
    return side, side, fam.default_frames if fam else 1


def work_of(module, role: str, family: str | None, size: tuple[int, int, int],
            element_size: int = 2) -> tuple[int | None, int | None]:
    """(working memory, tiled working memory) of a part for a run of ``size``: activations from
    tokens × width (transformer: the family's latent tokens + text, CFG batched unless guidance
    is distilled; text encoder: a positive/negative pair of prompts), a VAE's decode whole and
    in tiles. None where the size is unknown (the planner's default applies)."""
    height, width, frames = size
    if role == "vae":
        channels = int((getattr(module.config, "block_out_channels", None) or [128])[0])
        tiles = hasattr(module, "tiled_decode")
        return (vae_work(height, width, frames, element_size, channels=channels),
                vae_work(height, width, frames, element_size, True, channels) if tiles else None)
    hidden = model_width(module)
    if not hidden:
        return None, None
    if role == "text_encoder":
        positions = getattr(module.config, "max_position_embeddings", None)
        tokens = min(positions, TEXT_TOKENS) if isinstance(positions, int) and positions > 0 else TEXT_TOKENS
        return activation_work(tokens, hidden, 2, element_size), None
    from app.models import families

    if not family:
        return None, None
    fam = families.get(family)
    try:
        dims = fam.latent_shape(module.config, 1, width, height, frames)[2:]
        tokens = fam.seq_len(module.config, dims) + TEXT_TOKENS
    except (AttributeError, KeyError, TypeError, ValueError):  # a config the family cannot size: default
        return None, None
    batch = 2 if fam.batch_cfg and fam.distilled_guidance is None else 1
    return activation_work(tokens, hidden, batch, element_size), None


def needs_of(parts: dict[str, tuple[torch.nn.Module, str]], family: str | None, memory: dict,
             transformer_bytes: float | None = None) -> list[ModelNeed]:
    """The :class:`ModelNeed` of each part (name -> (module, role)), measured as its weights are
    stored now, working memory sized for the run (:func:`run_size`); ``transformer_bytes``: the
    bytes per parameter of a storage format not applied to the transformer yet (None: measured)."""
    size = run_size(memory, family)
    needs = []
    for name, (module, role) in parts.items():
        stored = transformer_bytes if role == "transformer" else None
        first = next(module.parameters(), None)
        compute = first.element_size() if first is not None else 2
        compute = max(2, compute) if role == "transformer" else compute  # fp8 storage computes in bf16
        work, tiled = work_of(module, role, family, size, compute)
        needs.append(need_of(module, name, role, stored, work, tiled, compute))
    return needs


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
                    storage: str = "auto", dtype: torch.dtype = torch.bfloat16) -> MemoryPlan:
    """The plan CheckpointLoader would make for a model folder, from its configs alone (no
    weights read): for ``ditgraph explain`` and the editor, before anything loads. The parts
    are built on the meta device in ``dtype``, the transformer in ``storage`` where that
    applies to meta weights (fp8 casting, torchao), else sized at the format's bytes per parameter."""
    from app.models import families
    from app.models.storage import apply_storage, bytes_per_param

    family = families.detect_folder_family(folder)
    parts = checkpoint_parts(folder)
    for module, _ in parts.values():
        module.to(dtype)  # meta tensors: no memory, only the dtype the loader would give them
    stored = None
    if storage != "auto":
        try:
            apply_storage(parts["transformer"][0], storage, dtype, device or torch.device("cpu"))
        except (ValueError, RuntimeError, ImportError, NotImplementedError, TypeError):
            stored = bytes_per_param(storage, dtype)  # nf4, a quantizer refused here: the flat size
    needs = needs_of(parts, family, memory or {}, stored)
    budget, reserve = budget_of(memory or {}, device or torch.device("cpu"))
    return plan_memory(needs, budget, reserve, _requested(needs, offload))


def describe_checkpoint(folder, offload: str, storage: str, dtype: torch.dtype, device: torch.device,
                        memory: dict | None) -> dict:
    """CheckpointLoader's VRAM plan for a model folder as data and as lines for people (the one
    description ``ditgraph explain``, the HTTP API and the editor show)."""
    return describe(plan_checkpoint(folder, offload, memory, device, storage, dtype))


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
                family: str | None = None) -> MemoryPlan:
    """Plan ``parts`` (name -> (module, role)) of a ``family`` checkpoint, each measured as
    loaded (its storage applied); ``offload`` other than "auto" is imposed on every part."""
    needs = needs_of(parts, family, memory)
    budget, reserve = budget_of(memory, device)  # an explicit budget applies on any device (and in tests)
    make_room = memory.get("make_room")
    if make_room is not None and budget:
        make_room(sum(n.weight_bytes for n in needs))  # LRU: colder cached models leave the GPU first
    return plan_memory(needs, budget, reserve, _requested(needs, offload))


def plan_part(module: torch.nn.Module, name: str, role: str, offload: str, memory: dict,
              device: torch.device) -> MemoryPlan:
    """The plan of one model loaded on its own (TextEncoderLoader, VAELoader): see
    :func:`app.models.memory.plan_alone`; colder memo entries leave the GPU first."""
    (need,) = needs_of({name: (module, role)}, None, memory)
    budget, reserve = budget_of(memory, device)
    make_room = memory.get("make_room")
    if make_room is not None and budget:
        make_room(need.weight_bytes)
    mode = LEGACY_OFFLOAD.get(offload, offload)
    if mode in ("stream", "blocks") and not need.blocks:
        mode = "model"
    return plan_alone(need, budget, reserve, mode)


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
