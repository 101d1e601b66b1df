"""LoRA as a model patch: read LoRA files of every common format, match them to a transformer,
and apply them only for the duration of a sampling run.

Formats
-------
- diffusers / peft: ``<module>.lora_A.weight`` + ``<module>.lora_B.weight`` (optionally with a
  ``transformer.`` or ``base_model.model.`` prefix, a ``lora_B.bias``, and the LoRA config as
  safetensors metadata ``lora_adapter_metadata`` or a peft ``adapter_config.json`` beside it);
- kohya / sd-scripts: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` /
  ``alpha``; for Flux, kohya, XLabs, BFL-control and fal formats go through diffusers' own
  converters (``FluxLoraLoaderMixin.lora_state_dict``), Lumina 2 likewise;
- SD3 original names (``joint_blocks.N.x_block.attn.qkv`` ..., dotted or kohya-underscored) are
  mapped to diffusers' SD3Transformer2DModel names here (diffusers has no converter for them);
- any of the above for PixArt, Sana, Lumina 2 and shapes-dit (peft path: module names as in the
  diffusers model).
Scale per layer: ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA); alpha from an ``.alpha``
tensor, else the adapter metadata (``lora_alpha``, ``alpha_pattern``), else alpha = rank.

Application
-----------
The base transformer is shared by every memoized handle, so a :class:`LoraPatch` never leaves
it changed:

- ``fuse=False`` (default): ``begin_run`` registers a forward hook on each targeted Linear/Conv2d
  that adds ``strength * scale * B(A(x))``; ``end_run`` removes the hooks. Extra memory: the LoRA
  factors on the device (rank/dim of the targeted weights); extra compute: two thin matmuls per
  targeted layer per call.
- ``fuse=True``: layers whose weights are quantized (QuantizeModel) cannot be merged into;
  those get the unfused side branch, with a warning. Elsewhere ``begin_run`` builds merged
  copies ``W + strength * scale * B @ A`` of the targeted weights and swaps them into the
  modules (the original Parameter objects are kept and put back in ``end_run``, bit for bit). Sampling then runs at base-model speed, but the
  run holds a second copy of every targeted weight (for a LoRA on all attention + MLP layers,
  close to the transformer's size again). Use it when compute, not memory, is the limit.

Several LoRA patches stack (each adds its own term; fused ones merge onto what the previous
patch installed and are undone in reverse order). Strength may be negative. Strength 0 is an
exact no-op. A LoRA whose keys match nothing raises :class:`LoraMismatch`; partial matches are
reported with counts in :class:`LoraReport`.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.models import families
from app.models.events import warn
from app.models.handles import ModelPatch, SamplingRun


class LoraMismatch(ValueError):
    """A LoRA that does not fit the model (no key matches, or wrong shapes)."""


# ---------------------------------------------------------------------------------------------
# reading files


@dataclass(eq=False)
class LoraFile:
    """The tensors and metadata of one LoRA file (any format, not yet matched to a model)."""

    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)  # peft/diffusers LoRA config (r, lora_alpha, ...)
    source: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA from a .safetensors file or a folder (peft ``adapter_model.safetensors`` +
    ``adapter_config.json``, or diffusers ``pytorch_lora_weights.safetensors``). Never unpickles."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    config: dict = {}
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        preferred = [f for f in files if f.name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")]
        if not files:
            raise LoraMismatch(f"{path}: no .safetensors file in this LoRA folder (pickled .bin files are refused)")
        file = (preferred or files)[0]
    else:
        file = path
    if file.suffix != ".safetensors":
        raise LoraMismatch(f"{file}: LoRAs are read from .safetensors only (never pickles)")
    if (file.parent / "adapter_config.json").is_file():
        try:
            config = json.loads((file.parent / "adapter_config.json").read_text())
        except ValueError as exc:
            raise LoraMismatch(f"{file.parent / 'adapter_config.json'}: not valid JSON ({exc})") from None
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), "pt") as handle:
            raw_meta = handle.metadata() or {}
    except Exception as exc:
        raise LoraMismatch(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    meta_text = raw_meta.get("lora_adapter_metadata")
    if meta_text:
        try:
            meta = json.loads(meta_text)
        except ValueError:
            meta = {}
        # diffusers' pipeline save prefixes the config keys with the component ("transformer.r")
        if any(k.startswith(("transformer.", "vae.")) for k in meta):
            vae_meta = {k[len("vae."):]: v for k, v in meta.items() if k.startswith("vae.")}
            meta = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
            if vae_meta:
                meta["vae"] = vae_meta
        config = {**meta, **config}
    return LoraFile(path.name, tensors, config, str(path))


# ---------------------------------------------------------------------------------------------
# matching to a model

# suffix -> role. Order matters: longer suffixes first.
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = ("lora_magnitude_vector", "dora_scale", ".hada_", ".lokr_", ".diff", ".diff_b", "lora_mid")
_MODEL_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.", "model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_dit_")
_TEXT_PREFIXES = ("text_encoder", "lora_te", "te.", "te1.", "te2.", "te3.", "cond_stage_model.", "conditioner.",
                  "text_model.", "clip_l.", "clip_g.", "t5xxl.")


@dataclass
class LoraLayer:
    """One low-rank update of one module of the transformer (already matched)."""

    module: str
    down: torch.Tensor  # (r, in) or conv (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or conv (out, r, 1, 1)
    scale: float  # alpha / rank
    up_bias: torch.Tensor | None = None


@dataclass
class LoraReport:
    """How a LoRA file matched a model: counts a user can act on."""

    name: str
    total: int = 0  # LoRA layers in the file (excluding text encoders)
    matched: int = 0  # LoRA layers applied to the transformer
    modules: int = 0  # transformer modules touched
    text_encoder: int = 0  # text-encoder layers (not applied: MODEL only)
    unsupported: int = 0  # DoRA/LoHa/LoKr/... tensors
    vae: int = 0  # VAE-decoder layers (applied by VAELoraLoader, not to the MODEL)
    unmatched: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    ranks: set = field(default_factory=set)

    def summary(self) -> str:
        rank = "/".join(str(r) for r in sorted(self.ranks)) or "?"
        text = f"{self.name}: {self.matched}/{self.total} LoRA layers matched ({self.modules} modules, rank {rank})"
        missing = len(self.unmatched) + len(self.wrong_shape)
        if missing:
            examples = ", ".join((self.unmatched + self.wrong_shape)[:3])
            text += f"; {missing} not matched (e.g. {examples})"
        if self.text_encoder:
            text += f"; {self.text_encoder} text-encoder layers ignored (LoRA applies to the MODEL only)"
        if self.vae:
            text += f"; {self.vae} VAE-decoder layers (apply them with VAELoraLoader)"
        if self.unsupported:
            text += f"; {self.unsupported} unsupported tensors ignored (DoRA/LoHa/LoKr/full-diff)"
        return text


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: exact name, dotted suffix, or ^regex."""
    for pattern, value in (patterns or {}).items():
        if pattern.startswith("^"):
            if re.fullmatch(pattern[1:] if pattern[1:].endswith("$") else pattern[1:] + r"(\..*)?", module) or \
                    re.search(pattern[1:], module):
                return value
        elif module == pattern or module.endswith("." + pattern):
            return value
    return default


