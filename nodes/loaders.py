"""Loaders: checkpoints (diffusers folders, single-file safetensors), text encoders, VAEs.

Every weight is read from safetensors (``use_safetensors=True``); nothing is unpickled.
A checkpoint folder is a diffusers pipeline folder (model_index.json), a ditgraph folder
(ditgraph.json: shapes-dit) or a bare transformer component folder (config.json). A single
.safetensors file needs a config: the ``config`` input names a folder (in checkpoints) that
holds the transformer's config.json (a pipeline folder without weights is fine); its text
encoders and VAE are loaded too when they are present.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Annotated, Any

import torch

from app.core import paths
from app.core.context import current
from app.core.registry import node
from app.core.types import MODEL, TEXT_ENCODER, VAE, Spec
from app.models import families
from app.models import storage as weight_storage
from app.models.budget import describe_checkpoint, place, plan_loaded, plan_part
from app.models.handles import ModelHandle, TextEncoders, VAEHandle, resolve_device, resolve_dtype
from app.models.memory import OFFLOAD_CHOICES as PLANNER_MODES
from app.models.memory import describe
from app.models.sampling.defaults import model_variant
from app.models.size_budget import check_parameter_budget
from app.models.text_encoder_packages import manifest_text_encoder

DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]
DEVICE_CHOICES = ["auto", "cpu", "cuda"]
OFFLOAD_CHOICES = [*PLANNER_MODES, "none", "cpu"]  # none/cpu: the names before the planner (resident/model)
STORAGE_CHOICES = list(weight_storage.STORAGES)
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
TEXT_ENCODER_TYPES = ["auto", "clip_l", "clip_g", "t5", "gemma", "llama", "minilm", "bert"]  # bert: HunyuanDiT's (auto: minilm)
STRIP_PREFIXES = ("model.diffusion_model.", "transformer.", "diffusion_model.", "model.")


class LoadFailed(ValueError):
    """A model file/folder that cannot be loaded; the message names the path and the problem."""


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device, current().device if device == "auto" else None)
    return dev, resolve_dtype(dtype, dev)


def _read_config(folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        raise LoadFailed(f"{folder}: missing config.json (expected a diffusers/transformers model folder)")
    try:
        return json.loads(config.read_text())
    except ValueError as exc:
        raise LoadFailed(f"{config}: not valid JSON ({exc})") from None


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _require_safetensors(folder: Path) -> None:
    if not _has_safetensors(folder):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        extra = f" (found {', '.join(pickles)}: pickle formats are refused; convert to safetensors)" if pickles else ""
        raise LoadFailed(f"{folder}: no .safetensors weights{extra}")


def load_diffusers_component(folder: Path, dtype: torch.dtype, device: torch.device, expected: str | None = None):
    """A diffusers model (transformer, VAE) from a component folder, by its config _class_name."""
    import diffusers

    config = _read_config(folder)
    class_name = config.get("_class_name")
    if expected and class_name != expected:
        raise LoadFailed(f"{folder}: config _class_name is {class_name!r}, expected {expected!r}")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise LoadFailed(f"{folder}: unknown diffusers class {class_name!r} in config.json")
    _require_safetensors(folder)
    try:
        check_parameter_budget(cls, config, str(folder))  # a hostile config is refused before allocation
        model = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True,
                                    low_cpu_mem_usage=_accelerate_available())
    except Exception as exc:
        raise LoadFailed(f"{folder}: could not load {class_name}: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval()


def _accelerate_available() -> bool:
    """With accelerate, diffusers builds models on the meta device (no random init first):
    much faster and lighter for large checkpoints. Without it, loading still works."""
    return importlib.util.find_spec("accelerate") is not None


def _text_slot_of(config: dict, hint: str = "auto") -> str:
    if hint != "auto":
        return hint
    model_type = config.get("model_type", "")
    archs = config.get("architectures") or []
    if model_type in ("clip_text_model", "clip"):
        hidden = int(config.get("hidden_size", config.get("text_config", {}).get("hidden_size", 768)))
        return "clip_g" if hidden >= 1280 or "CLIPTextModelWithProjection" in archs and hidden > 768 else "clip_l"
    if model_type == "umt5":
        return "umt5"  # Wan's (its tokenizer and vocabulary differ from T5's)
    if model_type in ("t5", "mt5"):
        return "t5"
    if model_type.startswith("gemma"):
        return "gemma"
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        return "qwen2vl"  # Qwen-Image's text encoder
    if model_type == "llama":
        return "llama"  # HiDream's Llama-3.1-8B-Instruct
    if model_type == "mistral3":
        return "mistral3"  # Flux.2 [dev]'s (Mistral-Small-3.1)
    if model_type == "qwen3":
        return "qwen3"  # Flux.2 [klein]'s
    if model_type in ("bert", "mpnet"):
        return "minilm"
    raise LoadFailed(f"unsupported text encoder model_type {model_type!r} (expected CLIP, T5, Gemma, Qwen2.5-VL, Llama, "
                     "Mistral-3, Qwen3 or MiniLM/BERT)")


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _load_tokenizer(folder: Path, slot: str) -> Any:
    """The tokenizer of ``folder``; Flux.2's Mistral ships a PixtralProcessor whose files may hold
    the chat template the text recipe applies, so that slot loads the processor when there is one."""
    import transformers

    if slot == "mistral3" and any((folder / name).is_file() for name in PROCESSOR_FILES):
        try:
            return transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
        except Exception:  # the plain tokenizer still encodes text when its files carry the template
            pass
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_text_encoder(folder: Path, tokenizer_folder: Path | None, dtype: torch.dtype, device: torch.device,
                      hint: str = "auto") -> tuple[str, Any, torch.nn.Module]:
    """(slot, tokenizer, model) from a transformers model folder (tokenizer files alongside or given)."""
    import transformers

    config = _read_config(folder)
    slot = _text_slot_of(config, hint)
    archs = config.get("architectures") or []
    cls = None
    for name in archs:
        cls = getattr(transformers, name, None)
        if cls is not None:
            break
    if cls is None or slot == "minilm":
        cls = transformers.AutoModel
    if slot == "t5" and cls is not transformers.T5EncoderModel and config.get("model_type") == "t5":
        cls = transformers.T5EncoderModel  # full T5 checkpoints: keep only the encoder
    if slot in ("gemma", "llama") and "ForCausalLM" in getattr(cls, "__name__", ""):
        cls = transformers.AutoModel  # hidden states only: the language-model head (1 GB for Llama 3) is not loaded
    _require_safetensors(folder)
    try:
        model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise LoadFailed(f"{folder}: could not load text encoder {cls.__name__}: {type(exc).__name__}: {exc}") from None
    tok_dir = tokenizer_folder or folder
    try:
        tokenizer = _load_tokenizer(tok_dir, slot)
    except Exception as exc:
        raise LoadFailed(f"{tok_dir}: no usable tokenizer files ({type(exc).__name__}: {exc})") from None
    if slot == "gemma":
        tokenizer.padding_side = "right"
    return slot, tokenizer, model.to(device).eval()


def _encoder_options(folder: Path, handle: ModelHandle) -> dict:
    """What a checkpoint's text encoders need to know of it: the checkpoint's variant (the edit
    text recipe follows it) and the image processor settings of a vision-language encoder."""
    variant = model_variant(handle)
    options = {"variant": variant.name} if variant else {}
    for config in (folder / "processor" / "preprocessor_config.json", folder / "preprocessor_config.json"):
        if config.is_file():
            options["image_processor"] = families.read_json(config)
            break
    return options


def _minilm_folder(manifest: dict, folder: Path) -> Path:
    try:
        return manifest_text_encoder(manifest, folder)  # a package is allow-listed, never any module
    except paths.PathRefused:
        raise
    except ValueError as exc:
        raise LoadFailed(f"{folder}: {exc}") from None


def _experts(folder: Path, fam: families.Family, dtype: torch.dtype, device: torch.device) -> dict:
    """A pipeline's second expert (Wan 2.2: ``transformer_2`` below ``boundary_ratio``), if any."""
    if not (folder / "transformer_2" / "config.json").is_file() or not (folder / "model_index.json").is_file():
        return {}
    index = families.read_json(folder / "model_index.json")
    if index.get("boundary_ratio") is None:
        return {}
    expert = load_diffusers_component(folder / "transformer_2", dtype, device, expected=fam.transformer_class)
    return {"transformer_2": expert, "boundary_ratio": float(index["boundary_ratio"])}


