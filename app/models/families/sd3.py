"""Stable Diffusion 3 / 3.5: MMDiT, CLIP-L + CLIP-G + T5, 16-channel VAE, flow matching."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from app.models.families.base import Family


class SD3(Family):
    name = "sd3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    latent_channels = 16
    text_slots = ("clip_l", "clip_g", "t5")
    optional_text_slots = ("t5",)  # without T5 the pipeline pads with zeros
    pipeline_text_slots = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
    default_cfg = 7.0
    controlnet_class = "SD3ControlNetModel"
    joint_attention = True
    detect_priority = 20

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "joint_blocks." in joined_keys or "context_embedder." in joined_keys and "pos_embed" in joined_keys

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        # timesteps stay float32, as the pipelines pass them
        embeds, pooled, _ = handle.cond_tensors(cond)
        return {"hidden_states": x_in.to(handle.dtype), "timestep": timestep,
                "encoder_hidden_states": embeds, "pooled_projections": pooled}

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        kw = {"max_sequence_length": max_length} if max_length else {}
        if "t5" not in encoders.slots:  # the pipeline pads with zeros as wide as the transformer's text input
            width = int(encoders.options.get("joint_attention_dim", 4096))
            object.__setattr__(pipe, "transformer", SimpleNamespace(config=SimpleNamespace(joint_attention_dim=width)))
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=encoders.device,
                                                  do_classifier_free_guidance=False, **kw)
        return embeds, pooled, None

    def text_options(self, transformer: torch.nn.Module) -> dict:
        return {"joint_attention_dim": int(transformer.config.joint_attention_dim)}  # the zero-pad width without T5

    def lora_name_table(self, transformer: torch.nn.Module) -> dict:
        return sd3_original_names(transformer)


def sd3_original_names(transformer: torch.nn.Module) -> dict[str, list[tuple[str, int, int, bool]]]:
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


FAMILY = SD3()
