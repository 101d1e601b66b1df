"""Lumina 2: Gemma text with a system prompt, reversed flow time, CFG renormalisation."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, convert_lora_with, masked_text


class Lumina2(Family):
    name = "lumina2"
    transformer_class = "Lumina2Transformer2DModel"
    pipeline_class = "Lumina2Pipeline"
    pipeline_aliases = ("Lumina2Text2ImgPipeline",)
    prediction = "flow_reversed"
    latent_channels = 16
    text_slots = ("gemma",)
    pipeline_text_slots = {"gemma": "text_encoder"}
    negative_differs = True  # negatives skip the system prompt
    default_shift = 6.0
    default_steps = 30
    default_cfg = 4.0
    batch_cfg = False
    cfg_renorm = True
    detect_priority = 10

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "cap_embedder." in joined_keys or "noise_refiner." in joined_keys

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        return 1 - sigma

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, mask = handle.cond_tensors(cond)
        return {"hidden_states": x_in.to(handle.dtype), "timestep": timestep, "encoder_hidden_states": embeds,
                "encoder_attention_mask": mask}

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        return masked_text(self, encoders, prompts, max_length)

    def encode_negative(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        embeds, mask = pipe._get_gemma_prompt_embeds(prompts, device=encoders.device, max_sequence_length=max_length or 256)
        return embeds, None, mask

    def convert_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import diffusers.loaders.lora_pipeline as lp

        return convert_lora_with(lp.Lumina2LoraLoaderMixin, tensors, return_alphas=False)


FAMILY = Lumina2()
