"""PixArt-Σ (and -α): a discrete-time epsilon DiT with T5 (masked) text, 4-channel SD VAE."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, masked_text


class PixArt(Family):
    name = "pixart"
    transformer_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"
    pipeline_aliases = ("PixArtAlphaPipeline",)
    prediction = "eps"
    latent_channels = 4
    text_slots = ("t5",)
    pipeline_text_slots = {"t5": "text_encoder"}
    default_scheduler = "discrete"
    default_shift = 1.0
    default_steps = 20

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "caption_projection." in joined_keys and "adaln_single." in joined_keys

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, mask = handle.cond_tensors(cond)
        return {"hidden_states": x_in.to(handle.dtype), "encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                "timestep": timestep, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        return masked_text(self, encoders, prompts, max_length)


FAMILY = PixArt()
