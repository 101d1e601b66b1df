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
- ``fuse=True``: ``begin_run`` builds merged copies ``W + strength * scale * B @ A`` of the
  targeted weights and swaps them into the modules (the original Parameter objects are kept
  and put back in ``end_run``, bit for bit). Sampling then runs at base-model speed, but the
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


def _sd3_original_names(transformer: torch.nn.Module) -> dict[str, list[tuple[str, int, int, bool]]]:
    """SD3 reference-code module names -> [(diffusers module, chunk index, chunks, swap halves)]."""
    table: dict[str, list[tuple[str, int, int, bool]]] = {}
    blocks = getattr(transformer, "transformer_blocks", [])

    def one(name: str, target: str, swap: bool = False) -> None:
        table[name] = [(target, 0, 1, swap)]

    def qkv(name: str, targets: tuple[str, str, str]) -> None:
        table[name] = [(t, i, 3, False) for i, t in enumerate(targets)]

    for i, block in enumerate(blocks):
        x, c, t = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        qkv(f"{x}.attn.qkv", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"))
        one(f"{x}.attn.proj", f"{t}.attn.to_out.0")
        qkv(f"{x}.attn2.qkv", (f"{t}.attn2.to_q", f"{t}.attn2.to_k", f"{t}.attn2.to_v"))
        one(f"{x}.attn2.proj", f"{t}.attn2.to_out.0")
        one(f"{x}.mlp.fc1", f"{t}.ff.net.0.proj")
        one(f"{x}.mlp.fc2", f"{t}.ff.net.2")
        one(f"{x}.adaLN_modulation.1", f"{t}.norm1.linear")
        qkv(f"{c}.attn.qkv", (f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"))
        one(f"{c}.attn.proj", f"{t}.attn.to_add_out")
        one(f"{c}.mlp.fc1", f"{t}.ff_context.net.0.proj")
        one(f"{c}.mlp.fc2", f"{t}.ff_context.net.2")
        # the last block's context norm is AdaLayerNormContinuous: (scale, shift) vs (shift, scale)
        one(f"{c}.adaLN_modulation.1", f"{t}.norm1_context.linear", swap=bool(getattr(block, "context_pre_only", False)))
    one("x_embedder.proj", "pos_embed.proj")
    one("context_embedder", "context_embedder")
    one("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    one("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    one("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    one("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    one("final_layer.linear", "proj_out")
    one("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    table.update({k.replace(".", "_"): v for k, v in list(table.items())})
    return table


def _convert_with_diffusers(family: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run diffusers' format converters for the families that have them (Flux, Lumina 2)."""
    import diffusers.loaders.lora_pipeline as lp

    mixin = {"flux": lp.FluxLoraLoaderMixin, "lumina2": lp.Lumina2LoraLoaderMixin}.get(family)
    if mixin is None:
        return tensors
    keys = list(tensors)
    if all((".lora_A." in k or ".lora_B." in k or k.endswith(".alpha")) and not k.startswith("diffusion_model.")
           for k in keys):
        return tensors  # already diffusers/peft naming
    try:
        if family == "flux":
            converted, alphas = mixin.lora_state_dict(dict(tensors), return_alphas=True)
        else:
            converted, alphas = mixin.lora_state_dict(dict(tensors)), None
    except Exception:
        return tensors  # not a format the converter knows: matched generically (and reported)
    out = dict(converted)
    for key, value in (alphas or {}).items():
        out[key if key.endswith(".alpha") else key + ".alpha"] = torch.as_tensor(value)
    return out


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


def match_lora(lora: LoraFile, transformer: torch.nn.Module, family: str,
               component: str = "transformer") -> tuple[list[LoraLayer], LoraReport]:
    """Match a LoRA's tensors to ``transformer``'s modules; raise :class:`LoraMismatch` if none fit.

    ``component="vae"`` matches the file's ``vae.``-prefixed layers (a VAE-decoder LoRA) to a VAE
    module instead; for the transformer those layers are only counted.
    """
    report = LoraReport(lora.name)
    if component == "vae":
        tensors = {k[len("vae."):]: v for k, v in lora.tensors.items() if k.startswith("vae.")}
    else:
        tensors = {k: v for k, v in lora.tensors.items() if not k.startswith("vae.")}
        report.vae = len({k.rsplit(".lora_", 1)[0] for k in lora.tensors if k.startswith("vae.") and ".lora_" in k})
        tensors = _convert_with_diffusers(family, tensors)
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

    modules = dict(transformer.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules if name}
    sd3_table = _sd3_original_names(transformer) if family in ("sd3", "shapes-dit") else {}
    meta = (lora.metadata or {}).get("vae", {}) if component == "vae" else (lora.metadata or {})
    default_alpha = meta.get("lora_alpha")
    rslora = bool(meta.get("use_rslora", False))

    layers: list[LoraLayer] = []
    for raw_name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            continue  # an alpha without weights, or half a pair
        if raw_name.startswith(_TEXT_PREFIXES):
            report.text_encoder += 1
            continue
        report.total += 1
        name = raw_name
        for prefix in _MODEL_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        for prefix in _KOHYA_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name in modules and name:
            targets = [(name, 0, 1, False)]
        elif name in underscored:
            targets = [(underscored[name], 0, 1, False)]
        elif name in sd3_table:
            targets = sd3_table[name]
        else:
            report.unmatched.append(raw_name)
            continue
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        report.ranks.add(int(rank))
        if "alpha" in parts:
            alpha = float(parts["alpha"])
        else:
            alpha = _pattern_value(meta.get("alpha_pattern") or {}, name, default_alpha)
            alpha = float(alpha) if alpha is not None else None
        scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)
        ok = True
        built = []
        for target, index, chunks, swap in targets:
            module = modules.get(target)
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                ok = False
                break
            up_part = up.chunk(chunks, dim=0)[index] if chunks > 1 else up
            bias = parts.get("up_bias")
            if bias is not None and chunks > 1:
                bias = bias.chunk(chunks, dim=0)[index]
            if swap:
                a, b = up_part.chunk(2, dim=0)
                up_part = torch.cat([b, a], dim=0)
                if bias is not None:
                    a, b = bias.chunk(2, dim=0)
                    bias = torch.cat([b, a], dim=0)
            weight = module.weight
            if isinstance(module, torch.nn.Linear):
                fits = down.dim() == 2 and up_part.dim() == 2 and down.shape[1] == weight.shape[1] \
                    and up_part.shape[0] == weight.shape[0] and up_part.shape[1] == rank
            else:
                fits = down.dim() == 4 and down.shape[1] == weight.shape[1] and down.shape[2:] == weight.shape[2:] \
                    and up_part.shape[0] == weight.shape[0]
            if not fits:
                ok = False
                break
            built.append(LoraLayer(target, down, up_part, scale, bias))
        if not ok:
            report.wrong_shape.append(f"{raw_name} {tuple(down.shape)}x{tuple(up.shape)}")
            continue
        layers.extend(built)
        report.matched += 1
    report.modules = len({layer.module for layer in layers})
    if not layers:
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
    return layers, report


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
        try:
            for name, entries in self._grouped(run.handle.device, run.handle.dtype).items():
                module = modules[name]
                if self.fuse:
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
        return state

    def end_run(self, run: SamplingRun, state: Any) -> None:
        for item in reversed(state or []):
            if item[0] == "hook":
                item[1].remove()
            else:
                _, module, name, original = item
                module._parameters[name] = original


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
