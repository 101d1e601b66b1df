"""Condition-token control (EasyControl / OminiControl style) for SD3-type joint-attention models
(SD3/SD3.5, shapes-dit).

The control image is VAE-encoded and patch-embedded into *condition tokens* at the same
positions as the image tokens (spatially aligned controls: outlines, edges, depth). They run
through every joint block of the frozen transformer as an extra image-like stream with

- the timestep-0 embedding and no pooled text (so they do not depend on the noisy latents,
  the step or the prompt),
- a LoRA on their own Q/K/V/out projections only (the image and text tokens keep the base
  weights), and a learned copy of the patch embedding,
- causal condition attention: image and text tokens attend to [image, text, condition]
  tokens, condition tokens attend only to themselves,

and in each block their keys/values are appended to the joint attention. Because condition
tokens see only themselves, their K/V are the same at every step: they are computed on the
first model call of a run and reused for every later call (EasyControl's KV cache).
``strength`` adds log(strength) to the attention logits of the condition keys (OminiControl's
attention bias); strength 0 is exactly the base model.

Optionally (config ``image_rank`` > 0) the adapter also carries a LoRA on the *image* tokens'
Q/K/V/out projections, applied only while the condition is active (scaled by min(strength, 1)).
Condition tokens alone only add context; binding each shape's colour words to its outline
needs the image tokens' own attention to change, which is where a ControlNet's residuals act.
Adapter files without it load as before.

The adapter file is one safetensors with metadata ``{"format": "ditgraph/condition-tokens",
"config": {...}}``; :class:`ConditionAdapterModule` is also what training/train_control.py
trains (``--kind tokens``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.models import families
from app.models.handles import ModelCall, ModelPatch, Resident, SamplingRun
from app.models.patches.controlnet import encode_image, repeat_to, step_active

FORMAT = "ditgraph/condition-tokens"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
IMAGE_PREFIX = "image."  # file keys of the image-stream LoRA


def _key(name: str) -> str:
    return name.replace(".", "__")


class ConditionAdapterModule(torch.nn.Module):
    """The trainable part: a LoRA per (block, projection) for condition tokens, and a patch
    embedding for the condition latents (initialised from the transformer's)."""

    def __init__(self, transformer: torch.nn.Module | None = None, rank: int = 16, alpha: float | None = None,
                 targets: tuple[str, ...] = DEFAULT_TARGETS, config: dict | None = None, image_rank: int = 0,
                 image_alpha: float | None = None):
        super().__init__()
        if config is None:
            c = transformer.config
            config = {"rank": rank, "alpha": float(alpha if alpha is not None else rank), "targets": list(targets),
                      "num_layers": len(transformer.transformer_blocks), "in_channels": c.in_channels,
                      "patch_size": c.patch_size, "dim": c.num_attention_heads * c.attention_head_dim}
            if image_rank:
                config.update(image_rank=image_rank, image_targets=list(DEFAULT_TARGETS),
                              image_alpha=float(image_alpha if image_alpha is not None else image_rank))
        self.config = dict(config)
        dim, p = self.config["dim"], self.config["patch_size"]
        self.down, self.up = self._lora(self.config["rank"], self.config["targets"])
        # files written before the image LoRA existed have no image_* keys: no image LoRA
        self.image_down, self.image_up = self._lora(self.config.get("image_rank", 0),
                                                    self.config.get("image_targets", []))
        self.embed = torch.nn.Conv2d(self.config["in_channels"], dim, p, stride=p)
        if transformer is not None:
            self.embed.load_state_dict(transformer.pos_embed.proj.state_dict())

    def _lora(self, rank: int, targets: list[str]) -> tuple[torch.nn.ParameterDict, torch.nn.ParameterDict]:
        """(down, up) per block and target; up starts at zero so a fresh LoRA changes nothing."""
        down, up = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for i in range(self.config["num_layers"] if rank else 0):
            for target in targets:
                name = _key(f"transformer_blocks.{i}.attn.{target}")
                d = torch.empty(rank, self.config["dim"])
                torch.nn.init.kaiming_uniform_(d, a=math.sqrt(5))
                down[name] = torch.nn.Parameter(d)
                up[name] = torch.nn.Parameter(torch.zeros(self.config["dim"], rank))
        return down, up

    @property
    def scale(self) -> float:
        return self.config["alpha"] / self.config["rank"]

    @property
    def has_image_lora(self) -> bool:
        return len(self.image_down) > 0

    def image_delta(self, index: int, target: str, x: torch.Tensor) -> torch.Tensor | None:
        """The image-stream LoRA's addition to block ``index``'s ``target`` projection of ``x`` (None if none)."""
        key = _key(f"transformer_blocks.{index}.attn.{target}")
        if key not in self.image_down:
            return None
        down, up = self.image_down[key], self.image_up[key]
        scale = self.config["image_alpha"] / self.config["image_rank"]
        return F.linear(F.linear(x.to(down.dtype), down), up) * scale

    def _linear(self, module: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        key = _key(name)
        if key in self.down:
            down, up = self.down[key], self.up[key]
            out = out + F.linear(F.linear(x.to(down.dtype), down), up).to(out.dtype) * self.scale
        return out

    def tokens(self, transformer: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Condition latents (B, C, h, w) -> tokens (B, N, D) at the image tokens' positions."""
        pe = transformer.pos_embed
        x = self.embed(latents.to(self.embed.weight.dtype)).flatten(2).transpose(1, 2)
        if getattr(pe, "pos_embed_max_size", None):
            pos = pe.cropped_pos_embed(latents.shape[-2], latents.shape[-1])
        else:
            pos = getattr(pe, "pos_embed", None)
        if pos is not None:
            x = x + pos.to(x.dtype)
        return x

    def kv(self, transformer: torch.nn.Module, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values (B, heads, N, head_dim) of the condition tokens in every joint block."""
        c = self.tokens(transformer, latents).to(next(transformer.parameters()).dtype)
        batch = c.shape[0]
        pooled_dim = transformer.config.pooled_projection_dim
        temb = transformer.time_text_embed(torch.zeros(batch, device=c.device, dtype=c.dtype),
                                           torch.zeros(batch, pooled_dim, device=c.device, dtype=c.dtype))
        blocks = transformer.transformer_blocks
        out = []
        for i, block in enumerate(blocks):
            attn = block.attn
            normed = block.norm1(c, emb=temb)
            norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = normed[:5]
            prefix = f"transformer_blocks.{i}.attn"
            q = self._linear(attn.to_q, f"{prefix}.to_q", norm_c)
            k = self._linear(attn.to_k, f"{prefix}.to_k", norm_c)
            v = self._linear(attn.to_v, f"{prefix}.to_v", norm_c)
            q, k, v = split_heads(attn, q, k, v, attn.norm_q, attn.norm_k)
            out.append((k, v))
            if i == len(blocks) - 1:
                break
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, attn.heads * k.shape[-1])
            o = self._linear(attn.to_out[0], f"{prefix}.to_out.0", o.to(q.dtype))
            c = c + gate_msa.unsqueeze(1) * o
            n2 = block.norm2(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            c = c + gate_mlp.unsqueeze(1) * block.ff(n2)
        return out

    def _file_params(self) -> dict[str, torch.nn.Parameter]:
        """File key -> parameter. The image LoRA's keys carry the ``image.`` prefix."""
        params = {}
        for prefix, down, up in (("", self.down, self.up), (IMAGE_PREFIX, self.image_down, self.image_up)):
            for key in down:
                name = prefix + key.replace("__", ".")
                params[f"{name}.lora_A.weight"] = down[key]
                params[f"{name}.lora_B.weight"] = up[key]
        params["cond_embed.weight"] = self.embed.weight
        params["cond_embed.bias"] = self.embed.bias
        return params

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._file_params().items()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
        params = self._file_params()
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ValueError(f"{source}: condition adapter file lacks {len(missing)} tensors its config names "
                             f"(first: {missing[0]})")
        with torch.no_grad():
            for key, param in params.items():
                if tensors[key].shape != param.shape:
                    raise ValueError(f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, the config "
                                     f"implies {tuple(param.shape)}")
                param.copy_(tensors[key])


def save_condition_adapter(module: ConditionAdapterModule, path: str | Path, info: dict | None = None,
                           dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.to(dtype).contiguous().cpu() for k, v in module.file_tensors().items()}
    meta = {"format": FORMAT, "config": json.dumps(module.config), "info": json.dumps(info or {})}
    save_file(tensors, str(path), metadata=meta)


# ---------------------------------------------------------------------------------------------
# attention with condition keys


class ConditionKV:
    """What the processors read during one transformer call: per-block K/V and the bias."""

    def __init__(self, module: ConditionAdapterModule | None = None, image_scale: float = 1.0) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.bias: float = 0.0
        # the adapter whose image-stream LoRA applies while kv is set (None: no image LoRA)
        self.image = module if module is not None and module.has_image_lora else None
        self.image_scale = image_scale


def split_heads(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norm_q, norm_k) -> tuple:
    """(B, N, heads * d) projections -> (B, heads, N, d) each, with the block's QK norms if it has them."""
    batch, head_dim = q.shape[0], k.shape[-1] // attn.heads
    q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class ConditionAttnProcessor:
    """JointAttnProcessor2_0 plus the condition tokens' keys/values appended to the joint
    attention of the image and text tokens (with an additive logit bias)."""

    def __init__(self, original: Any, index: int, holders: list[ConditionKV]):
        self.original = original
        self.index = index
        self.holders = holders

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        extra = [h for h in self.holders if h.kv is not None]
        if not extra or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = split_heads(attn, *(self._image(attn, t, hidden_states, extra) for t in DEFAULT_TARGETS[:3]),
                                        attn.norm_q, attn.norm_k)
        head_dim = key.shape[-1]
        if encoder_hidden_states is not None:
            eq, ek, ev = split_heads(attn, attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                                     attn.add_v_proj(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k)
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        keys, values, biases = [key], [value], [torch.zeros(key.shape[2], device=key.device, dtype=query.dtype)]
        for holder in extra:
            ck, cv = holder.kv[self.index]
            keys.append(repeat_to(ck.to(key.dtype), batch))
            values.append(repeat_to(cv.to(value.dtype), batch))
            biases.append(torch.full((ck.shape[2],), holder.bias, device=key.device, dtype=query.dtype))
        mask = None
        if any(h.bias != 0.0 for h in extra):
            mask = torch.cat(biases)[None, None, None, :]
        out = F.scaled_dot_product_attention(query, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, : residual.shape[1]], out[:, residual.shape[1]:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](self._image(attn, "to_out.0", out, extra))
        return (out, context) if encoder_hidden_states is not None else out

    def _image(self, attn, target: str, x: torch.Tensor, holders: list[ConditionKV]) -> torch.Tensor:
        """An image-stream projection plus the image LoRA of each active adapter that has one."""
        out = attn.to_out[0](x) if target == "to_out.0" else getattr(attn, target)(x)
        for holder in holders:
            delta = holder.image.image_delta(self.index, target, x) if holder.image is not None else None
            if delta is not None:
                out = out + (delta * holder.image_scale).to(out.dtype)
        return out


def install_processors(transformer: torch.nn.Module, holder: ConditionKV) -> list:
    """Make every joint block's attention also read ``holder``; returns what to restore.
    Several patches share one processor per block (each adds its own holder)."""
    installed = []
    for i, block in enumerate(transformer.transformer_blocks):
        proc = block.attn.processor
        if isinstance(proc, ConditionAttnProcessor):
            proc.holders.append(holder)
            installed.append((block.attn, None, holder))
        else:
            block.attn.processor = ConditionAttnProcessor(proc, i, [holder])
            installed.append((block.attn, proc, holder))
    return installed


def restore_processors(installed: list) -> None:
    for attn, original, holder in reversed(installed):
        proc = attn.processor
        if isinstance(proc, ConditionAttnProcessor) and holder in proc.holders:
            proc.holders.remove(holder)
        if original is not None:
            attn.processor = original


# ---------------------------------------------------------------------------------------------
# the CONTROL value and the patch


@dataclass(eq=False)
class ConditionAdapter(Resident):
    """The CONTROL value of a condition-token adapter."""

    module: ConditionAdapterModule
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    source: str = ""
    info: dict = field(default_factory=dict)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.module]

    def check_model(self, model: Any) -> None:
        blocks = getattr(model.transformer, "transformer_blocks", None)
        if not model.info.joint_attention or blocks is None:
            joint = ", ".join(f.name for f in families.FAMILIES.values() if f.joint_attention)
            raise ValueError(f"{self.source}: condition tokens need an SD3-type joint-attention model "
                             f"({joint}); got {model.family}")
        c = model.transformer.config
        dim = c.num_attention_heads * c.attention_head_dim
        cfg = self.module.config
        if cfg["num_layers"] != len(blocks) or cfg["dim"] != dim or cfg["in_channels"] != c.in_channels:
            raise ValueError(f"{self.source}: adapter for {cfg['num_layers']} blocks of width {cfg['dim']} "
                             f"({cfg['in_channels']} latent channels) does not fit this model ({len(blocks)} blocks, "
                             f"width {dim}, {c.in_channels} channels)")


def load_condition_adapter(path: str | Path, dtype: torch.dtype, device: torch.device) -> ConditionAdapter:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: condition adapters are .safetensors files")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a condition-token adapter (metadata format {meta.get('format')!r}, expected "
                         f"{FORMAT!r}); diffusers ControlNets are folders with a config.json")
    module = ConditionAdapterModule(config=json.loads(meta["config"]))
    module.load_file_tensors(tensors, str(path))
    module = module.to(device, dtype).eval().requires_grad_(False)
    return ConditionAdapter(module, device, dtype, str(path), json.loads(meta.get("info", "{}")))


class ConditionTokenPatch(ModelPatch):
    """Append condition tokens' K/V to every joint attention while sampling (see module doc)."""

    def __init__(self, adapter: ConditionAdapter, image: torch.Tensor, vae: Any, strength: float = 1.0,
                 start: float = 0.0, end: float = 1.0):
        if strength < 0:
            raise ValueError("condition-token strength must be >= 0 (it scales attention to the condition)")
        self.adapter = adapter
        self.image = image
        self.vae = vae
        self.strength = float(strength)
        self.start, self.end = float(start), float(end)
        name = Path(adapter.source).stem or "tokens"
        self.key = f"condition_tokens({name}, {self.strength:g}, {self.start:g}-{self.end:g})"

    def begin_run(self, run: SamplingRun) -> Any:
        if self.strength == 0.0:
            return None
        self.adapter.ensure_device()
        # the image LoRA fades with strength below 1 so that strength -> 0 approaches the base model
        holder = ConditionKV(self.adapter.module, min(self.strength, 1.0))
        holder.bias = math.log(self.strength)
        return {"holder": holder, "installed": install_processors(run.transformer, holder), "kv": {}}

    def end_run(self, run: SamplingRun, state: Any) -> None:
        if state:
            restore_processors(state["installed"])

    @torch.no_grad()
    def wrap(self, state: Any, call: ModelCall, forward) -> torch.Tensor:
        if state is None or not step_active(call.run, self.start, self.end):
            return forward(call)
        h, w = call.latents.shape[-2:]
        if (h, w) not in state["kv"]:  # once per run (per latent size): the EasyControl KV cache
            latents = encode_image(self.vae, self.image, (h, w))
            latents = latents.to(call.run.handle.device, call.run.handle.dtype)
            state["kv"][(h, w)] = self.adapter.module.kv(call.run.transformer, latents)
        holder = state["holder"]
        holder.kv = state["kv"][(h, w)]
        try:
            return forward(call)
        finally:
            holder.kv = None