def load_checkpoint_folder(folder: Path, dtype: torch.dtype, device: torch.device,
                           storage: str = "auto") -> tuple[ModelHandle, TextEncoders | None, VAEHandle | None]:
    try:
        family = families.detect_folder_family(folder)
    except ValueError as exc:
        raise LoadFailed(str(exc)) from None
    fam = families.get(family)
    manifest = json.loads((folder / "ditgraph.json").read_text()) if (folder / "ditgraph.json").is_file() else {}
    transformer_dir = folder / "transformer" if (folder / "transformer").is_dir() else folder
    if manifest and not (transformer_dir / "config.json").is_file():  # e.g. a model still being trained
        present = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()))
        raise LoadFailed(f"{folder}: missing transformer/ (config.json and weights); the folder has {present}")
    transformer = load_diffusers_component(transformer_dir, dtype, device, expected=fam.transformer_class)
    transformer = _stored(transformer, storage, dtype, device)
    handle = ModelHandle(transformer, family, device, dtype, scheduler_config=families.scheduler_config(folder),
                         defaults=dict(manifest.get("defaults") or {}), source=str(folder),
                         pipeline=families.pipeline_class(folder), **_experts(folder, fam, dtype, device))
    vae = None
    if (folder / "vae" / "config.json").is_file():
        vae = VAEHandle(load_diffusers_component(folder / "vae", dtype, device), device, dtype, str(folder / "vae"))
    slots: dict[str, tuple[Any, torch.nn.Module]] = {}
    options: dict = _encoder_options(folder, handle)
    if fam.manifest_text_encoder:
        te_dir = _minilm_folder(manifest, folder)
        _, tok, model = load_text_encoder(te_dir, None, dtype, device, "minilm")
        slots["minilm"] = (tok, model)
        options["max_length"] = int((manifest.get("text_encoder") or {}).get("max_length", 40))
    else:
        for slot, component in fam.pipeline_text_slots.items():
            te_dir = folder / component
            if (te_dir / "config.json").is_file():
                tok_dir = folder / component.replace("text_encoder", "tokenizer")
                _, tok, model = load_text_encoder(te_dir, tok_dir if tok_dir.is_dir() else None, dtype, device, slot)
                slots[slot] = (tok, model)
    options.update(fam.text_options(transformer))
    encoders = TextEncoders(slots, family, device, dtype, options, str(folder)) if slots else None
    return handle, encoders, vae


