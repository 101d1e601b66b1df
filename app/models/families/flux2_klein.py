"""Flux.2 [klein] (4B / 9B): the Flux.2 transformer without the guidance embedding, text features
from hidden layers 9, 18 and 27 of Qwen3 (4B / 8B) on its chat template, real CFG against the
empty prompt (Flux2KleinPipeline). Latents, VAE, positions, schedule and the text code path
(both pipelines' ``encode_prompt``) are Flux.2's. The step-distilled releases (4 steps, no CFG)
are a variant (families/variants.py)."""

from __future__ import annotations

from app.models.families.flux2 import Flux2


class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    pipeline_aliases = ("Flux2KleinInpaintPipeline",)
    text_slots = ("qwen3",)
    pipeline_text_slots = {"qwen3": "text_encoder"}
    default_cfg = 4.0  # Flux2KleinPipeline.__call__ defaults (50 steps)
    distilled_guidance = None
    detect_priority = 46  # asked before Flux.2 [dev], whose configs and tensors it shares but for guidance

    def matches_config(self, config: dict) -> bool:
        return super().matches_config(config) and not config.get("guidance_embeds", True)

    def matches_state_dict(self, joined_keys: str) -> bool:
        return super().matches_state_dict(joined_keys) and "guidance_in." not in joined_keys \
            and "guidance_embedder." not in joined_keys


FAMILY = Flux2Klein()