def _group_tensors(lora: LoraFile, family: str, component: str, report: LoraReport) -> dict[str, dict[str, torch.Tensor]]:
    """The file's LoRA tensors by layer name and role (down/up/alpha/up_bias), in diffusers naming."""
    if component == "vae":
        tensors = {k[len("vae."):]: v for k, v in lora.tensors.items() if k.startswith("vae.")}
    else:
        tensors = {k: v for k, v in lora.tensors.items() if not k.startswith("vae.")}
        report.vae = len({k.rsplit(".lora_", 1)[0] for k in lora.tensors if k.startswith("vae.") and ".lora_" in k})
        tensors = families.get(family).convert_lora(tensors)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        if any(u in key for u in _UNSUPPORTED):
            report.unsupported += 1
            continue
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                groups[key[: -len(suffix)]][role] = value
                break
        else:
            report.unsupported += 1  # not a LoRA tensor at all (e.g. a full weight)
    return groups


def _strip_prefixes(name: str) -> str:
    for prefixes in (_MODEL_PREFIXES, _KOHYA_PREFIXES):
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
    return name


def _lora_scale(parts: dict, name: str, meta: dict, rank: int) -> float:
    """alpha / rank (alpha / sqrt(rank) for rsLoRA); 1 without an alpha."""
    if "alpha" in parts:
        alpha = float(parts["alpha"])
    else:
        alpha = _pattern_value(meta.get("alpha_pattern") or {}, name, meta.get("lora_alpha"))
        alpha = float(alpha) if alpha is not None else None
    rslora = bool(meta.get("use_rslora", False))
    return 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)


