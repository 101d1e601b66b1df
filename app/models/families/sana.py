"""Sana: linear-attention DiT, Gemma text with a "complex human instruction", DC-AE (32x, 32 ch)."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, call_default, masked_text


class Sana(Family):
    name = "sana"
    transformer_class = "SanaTransformer2DModel"
    pipeline_class = "SanaPipeline"
    vae_class = "AutoencoderDC"
    latent_channels = 32
    vae_factor = 32
    text_slots = ("gemma",)
    pipeline_text_slots = {"gemma": "text_encoder"}
    pipeline_aliases = ("SanaSprintPipeline",)
    negative_differs = True  # negatives skip the instruction prefix
    sprint_guidance = 4.5  # SanaSprintPipeline's default embedded guidance (times guidance_embeds_scale)
    default_steps = 20
    controlnet_class = "SanaControlNetModel"
    detect_priority = 5  # its keys also match PixArt's (caption_projection, adaln_single)

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "caption_projection." in joined_keys and "adaln_single." in joined_keys and (
            "conv_inverted" in joined_keys or "glumb" in joined_keys.lower())

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        if getattr(handle.config, "guidance_embeds", False):  # Sana-Sprint (sCM): its pipeline passes s itself
            return sigma
        return sigma * 1000 * float(getattr(handle.config, "timestep_scale", 1.0) or 1.0)

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, mask = handle.cond_tensors(cond)
        kwargs = {"hidden_states": x_in.to(handle.dtype), "encoder_hidden_states": embeds,
                  "encoder_attention_mask": mask, "timestep": timestep}
        if getattr(handle.config, "guidance_embeds", False):  # Sana-Sprint: embedded guidance, as its pipeline
            value = cond.extras.get("guidance") if getattr(cond, "extras", None) else None
            value = self.sprint_guidance if value is None else float(value)
            scale = float(handle.config.guidance_embeds_scale)
            kwargs["guidance"] = torch.full((x_in.shape[0],), value, device=handle.device).to(handle.dtype) * scale
        return kwargs

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        # the pipeline's __call__ prefixes its "complex human instruction"
        pipe = self.text_pipeline(encoders)
        instruction = call_default(pipe, "complex_human_instruction")
        return masked_text(self, encoders, prompts, max_length, complex_human_instruction=instruction)

    def encode_negative(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        embeds, mask = pipe._get_gemma_prompt_embeds(prompts, device=encoders.device, dtype=encoders.dtype,
                                                     max_sequence_length=max_length or 300, complex_human_instruction=False)
        return embeds, None, mask


FAMILY = Sana()