def _strip(key: str) -> str:
    for prefix in STRIP_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _config_hint(family: str | None) -> str:
    """Which folders in checkpoints could configure a single file of ``family`` (for errors)."""
    if family is None:
        return ""
    matches = []
    for name in paths.list_files("checkpoints", suffixes=()):
        try:
            if families.detect_folder_family(paths.resolve("checkpoints", name)) == family:
                matches.append(name)
        except (ValueError, OSError):  # unreadable or foreign folders are no candidates
            continue
    if matches:
        return f"; its tensors look like {family}; folders with a {family} config: {', '.join(matches[:8])}"
    return f"; its tensors look like {family}, and no folder in checkpoints has a {family} config yet"


def _stored(model: torch.nn.Module, storage: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    try:
        return weight_storage.apply_storage(model, storage, dtype, device)
    except ValueError as exc:
        raise LoadFailed(str(exc)) from None


def _weight_file(file: Path) -> tuple[list[str], dict, dict]:
    """(tensor names, tensors, fp8 scales) of a single file; GGUF tensors stay in the file."""
    try:
        if file.suffix == ".gguf":
            weight_storage.check_gguf(file)
            import gguf

            return [t.name for t in gguf.GGUFReader(str(file)).tensors], {}, {}
        raw, scales = weight_storage.read_safetensors(file)
    except weight_storage.WeightFileError as exc:
        raise LoadFailed(str(exc)) from None
    return list(raw), raw, scales


def load_single_file(file: Path, config_dir: Path | None, dtype: torch.dtype, device: torch.device,
                     storage: str = "auto"):
    """A transformer from one .safetensors or .gguf file plus a config folder. fp8 files keep
    their fp8 weights with ``storage`` "auto" (see app/models/storage.py); GGUF stays quantized."""
    import diffusers

    keys, raw, scales = _weight_file(file)
    if config_dir is None:
        raise LoadFailed(f"{file}: a single-file checkpoint needs a config folder; set 'config' to a folder in "
                         "checkpoints holding the model's config.json (e.g. a diffusers pipeline folder without weights)"
                         + _config_hint(families.detect_state_dict_family(keys)))
    transformer_cfg_dir = config_dir / "transformer" if (config_dir / "transformer" / "config.json").is_file() else config_dir
    config = _read_config(transformer_cfg_dir)
    class_name = config.get("_class_name", "")
    family = families.detect_config_family(config)
    if family is None:
        raise LoadFailed(f"{transformer_cfg_dir / 'config.json'}: _class_name {class_name!r} is not a supported transformer")
    if (config_dir / "ditgraph.json").is_file():
        family = families.detect_folder_family(config_dir)
    guessed = families.detect_state_dict_family(keys)
    if guessed and not families.get(family).accepts_state_dict_of(guessed):
        raise LoadFailed(f"{file}: the tensors look like a {guessed} model but config {transformer_cfg_dir} is {family}")
    cls = getattr(diffusers, class_name)
    subfolder = "transformer" if transformer_cfg_dir != config_dir else None
    model = _build_single(cls, config, file, config_dir, subfolder, keys, raw, scales, dtype, storage,
                          families.get(family))
    model = _stored(model, "auto" if file.suffix == ".gguf" else storage, dtype, device).to(device).eval()
    handle = ModelHandle(model, family, device, dtype, scheduler_config=families.scheduler_config(config_dir), source=str(file),
                         pipeline=families.pipeline_class(config_dir))
    encoders, vae = _pipeline_extras(config_dir, transformer_cfg_dir, handle, dtype, device)
    return handle, encoders, vae


def _build_single(cls, config: dict, file: Path, config_dir: Path, subfolder: str | None, keys: list[str],
                  raw: dict, scales: dict, dtype: torch.dtype, storage: str, fam: families.Family) -> torch.nn.Module:
    """The transformer from a single file's tensors: directly when its keys are diffusers' (fp8
    weights kept when ``storage`` is auto), else through diffusers' single-file conversion."""
    if file.suffix == ".gguf":
        if storage != "auto":
            raise LoadFailed(f"{file}: a GGUF file is already quantized; set storage to auto")
        try:
            return weight_storage.load_gguf(cls, file, config_dir, subfolder, dtype)
        except weight_storage.WeightFileError as exc:
            raise LoadFailed(str(exc)) from None
    with torch.device("meta"):
        model = cls.from_config(config)
    wanted = set(model.state_dict())
    stripped = {_strip(k): k for k in keys}
    keep_fp8 = storage == "auto"
    if wanted <= set(stripped):
        state = {k: weight_storage.stored_dtype(raw.pop(stripped[k]), dtype, scales.get(stripped[k]), keep_fp8)
                 for k in wanted}
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        try:  # built directly in the target dtype: half the memory of an fp32 build for bf16
            model = cls.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        model.load_state_dict(state, strict=True, assign=True)
        if keep_fp8:
            weight_storage.keep_fp8(model, {_strip(k): v for k, v in scales.items()}, dtype)
        return model
    mapped = fam.original_to_diffusers({_strip(k): v for k, v in raw.items()})  # renames, no copies
    if mapped is not None and wanted <= set(mapped):  # an original layout the family maps itself
        if scales:
            raise LoadFailed(f"{file}: scaled fp8 weights in {cls.__name__}'s original layout are not supported; "
                             "use a bf16/fp16 file or a diffusers folder")
        model = cls.from_config(config).to(dtype)
        model.load_state_dict({k: weight_storage.stored_dtype(mapped[k], dtype, None, False) for k in wanted}, strict=True)
        return model
    try:  # original (BFL/SAI) key layouts: diffusers converts them, scales applied first
        tensors = fam.converter_tensors(weight_storage.dequantized(raw, scales, dtype))
        return cls.from_single_file(tensors, config=str(config_dir),
                                    subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    except Exception as exc:
        missing = sorted(wanted - set(stripped))[:5]
        raise LoadFailed(f"{file}: tensors do not match {cls.__name__} (e.g. missing {missing}) and diffusers' "
                         f"single-file conversion failed: {type(exc).__name__}: {exc}") from None


def _pipeline_extras(config_dir: Path, transformer_cfg_dir: Path, handle: ModelHandle, dtype: torch.dtype,
                     device: torch.device) -> tuple[TextEncoders | None, VAEHandle | None]:
    """A config that is a pipeline folder lends its text encoders and VAE when they have weights."""
    encoders, vae, family = None, None, handle.family
    if config_dir != transformer_cfg_dir:  # a pipeline folder: take its text encoders / VAE if they have weights
        slots = {}
        for slot, component in families.get(family).pipeline_text_slots.items():
            te_dir = config_dir / component
            if (te_dir / "config.json").is_file() and _has_safetensors(te_dir):
                tok_dir = config_dir / component.replace("text_encoder", "tokenizer")
                _, tok, te = load_text_encoder(te_dir, tok_dir if tok_dir.is_dir() else None, dtype, device, slot)
                slots[slot] = (tok, te)
        if slots:
            encoders = TextEncoders(slots, family, device, dtype, _encoder_options(config_dir, handle), str(config_dir))
        if (config_dir / "vae" / "config.json").is_file() and _has_safetensors(config_dir / "vae"):
            vae = VAEHandle(load_diffusers_component(config_dir / "vae", dtype, device), device, dtype, str(config_dir / "vae"))
    return encoders, vae


def _checkpoint_choices() -> list[str]:
    return paths.list_files("checkpoints", suffixes=WEIGHT_SUFFIXES)


def _config_choices() -> list[str]:
    return ["", *paths.list_files("checkpoints", suffixes=())]


def _estimate_checkpoint(values: dict, memory: dict, engine_device: torch.device) -> dict:
    """CheckpointLoader's VRAM plan before it loads (``ditgraph explain``, the editor): from the
    folder's configs on the meta device, for the device and dtype the loader would use."""
    device = values.get("device", "auto")
    dev = torch.device(engine_device if device == "auto" else device)  # no CUDA needed to plan for it
    path = Path(values["checkpoint"])
    if not path.is_dir():
        return {"lines": [f"VRAM plan: made when {path.name} loads (a single file's sizes come from the file)"]}
    return describe_checkpoint(path, values.get("offload", "auto"), values.get("storage", "auto"),
                               resolve_dtype(values.get("dtype", "auto"), dev), dev, memory)


@node(category="loaders", outputs={"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE},
      estimate=_estimate_checkpoint)
def CheckpointLoader(
    checkpoint: Annotated[str, Spec(file="checkpoints", choices=_checkpoint_choices,
                                    tooltip="A diffusers/ditgraph model folder or a single .safetensors or "
                                            ".gguf file (ComfyUI fp8 and scaled-fp8 files load as they are).")],
    config: Annotated[str, Spec(file="checkpoints", choices=_config_choices,
                                tooltip="Single files only: the folder with the model's config.json.")] = "",
    dtype: Annotated[str, Spec(choices=DTYPE_CHOICES, tooltip="Compute dtype; auto: bf16 on CUDA, fp32 on CPU.")
                     ] = "auto",
    device: Annotated[str, Spec(choices=DEVICE_CHOICES)] = "auto",
    offload: Annotated[str, Spec(choices=OFFLOAD_CHOICES, tooltip="auto: the VRAM planner picks per model from the "
                                 "budget (--vram). resident: weights stay on the GPU. model: in RAM, moved whole "
                                 "while each model runs. stream: as many blocks resident as fit, the rest streamed "
                                 "ahead of use. blocks: every block streamed (least VRAM, slowest).")] = "auto",
    storage: Annotated[str, Spec(choices=STORAGE_CHOICES, tooltip="How the transformer stores its weights: auto (as "
                                 "the file holds them), fp8_e4m3/fp8_e5m2 (half of bf16, bf16 compute), int8/float8 "
                                 "(torchao weight-only), nf4 (bitsandbytes).")] = "auto",
) -> tuple:
    """Load a DiT checkpoint (PixArt-Σ, SD3/3.5, Flux.1, Sana, Lumina 2, shapes-dit): the
    transformer as MODEL plus the text encoder(s) and VAE when the checkpoint has them. Each is
    placed on the GPU by the VRAM planner (app/models/memory.py)."""
    dev, dt = _device_dtype(device, dtype)
    load_on = torch.device("cpu")  # placed on the device after planning, never beyond the budget
    path = Path(checkpoint)
    if path.is_dir():
        loaded = load_checkpoint_folder(path, dt, load_on, storage)
    elif path.suffix not in WEIGHT_SUFFIXES:
        raise LoadFailed(f"{path}: only .safetensors/.gguf files or model folders can be loaded (never pickles)")
    else:
        config_dir = Path(config) if config else None  # resolved, confined and fingerprinted by the engine
        loaded = load_single_file(path, config_dir, dt, load_on, storage)
    model, encoders, vae = loaded
    _place(model, encoders, vae, offload, dev)
    model.preview_vae = vae  # latent previews are fitted from it on first use
    return loaded


def _place(model: ModelHandle, encoders: TextEncoders | None, vae: VAEHandle | None, offload: str,
           dev: torch.device) -> None:
    """Plan the loaded parts under the run's VRAM budget and put each where the plan says."""
    parts = {"transformer": (model.transformer, "transformer")}
    values, modules = {"transformer": model}, {"transformer": model.transformer}
    for slot, (_, text_model) in (encoders.slots.items() if encoders is not None else ()):
        parts[slot], values[slot], modules[slot] = (text_model, "text_encoder"), encoders, text_model
    if vae is not None:
        parts["vae"], values["vae"], modules["vae"] = (vae.vae, "vae"), vae, vae.vae
    ctx = current()
    try:  # the parts are measured as stored: the storage was applied when they loaded
        plan = plan_loaded(parts, offload, ctx.memory, dev, model.family)
    except ValueError as exc:
        raise LoadFailed(str(exc)) from None
    place(plan, values, modules, dev)
    ctx.emit({"type": "memory_plan", "run_id": ctx.run_id, "node": ctx.node_id, "plan": describe(plan)})


def _place_alone(value, module: torch.nn.Module, name: str, role: str, offload: str, dev: torch.device) -> None:
    """Plan one model loaded on its own under the run's VRAM budget and put it where the plan says."""
    ctx = current()
    try:
        plan = plan_part(module, name, role, offload, ctx.memory, dev)
    except ValueError as exc:
        raise LoadFailed(str(exc)) from None
    place(plan, {name: value}, {name: module}, dev)
    ctx.emit({"type": "memory_plan", "run_id": ctx.run_id, "node": ctx.node_id, "plan": describe(plan)})


ALONE_OFFLOAD_TOOLTIP = ("auto: the VRAM planner decides from the budget (--vram); a text encoder over a quarter of it "
                         "is on the GPU only while it encodes. resident / model (moved whole while it runs) / stream "
                         "/ blocks as for CheckpointLoader.")


@node(category="loaders", outputs={"text_encoder": TEXT_ENCODER})
def TextEncoderLoader(
    text_encoder: Annotated[str, Spec(file="text_encoders", choices=lambda: paths.list_files("text_encoders", suffixes=()),
                                      tooltip="A transformers model folder (config.json + safetensors + tokenizer files).")],
    role: Annotated[str, Spec(choices=TEXT_ENCODER_TYPES, tooltip="Which role it plays; auto: from its config.")] = "auto",
    dtype: Annotated[str, Spec(choices=DTYPE_CHOICES)] = "auto",
    device: Annotated[str, Spec(choices=DEVICE_CHOICES)] = "auto",
    offload: Annotated[str, Spec(choices=OFFLOAD_CHOICES, tooltip=ALONE_OFFLOAD_TOOLTIP)] = "auto",
) -> TextEncoders:
    """Load one text encoder (CLIP-L/G, T5, Gemma, Llama, MiniLM) from a local folder; combine several
    with CombineTextEncoders (SD3 needs CLIP-L + CLIP-G + T5, Flux CLIP-L + T5, HiDream those three
    and Llama-3.1-8B-Instruct)."""
    dev, dt = _device_dtype(device, dtype)
    folder = Path(text_encoder)
    if not folder.is_dir():
        raise LoadFailed(f"{folder}: text encoders are loaded from folders (config.json, safetensors, tokenizer files)")
    tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    slot, tok, model = load_text_encoder(folder, tok_dir, dt, torch.device("cpu"), role)  # placed after planning
    options = {}
    if (folder / "preprocessor_config.json").is_file():  # a vision-language encoder's image settings (Qwen2.5-VL)
        options["image_processor"] = families.read_json(folder / "preprocessor_config.json")
    encoders = TextEncoders({slot: (tok, model)}, None, dev, dt, options, str(folder))
    _place_alone(encoders, model, slot, "text_encoder", offload, dev)
    return encoders


@node(category="loaders", outputs={"text_encoder": TEXT_ENCODER})
def CombineTextEncoders(first: TEXT_ENCODER, second: TEXT_ENCODER, third: TEXT_ENCODER = None,
                        fourth: TEXT_ENCODER = None) -> TextEncoders:
    """Merge text encoders into one TEXT_ENCODER (e.g. CLIP-L + CLIP-G + T5 for SD3, and a
    Llama for HiDream)."""
    merged = first.merged(second)
    for more in (third, fourth):
        if more is not None:
            merged = merged.merged(more)
    return merged


@node(category="loaders", outputs={"vae": VAE})
def VAELoader(
    vae: Annotated[str, Spec(file="vae", choices=lambda: paths.list_files("vae", suffixes=()),
                             tooltip="A diffusers VAE folder (config.json + safetensors).")],
    dtype: Annotated[str, Spec(choices=DTYPE_CHOICES)] = "auto",
    device: Annotated[str, Spec(choices=DEVICE_CHOICES)] = "auto",
    offload: Annotated[str, Spec(choices=OFFLOAD_CHOICES, tooltip=ALONE_OFFLOAD_TOOLTIP)] = "auto",
) -> VAEHandle:
    """Load a VAE (AutoencoderKL for SD3/Flux/PixArt/Lumina 2/shapes-dit, AutoencoderDC for Sana)."""
    dev, dt = _device_dtype(device, dtype)
    folder = Path(vae)
    if folder.is_dir() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not folder.is_dir():
        raise LoadFailed(f"{folder}: VAEs are loaded from diffusers folders (config.json + safetensors)")
    vae = VAEHandle(load_diffusers_component(folder, dt, torch.device("cpu")), dev, dt, str(folder))
    _place_alone(vae, vae.vae, "vae", "vae", offload, dev)
    return vae
