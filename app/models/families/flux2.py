"""Flux.2 [dev]: an MMDiT + single-stream DiT (shared modulations, no pooled text), text features
from three hidden layers (10, 20, 30) of Mistral-Small-3.1 stacked per token, embedded guidance,
and a 32-channel VAE whose latents are 2x2 patchified (128 channels at 1/16 of the image size)
and normalised by the VAE's batch-norm running statistics. Engine latents are those patchified,
normalised (B, 128, H/16, W/16) tensors (ComfyUI's Flux.2 latents too); each latent pixel is one
token, with 4-D position ids (t, h, w, l). The schedule is the dynamic (exponential) shift with
Black Forest Labs' empirical mu, which depends on the step count as well as the token count.

Reference images (Flux2Pipeline's ``image``; ComfyUI's ReferenceLatent) are the conditioning's
``extras["reference_latents"]`` (a tuple, one per ReferenceLatent): their tokens follow the generated
ones with time coordinate 10, 20, ... and only the generated tokens come back.
Flux.2 [klein] (Qwen3 text, real CFG) is ``flux2_klein.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, call_default, convert_lora_with

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
REFERENCE_SCALE = 10  # Flux2Pipeline._prepare_image_ids: the i-th reference image has t = 10 + 10 i


class Flux2(Family):
    name = "flux2"
    transformer_class = "Flux2Transformer2DModel"
    pipeline_class = "Flux2Pipeline"
    vae_class = "AutoencoderKLFlux2"
    latent_channels = 128  # 32 VAE channels x 2 x 2
    vae_factor = 16  # the VAE's 8 x the 2x2 patchify
    text_slots = ("mistral3",)
    pipeline_text_slots = {"mistral3": "text_encoder"}
    default_scheduler = "dynamic"
    default_steps = 50  # Flux2Pipeline.__call__ defaults
    default_cfg = 1.0  # guidance-distilled: the guidance is embedded
    distilled_guidance = 4.0
    reference_latents = 10  # multi-reference editing (BFL: up to 10 images)
    # the single-stream blocks run on the concatenated text+image sequence (as Chroma's): the
    # residual-reusing methods' whole-stack bookkeeping assumes one shape throughout
    cache_refused = ("fbc", "teacache", "magcache", "easycache", "taylorseer", "cgtaylor", "fora")
    detect_priority = 45  # its original tensor names include Flux.1's double_blocks/single_blocks

    def matches_state_dict(self, joined_keys: str) -> bool:
        # original (BFL), ComfyUI and diffusers checkpoints all name the shared modulations so
        return "single_stream_modulation." in joined_keys or "double_stream_modulation_img." in joined_keys

    def converter_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' Flux.2 converter reads bare BFL names: strip ComfyUI's ``model.diffusion_model.``."""
        out = {}
        for key, value in tensors.items():
            for prefix in COMFY_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            out[key] = value
        return out

    # -- latent layout ---------------------------------------------------------------------------
    def vae_patch(self, vae: Any) -> int:
        return patch_side(vae)

    def normalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, 32, h, w) -> patchified (B, 128, h/2, w/2), minus the batch-norm mean, over its std."""
        mean, std = _bn_stats(vae, z)
        return (patchify(z, patch_side(vae)) - mean) / std

    def denormalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        mean, std = _bn_stats(vae, z)
        return unpatchify(z * std + mean, patch_side(vae))

    # -- schedule --------------------------------------------------------------------------------
    def dynamic_shift_mu(self, image_seq_len: int, steps: int, scheduler_config: dict) -> float:
        return empirical_mu(image_seq_len, steps)

    # -- model call ------------------------------------------------------------------------------
    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        return sigma.to(handle.dtype)  # the pipeline passes t / 1000; the transformer scales by 1000

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, _ = handle.cond_tensors(cond)
        b, c, h, w = x_in.shape
        tokens = x_in.reshape(b, c, h * w).transpose(1, 2)
        # position ids stay float32: text positions run to 511, beyond bf16's exact integers
        img_ids = handle.cached(("flux2_ids", 0, h, w), lambda: position_ids(0, h, w), torch.float32)
        extras = getattr(cond, "extras", None) or {}
        references = self.references(cond)
        if references:
            parts, ids = [tokens], [img_ids]
            for i, ref in enumerate(references):
                ref = ref.to(x_in.device, x_in.dtype)
                rh, rw = ref.shape[-2:]
                parts.append(ref.expand(b, *ref.shape[1:]).reshape(b, c, rh * rw).transpose(1, 2))
                key = (REFERENCE_SCALE * (i + 1), rh, rw)
                ids.append(handle.cached(("flux2_ids", *key), lambda k=key: position_ids(*k), torch.float32))
            tokens, img_ids = torch.cat(parts, dim=1), torch.cat(ids)
        length = embeds.shape[1]
        txt_ids = handle.cached(("flux2_txt_ids", length), lambda: text_ids(length), torch.float32)
        guidance = None
        if getattr(handle.config, "guidance_embeds", False):
            value = extras.get("guidance")
            value = self.distilled_guidance if value is None else value
            guidance = torch.full((b,), float(value), device=handle.device, dtype=torch.float32)
        return {"hidden_states": tokens.to(handle.dtype), "timestep": timestep, "guidance": guidance,
                "encoder_hidden_states": embeds, "txt_ids": txt_ids, "img_ids": img_ids}

    def unpack_output(self, out: torch.Tensor, x: torch.Tensor, config: Any) -> torch.Tensor:
        b, c, h, w = x.shape
        return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w)  # reference tokens dropped

    # -- text ------------------------------------------------------------------------------------
    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        length = max_length or call_default(pipe, "max_sequence_length")
        embeds, _ = pipe.encode_prompt(prompts, device=encoders.device, max_sequence_length=length)
        return embeds, None, None

    # -- patches ---------------------------------------------------------------------------------
    def convert_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ai-toolkit / BFL (``diffusion_model.double_blocks...``) and kohya LoRAs via diffusers' converter."""
        import diffusers.loaders.lora_pipeline as lp

        return convert_lora_with(lp.Flux2LoraLoaderMixin, tensors, return_alphas=False)


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """Black Forest Labs' mu for Flux.2 (diffusers' ``compute_empirical_mu``; ComfyUI's Flux2Scheduler):
    linear in the token count, interpolated between fits for 10 and 200 steps up to 4300 tokens."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + m_200 - 200.0 * a)


def position_ids(t: int, h: int, w: int) -> torch.Tensor:
    """(h*w, 4) ids (t, row, column, 0) of an h x w token grid, row-major as the tokens."""
    ids = torch.zeros(h, w, 4)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 4)


def text_ids(length: int) -> torch.Tensor:
    """(length, 4) ids (0, 0, 0, l) of the text tokens."""
    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length)
    return ids


def patch_side(vae: Any) -> int:
    """The side of the VAE's (square) latent patches: 2 for every Flux.2 VAE."""
    size = getattr(vae.config, "patch_size", 2)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def patchify(z: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*p*p, h/p, w/p), channel-major as Flux2Pipeline._patchify_latents."""
    b, c, h, w = z.shape
    return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: torch.Tensor, p: int = 2) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


def _bn_stats(vae: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE batch norm's running mean and std (sqrt(var + eps)), shaped (1, C, 1, 1)."""
    bn = vae.bn
    eps = float(getattr(vae.config, "batch_norm_eps", bn.eps))
    mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(like.device, like.dtype)
    return mean, std


FAMILY = Flux2()
