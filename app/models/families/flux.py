"""Flux.1: MMDiT + single-stream blocks, CLIP-L pooled + T5, 2x2 packed 16-channel latents."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, convert_lora_with


class Flux(Family):
    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    latent_channels = 16
    pack = 2
    text_slots = ("clip_l", "t5")
    pipeline_text_slots = {"clip_l": "text_encoder", "t5": "text_encoder_2"}
    default_scheduler = "dynamic"
    default_cfg = 1.0
    distilled_guidance = 3.5
    controlnet_class = "FluxControlNetModel"
    detect_priority = 40  # its diffusers names include sd3's (context_embedder, pos_embed)

    def matches_state_dict(self, joined_keys: str) -> bool:
        return any(k in joined_keys for k in ("double_blocks.", "single_transformer_blocks.", "single_blocks."))

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        return sigma.to(handle.dtype)  # the transformer scales by 1000 itself

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, pooled, _ = handle.cond_tensors(cond)
        dtype, device = handle.dtype, handle.device
        b, c, h, w = x_in.shape
        packed = x_in.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if getattr(handle.config, "guidance_embeds", False):
            value = cond.extras.get("guidance") if getattr(cond, "extras", None) else None
            value = self.distilled_guidance if value is None else value
            guidance = torch.full((b,), float(value), device=device, dtype=torch.float32)
        return {"hidden_states": packed.to(dtype), "timestep": timestep, "guidance": guidance,
                "pooled_projections": pooled, "encoder_hidden_states": embeds, "txt_ids": txt_ids,
                "img_ids": handle.cached(("img_ids", h // 2, w // 2), lambda: image_ids(h // 2, w // 2))}

    def unpack_output(self, out: torch.Tensor, x: torch.Tensor, config: Any) -> torch.Tensor:
        b, c, h, w = x.shape
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        kw = {"max_sequence_length": max_length} if max_length else {}
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=encoders.device, **kw)
        return embeds, pooled, None

    def convert_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import diffusers.loaders.lora_pipeline as lp

        return convert_lora_with(lp.FluxLoraLoaderMixin, tensors, return_alphas=True)

    def magcache_ratios(self) -> list[float] | None:
        try:
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
        except Exception:  # older diffusers
            return None
        return [float(v) for v in FLUX_MAG_RATIOS]


def image_ids(h: int, w: int) -> torch.Tensor:
    """Flux position ids of an h x w token grid."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


FAMILY = Flux()
