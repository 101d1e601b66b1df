"""Qwen-Image: a 60-layer MMDiT with Qwen2.5-VL (7B) text features, the Wan-style 3-D VAE used
on one frame (latents (B, 16, 1, h, w) with per-channel mean/std), 2x2 packed tokens outside the
transformer, timestep = sigma, true CFG renormalised to the conditional norm per token.

The edit models (QwenImageEditPipeline) also feed the input image through the VL encoder and as
extra image tokens; they are detected here (``pipeline_aliases``) but their image conditioning
is not wired yet, so they run as text-to-image.
"""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, call_default, convert_lora_with
from app.models.families.flux import pack_latents
from app.models.families.wan import Wan


class QwenImage(Family):
    name = "qwen-image"
    transformer_class = "QwenImageTransformer2DModel"
    pipeline_class = "QwenImagePipeline"
    pipeline_aliases = ("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
                        "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")
    vae_class = "AutoencoderKLQwenImage"
    latent_channels = 16
    pack = 2
    video = True  # its VAE is a video VAE: an image is one latent frame (B, C, 1, h, w)
    temporal_factor = 4
    text_slots = ("qwen2vl",)
    pipeline_text_slots = {"qwen2vl": "text_encoder"}
    batch_cfg = False  # cond and uncond prompts have different lengths; the pipeline makes two calls
    cfg_renorm = True
    default_scheduler = "dynamic"
    default_steps = 50  # QwenImagePipeline.__call__ defaults (true_cfg_scale 4)
    default_cfg = 4.0
    default_size = 1024
    controlnet_class = None  # QwenImageControlNetModel exists in diffusers; our ControlNet patch does not drive it yet
    detect_priority = 45  # its tensor names include Flux/SD3's transformer_blocks

    normalise_latents = Wan.normalise_latents  # the same per-channel latents_mean / latents_std convention
    denormalise_latents = Wan.denormalise_latents

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "txt_norm." in joined_keys and "img_mod." in joined_keys  # original release = ComfyUI names

    def model_latent_channels(self, config: Any) -> int:
        return int(config.out_channels or config.in_channels // 4)

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        return sigma.to(handle.dtype)  # the pipeline passes t / 1000

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, mask = handle.cond_tensors(cond)
        b, c, _, h, w = x_in.shape
        guidance = None
        if getattr(handle.config, "guidance_embeds", False):
            guidance = torch.full((b,), float((cond.extras or {}).get("guidance", 1.0)), device=handle.device)
        return {"hidden_states": pack_latents(x_in[:, :, 0]).to(handle.dtype), "timestep": timestep,
                "encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask, "guidance": guidance,
                "img_shapes": [[(1, h // 2, w // 2)]] * b}

    def unpack_output(self, out: torch.Tensor, x: torch.Tensor, config: Any) -> torch.Tensor:
        b, c, f, h, w = x.shape
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, f, h, w)

    def renorm_guided(self, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """QwenImagePipeline: rescale each packed token (channels x 2 x 2) to the conditional norm."""
        def token_norm(v: torch.Tensor) -> torch.Tensor:
            b, c, f, h, w = v.shape
            blocks = v.reshape(b, c, f, h // 2, 2, w // 2, 2)
            norm = torch.linalg.vector_norm(blocks, dim=(1, 4, 6), keepdim=True)
            return norm.expand_as(blocks).reshape(v.shape)

        return guided * (token_norm(cond) / token_norm(guided))

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        length = max_length or call_default(pipe, "max_sequence_length")
        embeds, mask = pipe.encode_prompt(prompts, device=encoders.device, max_sequence_length=length)
        return embeds, None, mask

    def convert_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import diffusers.loaders.lora_pipeline as lp

        return convert_lora_with(lp.QwenImageLoraLoaderMixin, tensors, return_alphas=False)


FAMILY = QwenImage()