def _swap_halves(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _fits(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor, rank: int) -> bool:
    weight = module.weight
    if isinstance(module, torch.nn.Linear):
        return down.dim() == 2 and up.dim() == 2 and down.shape[1] == weight.shape[1] \
            and up.shape[0] == weight.shape[0] and up.shape[1] == rank
    return down.dim() == 4 and down.shape[1] == weight.shape[1] and down.shape[2:] == weight.shape[2:] \
        and up.shape[0] == weight.shape[0]


def _build_layers(targets: list, parts: dict, modules: dict, scale: float) -> list[LoraLayer] | None:
    """One LoraLayer per target (fused QKV files split into chunks); None if any does not fit."""
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    built = []
    for target, index, chunks, swap in targets:
        module = modules.get(target)
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            return None
        up_part = up.chunk(chunks, dim=0)[index] if chunks > 1 else up
        bias = parts.get("up_bias")
        if bias is not None and chunks > 1:
            bias = bias.chunk(chunks, dim=0)[index]
        if swap:
            up_part, bias = _swap_halves(up_part), _swap_halves(bias)
        if not _fits(module, down, up_part, rank):
            return None
        built.append(LoraLayer(target, down, up_part, scale, bias))
    return built


def match_lora(lora: LoraFile, transformer: torch.nn.Module, family: str,
               component: str = "transformer") -> tuple[list[LoraLayer], LoraReport]:
    """Match a LoRA's tensors to ``transformer``'s modules; raise :class:`LoraMismatch` if none fit.

    ``component="vae"`` matches the file's ``vae.``-prefixed layers (a VAE-decoder LoRA) to a VAE
    module instead; for the transformer those layers are only counted.
    """
    report = LoraReport(lora.name)
    groups = _group_tensors(lora, family, component, report)
    modules = dict(transformer.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules if name}
    table = families.get(family).lora_name_table(transformer) if component != "vae" else {}
    meta = (lora.metadata or {}).get("vae", {}) if component == "vae" else (lora.metadata or {})
    layers: list[LoraLayer] = []
    for raw_name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            continue  # an alpha without weights, or half a pair
        if raw_name.startswith(_TEXT_PREFIXES):
            report.text_encoder += 1
            continue
        report.total += 1
        name = _strip_prefixes(raw_name)
        if name in modules and name:
            targets = [(name, 0, 1, False)]
        elif name in underscored:
            targets = [(underscored[name], 0, 1, False)]
        elif name in table:
            targets = table[name]
        else:
            report.unmatched.append(raw_name)
            continue
        rank = parts["down"].shape[0]
        report.ranks.add(int(rank))
        built = _build_layers(targets, parts, modules, _lora_scale(parts, name, meta, rank))
        if built is None:
            report.wrong_shape.append(f"{raw_name} {tuple(parts['down'].shape)}x{tuple(parts['up'].shape)}")
            continue
        layers.extend(built)
        report.matched += 1
    report.modules = len({layer.module for layer in layers})
    if not layers:
        _raise_no_match(lora, transformer, family, component, report, groups, modules)
    return layers, report


def _raise_no_match(lora: LoraFile, transformer: torch.nn.Module, family: str, component: str, report: LoraReport,
                    groups: dict, modules: dict) -> None:
    examples = ", ".join(list(groups)[:3]) or "none"
    model_names = ", ".join([n for n, m in modules.items() if isinstance(m, torch.nn.Linear)][:3])
    if component == "vae":
        raise LoraMismatch(f"LoRA {lora.name!r} has no VAE-decoder layers that fit this VAE "
                           f"({report.total} found, e.g. {examples})")
    if report.total == 0 and report.vae:
        raise LoraMismatch(f"LoRA {lora.name!r} only has VAE-decoder layers ({report.vae}); apply it with "
                           "VAELoraLoader")
    if report.total == 0 and report.text_encoder:
        raise LoraMismatch(f"LoRA {lora.name!r} only has text-encoder layers ({report.text_encoder}); "
                           "nothing applies to the diffusion model")
    if report.wrong_shape and not report.unmatched:
        raise LoraMismatch(f"LoRA {lora.name!r}: its {report.total} layers name modules of this "
                           f"{type(transformer).__name__} but none has the right shape (e.g. "
                           f"{report.wrong_shape[0]}); is it a LoRA for another model size?")
    raise LoraMismatch(f"LoRA {lora.name!r} matches none of the layers of this {family} model "
                       f"({type(transformer).__name__}): {report.total} LoRA layers, e.g. {examples}; "
                       f"the model's layers look like {model_names}. Is it a LoRA for another model family?")


# ---------------------------------------------------------------------------------------------
# the patch


def _lora_delta_hook(entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        for down, up, bias in entries:
            if isinstance(module, torch.nn.Conv2d):
                h = F.conv2d(x.to(down.dtype), down, None, module.stride, module.padding, module.dilation, module.groups)
                delta = F.conv2d(h, up)
                if bias is not None:
                    delta = delta + bias[None, :, None, None]
            else:
                delta = F.linear(F.linear(x.to(down.dtype), down), up, bias)
            output = output + delta.to(output.dtype)
        return output

    return hook


class LoraPatch(ModelPatch):
    """One LoRA at one strength, applied only while a sampling run is open (see module doc)."""

    def __init__(self, name: str, layers: list[LoraLayer], strength: float = 1.0, fuse: bool = False,
                 report: LoraReport | None = None):
        self.name = name
        self.layers = layers
        self.strength = float(strength)
        self.fuse = bool(fuse)
        self.report = report
        self.key = f"lora({name}, {self.strength:g}{', fused' if fuse else ''})"

    def cache_nbytes(self) -> dict[str, int]:
        """Bytes of the LoRA factors (for the memo cache's accounting; they stay on CPU)."""
        total = 0
        for layer in self.layers:
            for t in (layer.down, layer.up, layer.up_bias):
                if t is not None:
                    total += t.numel() * t.element_size()
        return {"cpu": total}

    def _grouped(self, device: torch.device, dtype: torch.dtype) -> dict[str, list]:
        grouped: dict[str, list] = defaultdict(list)
        for layer in self.layers:
            factor = self.strength * layer.scale
            up = (layer.up.to(device, torch.float32) * factor).to(dtype)
            bias = None if layer.up_bias is None else (layer.up_bias.to(device, torch.float32) * factor).to(dtype)
            grouped[layer.module].append((layer.down.to(device, dtype), up, bias))
        return grouped

    def begin_run(self, run: SamplingRun) -> Any:
        if self.strength == 0.0:
            return None
        transformer = run.transformer
        modules = dict(transformer.named_modules())
        state: list = []
        unfused: list[str] = []
        try:
            for name, entries in self._grouped(run.handle.device, run.handle.dtype).items():
                module = modules[name]
                fuse = self.fuse and not quantized_weight(module)
                if self.fuse and not fuse:
                    unfused.append(name)
                if fuse:
                    state.append(("param", module, "weight", module._parameters["weight"]))
                    module._parameters["weight"] = torch.nn.Parameter(_merged(module, entries), requires_grad=False)
                    if any(b is not None for _, _, b in entries) and module.bias is not None:
                        state.append(("param", module, "bias", module._parameters["bias"]))
                        bias = module.bias.detach().float() + sum(b.float() for _, _, b in entries if b is not None)
                        module._parameters["bias"] = torch.nn.Parameter(bias.to(module.bias.dtype), requires_grad=False)
                else:
                    state.append(("hook", module.register_forward_hook(_lora_delta_hook(entries), with_kwargs=True)))
        except BaseException:
            self.end_run(run, state)
            raise
        if unfused:
            warn(f"{len(unfused)} targeted layer(s) hold quantized weights (QuantizeModel), which a LoRA cannot "
                 "merge into: applied unfused there (a side branch beside the quantized layer)", self.key)
            run.extras.setdefault("notes", []).append(f"{self.key}: unfused on {len(unfused)} quantized layer(s)")
        return state

    def end_run(self, run: SamplingRun, state: Any) -> None:
        for item in reversed(state or []):
            if item[0] == "hook":
                item[1].remove()
            else:
                _, module, name, original = item
                module._parameters[name] = original


def quantized_weight(module: torch.nn.Module) -> bool:
    """A weight stored as a wrapper tensor subclass (torchao's quantized tensors), which has
    no plain values to add a LoRA delta to."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and hasattr(type(weight), "__tensor_flatten__")


def _merged(module: torch.nn.Module, entries: list) -> torch.Tensor:
    weight = module.weight.detach()
    merged = weight.float().clone()
    for down, up, _ in entries:
        if merged.dim() == 4:
            merged += torch.einsum("or,rikl->oikl", up.float().flatten(1), down.float())
        else:
            merged += up.float() @ down.float()
    return merged.to(weight.dtype)


def lora_patch(lora: LoraFile, model: Any, strength: float = 1.0, fuse: bool = False) -> LoraPatch:
    """Match ``lora`` to a MODEL (``ModelHandle``) and make the patch."""
    layers, report = match_lora(lora, model.transformer, model.family)
    return LoraPatch(Path(lora.name).stem, layers, strength, fuse, report)


def vae_with_lora(vae: Any, lora: LoraFile, strength: float = 1.0) -> tuple[Any, LoraReport]:
    """A VAE value (``VAEHandle``) whose module is a merged *copy* of ``vae``'s with the file's
    ``vae.`` LoRA layers. VAEs are small next to transformers, so a copy is the simple way to
    leave the cached input untouched (memory: one more VAE)."""
    import copy
    from dataclasses import replace

    layers, report = match_lora(lora, vae.vae, "vae", component="vae")
    module = copy.deepcopy(vae.vae)
    if strength != 0.0:
        patch = LoraPatch(lora.name, layers, strength, fuse=True)
        modules = dict(module.named_modules())
        device = next(module.parameters()).device
        with torch.no_grad():
            for name, entries in patch._grouped(device, torch.float32).items():
                target = modules[name]
                target.weight.copy_(_merged(target, entries))
                for _, _, bias in entries:
                    if bias is not None and target.bias is not None:
                        target.bias += bias.to(target.bias.dtype)
    return replace(vae, vae=module.eval(), source=f"{vae.source} + {lora.name}"), report
