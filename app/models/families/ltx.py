"""LTX-Video: a video DiT over 1x1x1 patches of a 32x spatial / 8x temporal, 128-channel VAE; T5 text.

The transformer takes packed tokens (B, F*H*W, C) plus the grid size and RoPE scales that depend
on the frame rate (``extras["frame_rate"]`` of the conditioning, default 25 fps, as the pipeline).
"""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, masked_text


class LTXVideo(Family):
    name = "ltx"
    transformer_class = "LTXVideoTransformer3DModel"
    pipeline_class = "LTXPipeline"
    pipeline_aliases = ("LTXImageToVideoPipeline",)
    vae_class = "AutoencoderKLLTXVideo"
    latent_channels = 128
    vae_factor = 32
    temporal_factor = 8
    video = True
    text_slots = ("t5",)
    guessed_from_text = False  # a lone T5 is PixArt's too: the family comes from the checkpoint
    pipeline_text_slots = {"t5": "text_encoder"}
    default_scheduler = "dynamic"
    default_steps = 50
    default_cfg = 3.0
    default_size = 480
    default_frames = 161
    default_fps = 25.0

    def temporal_patch_size(self, config: Any) -> int:
        return int(getattr(config, "patch_size_t", 1) or 1)

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        from diffusers import LTXPipeline

        embeds, _, mask = handle.cond_tensors(cond)
        p, pt = self.patch_size(handle.config), self.temporal_patch_size(handle.config)
        _, _, f, h, w = x_in.shape
        rate = float((getattr(cond, "extras", None) or {}).get("frame_rate", self.default_fps))
        # contiguous as the pipeline's (which packs once): the packed view of a (B, C, F, H, W) latent
        # is strided, and proj_in would then take a slower batched-matmul path at every step
        packed = LTXPipeline._pack_latents(x_in, p, pt)
        tokens = torch.empty_like(packed, dtype=handle.dtype, memory_format=torch.contiguous_format).copy_(packed)
        return {"hidden_states": tokens, "timestep": timestep,
                "encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                "num_frames": f // pt, "height": h // p, "width": w // p,
                "rope_interpolation_scale": (self.temporal_factor / rate, self.vae_factor, self.vae_factor)}

    def unpack_output(self, out: torch.Tensor, x: torch.Tensor, config: Any) -> torch.Tensor:
        from diffusers import LTXPipeline

        p, pt = self.patch_size(config), self.temporal_patch_size(config)
        _, _, f, h, w = x.shape
        return LTXPipeline._unpack_latents(out, f // pt, h // p, w // p, p, pt)

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        return masked_text(self, encoders, prompts, max_length or 128)

    def normalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        from diffusers import LTXPipeline

        return LTXPipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    def denormalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        from diffusers import LTXPipeline

        return LTXPipeline._denormalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    def decode_kwargs(self, vae: torch.nn.Module, z: torch.Tensor) -> dict:
        if not vae.config.timestep_conditioning:
            return {}
        return {"temb": torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)}  # the pipeline's decode_timestep 0


FAMILY = LTXVideo()
