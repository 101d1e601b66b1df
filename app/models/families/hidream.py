"""HiDream-I1 (Full, Dev, Fast): a 17B sparse-MoE DiT (16 double-stream + 32 single-stream
blocks, 4 routed experts, 2 active), four text encoders, the Flux VAE (16 channels, 8x).

Text, as HiDreamImagePipeline encodes it (128 tokens each by default):
  - Long-CLIP-L and Long-CLIP-G (``CLIPTextModelWithProjection``, 248 positions): their
    projected pooled outputs, concatenated, are the pooled vector (768 + 1280 = 2048);
  - T5-XXL: the last hidden state, one token sequence;
  - Llama-3.1-8B-Instruct: the hidden state after every layer (32 of them); block i of the
    transformer reads layer ``llama_layers[i]``.
A conditioning carries the sequences as one (B, 1 + layers, tokens, width) tensor: index 0 is
T5's, 1.. the Llama layers' (both encoders pad to the same token count). The transformer
patchifies the (B, 16, h, w) latents itself and predicts x0 - noise (= -v) at timestep s * 1000.

The three releases share one architecture and differ in sampling (app.models.families.variants):
Full 50 steps, CFG 5, shift 3 (its pipeline uses flow UniPC; ditgraph samples it with Euler);
Dev (guidance-distilled) 28 steps, no CFG, shift 6; Fast 16 steps, no CFG, shift 3; both
distilled ones with the LCM-style sampler (jump to x0, re-noise to the next sigma).
"""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family, call_default

HIDREAM_PIPELINE = "HiDreamImagePipeline"


class HiDream(Family):
    name = "hidream"
    transformer_class = "HiDreamImageTransformer2DModel"
    pipeline_class = HIDREAM_PIPELINE
    prediction = "flow_reversed"  # the transformer predicts x0 - noise; its timestep stays s * 1000
    latent_channels = 16
    text_slots = ("clip_l", "clip_g", "t5", "llama")
    pipeline_text_slots = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3",
                           "llama": "text_encoder_4"}
    default_shift = 3.0  # HiDream-I1-Full (Dev: 6, from its variant)
    default_steps = 50
    default_cfg = 5.0
    controlnet_class = None  # diffusers has no HiDream ControlNet
    detect_priority = 30

    def matches_state_dict(self, joined_keys: str) -> bool:
        # the original release, ComfyUI's repacks and diffusers all use these module names
        return "double_stream_blocks." in joined_keys and "caption_projection." in joined_keys

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, pooled, _ = handle.cond_tensors(cond)
        t5_width, llama_width = (int(c) for c in handle.config.caption_channels)
        b, _, h, w = x_in.shape
        patch = int(handle.config.patch_size)
        tokens, most = (h // patch) * (w // patch), int(handle.transformer.max_seq)
        if tokens > most:
            f = self.vae_factor
            raise ValueError(f"hidream: a {w * f}x{h * f} image is {tokens} tokens; this model takes at most {most} "
                             f"(max_resolution {tuple(handle.config.max_resolution)} latents: about 1 megapixel)")
        return {"hidden_states": x_in.to(handle.dtype), "timesteps": timestep, "pooled_embeds": pooled,
                "encoder_hidden_states_t5": embeds[:, 0, :, :t5_width],
                "encoder_hidden_states_llama3": embeds[:, 1:, :, :llama_width].transpose(0, 1)}

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        length = max_length or call_default(pipe, "max_sequence_length")
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(prompts, device=encoders.device, do_classifier_free_guidance=False,
                                                        max_sequence_length=length)
        return stack_sequences(t5, llama), pooled, None


def stack_sequences(t5: torch.Tensor, llama: torch.Tensor) -> torch.Tensor:
    """T5's (B, L, D5) and the Llama layers' (layers, B, L, Dl) as one (B, 1 + layers, L, max(D5, Dl))
    tensor (the narrower one zero-padded; the model call slices each back to its width)."""
    if t5.shape[1] != llama.shape[2]:
        raise ValueError(f"hidream: T5 gave {t5.shape[1]} tokens and Llama {llama.shape[2]}; HiDream's tokenizers "
                         "must pad to the same length (use max_length <= 512, T5's limit)")
    width = max(t5.shape[-1], llama.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    return torch.cat([pad(t5)[:, None], pad(llama).transpose(0, 1).to(t5.dtype)], dim=1)


FAMILY = HiDream()
