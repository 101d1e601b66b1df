"""AuraFlow: an MMDiT + single-stream DiT with register tokens, Pile-T5 (UMT5 class) text with
masked-out padding, the SDXL VAE (4 channels), timestep = sigma."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, convert_lora_with, masked_text


class AuraFlow(Family):
    name = "auraflow"
    transformer_class = "AuraFlowTransformer2DModel"
    pipeline_class = "AuraFlowPipeline"
    latent_channels = 4
    text_slots = ("umt5",)
    guessed_from_text = False  # the UMT5 class is also Wan's encoder: the checkpoint decides
    pipeline_text_slots = {"umt5": "text_encoder"}
    default_shift = 1.73  # the released scheduler_config
    default_steps = 50  # AuraFlowPipeline.__call__ defaults
    default_cfg = 3.5
    detect_priority = 50  # its diffusers tensor names include Flux's single_transformer_blocks

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "register_tokens" in joined_keys and ("double_layers." in joined_keys
                                                     or "joint_transformer_blocks." in joined_keys)

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        return sigma.to(handle.dtype)  # the pipeline passes t / 1000

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, _ = handle.cond_tensors(cond)  # padding already zeroed by the encoder recipe
        return {"hidden_states": x_in.to(handle.dtype), "encoder_hidden_states": embeds, "timestep": timestep}

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        return masked_text(self, encoders, prompts, max_length)

    def convert_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import diffusers.loaders.lora_pipeline as lp

        return convert_lora_with(lp.AuraFlowLoraLoaderMixin, tensors, return_alphas=False)


FAMILY = AuraFlow()
