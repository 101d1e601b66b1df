"""Chroma: a pruned Flux.1-schnell (no CLIP, no guidance embedding; modulations from a small
"distilled guidance" approximator), T5 text with a padding mask, real CFG, Flux's packed latents."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.flux import Flux


class Chroma(Flux):
    name = "chroma"
    transformer_class = "ChromaTransformer2DModel"
    pipeline_class = "ChromaPipeline"
    pipeline_aliases = ("ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
    text_slots = ("t5",)
    guessed_from_text = False  # T5 alone is also PixArt's recipe: the checkpoint decides
    pipeline_text_slots = {"t5": "text_encoder"}
    default_steps = 35  # ChromaPipeline.__call__ defaults
    default_cfg = 5.0
    distilled_guidance = None
    controlnet_class = None  # diffusers has no Chroma ControlNet
    # its single-stream blocks run on the concatenated text+image sequence: the residual-reusing
    # methods' whole-stack bookkeeping assumes one shape throughout (DeltaDiT works)
    cache_refused = ("fbc", "teacache", "magcache", "easycache", "taylorseer", "cgtaylor", "fora")
    detect_priority = 45  # its tensor names include Flux's single/double blocks

    def matches_state_dict(self, joined_keys: str) -> bool:
        # original, ComfyUI and diffusers checkpoints all name the approximator this way
        return "distilled_guidance_layer." in joined_keys

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        kwargs = super().native_kwargs(handle, x_in, timestep, cond)
        del kwargs["pooled_projections"], kwargs["guidance"]
        _, _, mask = handle.cond_tensors(cond)
        if mask is not None:  # as ChromaPipeline._prepare_attention_mask: image tokens always attend
            tokens = kwargs["hidden_states"].shape[1]
            image_tokens = torch.ones(mask.shape[0], tokens, device=mask.device, dtype=torch.bool)
            kwargs["attention_mask"] = torch.cat([mask.to(handle.dtype), image_tokens], dim=1)  # float, as encoded
        return kwargs

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        kw = {"max_sequence_length": max_length} if max_length else {}
        embeds, _, mask, *_ = pipe.encode_prompt(prompts, None, device=encoders.device,
                                                 do_classifier_free_guidance=False, **kw)
        return embeds, None, mask

    def magcache_ratios(self) -> list[float] | None:
        return None  # Flux's published ratios were measured on Flux-dev, not Chroma


FAMILY = Chroma()
