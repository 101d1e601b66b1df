"""Flux.1: MMDiT + single-stream blocks, CLIP-L pooled + T5, 2x2 packed 16-channel latents.

Flux.1 Kontext (FluxKontextPipeline) is the same transformer given the input image's latents as
extra tokens (position ids with first coordinate 1); a conditioning carries them in
``extras["reference_latents"]`` (the ReferenceLatent node; Kontext takes one) and only the
generated tokens come back.
"""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, convert_lora_with, references_of


class Flux(Family):
    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    pipeline_aliases = ("FluxKontextPipeline",)
    latent_channels = 16
    pack = 2
    text_slots = ("clip_l", "t5")
    pipeline_text_slots = {"clip_l": "text_encoder", "t5": "text_encoder_2"}
    default_scheduler = "dynamic"
    default_cfg = 1.0
    distilled_guidance = 3.5
    controlnet_class = "FluxControlNetModel"
    reference_latents = True
    detect_priority = 40  # its diffusers names include sd3's (context_embedder, pos_embed)

    def matches_state_dict(self, joined_keys: str) -> bool:
        return any(k in joined_keys for k in ("double_blocks.", "single_transformer_blocks.", "single_blocks."))

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        return sigma.to(handle.dtype)  # the transformer scales by 1000 itself

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, pooled, _ = handle.cond_tensors(cond)
        dtype, device = handle.dtype, handle.device
        b, c, h, w = x_in.shape
        packed = pack_latents(x_in)
        img_ids = handle.cached(("img_ids", h // 2, w // 2), lambda: image_ids(h // 2, w // 2))
        references = references_of(cond)
        if len(references) > 1:
            raise ValueError(f"Flux.1 Kontext takes one reference image; this conditioning has {len(references)} "
                             "(use one ReferenceLatent)")
        if references:  # Kontext: the input image's tokens follow the generated ones
            reference = references[0].to(device, x_in.dtype)
            rh, rw = reference.shape[-2] // 2, reference.shape[-1] // 2
            packed = torch.cat([packed, pack_latents(reference.expand(b, *reference.shape[1:]))], dim=1)
            img_ids = torch.cat([img_ids, handle.cached(("ref_ids", rh, rw), lambda: image_ids(rh, rw, index=1))])
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if getattr(handle.config, "guidance_embeds", False):
            value = cond.extras.get("guidance") if getattr(cond, "extras", None) else None
            value = self.distilled_guidance if value is None else value
            guidance = torch.full((b,), float(value), device=device, dtype=torch.float32)
        return {"hidden_states": packed.to(dtype), "timestep": timestep, "guidance": guidance,
                "pooled_projections": pooled, "encoder_hidden_states": embeds, "txt_ids": txt_ids,
                "img_ids": img_ids}

    def unpack_output(self, out: torch.Tensor, x: torch.Tensor, config: Any) -> torch.Tensor:
        b, c, h, w = x.shape
        out = out[:, : (h // 2) * (w // 2)]  # Kontext: drop the reference image's tokens
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

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


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C * 4) tokens of 2x2 patches."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, index: int = 0) -> torch.Tensor:
    """Flux position ids of an h x w token grid (``index``: Kontext's image number)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


FAMILY = Flux()
