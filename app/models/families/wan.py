"""Wan 2.1 / 2.2 video DiT: UMT5 text, 3-D causal VAE (8x spatial, 4x temporal, 16 channels).

Wan 2.2's A14B models are two experts: ``transformer`` for high noise and ``transformer_2`` below
``boundary_ratio`` (of the 1000 training timesteps), as in diffusers' WanPipeline. Image-to-video
models take the first frame's latents (plus a frame mask) as 20 extra input channels, carried by the
conditioning's ``extras["concat_latent"]`` (see the ImageToVideo node). Families with
``expand_timesteps`` (Wan 2.2 TI2V's mechanism, diffusers' ``expand_timesteps=True``) instead hold
the image's clean latent as the first latent frame (``extras["first_latent"]``): the transformer
sees it with timestep 0 on its tokens, and its velocity points at it, so every sampler ends there.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from app.models.families.base import Family, call_default, channel_view


class Wan(Family):
    name = "wan"
    transformer_class = "WanTransformer3DModel"
    pipeline_class = "WanPipeline"
    pipeline_aliases = ("WanImageToVideoPipeline",)
    vae_class = "AutoencoderKLWan"
    latent_channels = 16
    vae_factor = 8
    temporal_factor = 4
    video = True
    text_slots = ("umt5",)
    pipeline_text_slots = {"umt5": "text_encoder"}
    default_shift = 3.0  # 480p (5.0 for 720p)
    default_steps = 50
    default_cfg = 5.0
    default_size = 480
    default_frames = 81
    default_fps = 16.0
    batch_cfg = False  # the pipeline evaluates cond and uncond as two calls
    expand_timesteps: ClassVar[bool] = False  # image-to-video = a clean first latent frame (Wan 2.2 TI2V)

    def model_latent_channels(self, config: Any) -> int:
        return int(config.out_channels)  # image-to-video inputs carry 20 extra condition channels

    def patch_size(self, config: Any) -> int:
        return int(config.patch_size[1])

    def temporal_patch_size(self, config: Any) -> int:
        return int(config.patch_size[0])

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, _ = handle.cond_tensors(cond)  # zero-padded to max_sequence_length: no mask
        extras = getattr(cond, "extras", None) or {}
        if extras.get("concat_latent") is not None:
            concat = extras["concat_latent"].to(x_in.device, x_in.dtype)
            x_in = torch.cat([x_in, concat.expand(x_in.shape[0], *concat.shape[1:])], dim=1)
        if extras.get("first_latent") is not None:
            x_in, timestep = self._given_first_frame(handle.config, x_in, timestep, extras["first_latent"])
        kwargs = {"hidden_states": x_in.to(handle.dtype), "timestep": timestep, "encoder_hidden_states": embeds}
        if getattr(handle.config, "image_dim", None) is not None:  # Wan 2.1 I2V: CLIP image tokens
            if extras.get("image_embeds") is None:
                raise ValueError("this Wan image-to-video model (2.1 I2V) also needs CLIP image embeddings, which "
                                 "ditgraph does not compute yet; use a Wan 2.2 I2V model")
            kwargs["encoder_hidden_states_image"] = extras["image_embeds"].to(handle.device, handle.dtype)
        return kwargs

    def _given_first_frame(self, config: Any, x_in: torch.Tensor, timestep: torch.Tensor,
                           first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input with the given clean first latent frame, and per-token timesteps (B, tokens)
        that are 0 on that frame's tokens (WanImageToVideoPipeline with ``expand_timesteps``)."""
        first = _per_item(first, x_in).to(x_in.device, x_in.dtype)
        x_in = torch.cat([first, x_in[:, :, 1:]], dim=2)
        p, pt = self.patch_size(config), self.temporal_patch_size(config)
        f, h, w = x_in.shape[2] // pt, x_in.shape[3] // p, x_in.shape[4] // p
        t = timestep.reshape(-1, 1, 1).expand(x_in.shape[0], f, h * w).clone()
        t[:, 0] = 0
        return x_in, t.flatten(1)

    def constrain_velocity(self, v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        first = (getattr(cond, "extras", None) or {}).get("first_latent")
        if first is None:
            return v
        # x0 = x - s v is the given latent on the held frame: v = (x - first) / s there
        s = sigma.reshape(-1, 1, 1, 1, 1).clamp(min=1e-12)
        held = (x[:, :, :1] - _per_item(first, x).to(x.device, x.dtype)) / s
        return torch.cat([held.to(v.dtype), v[:, :, 1:]], dim=2)

    def pick_transformer(self, handle: Any, sigma_host: torch.Tensor) -> torch.nn.Module:
        boundary = handle.boundary_ratio
        if handle.transformer_2 is None or boundary is None:
            return handle.transformer
        train_steps = int(handle.scheduler_config.get("num_train_timesteps", 1000))
        high_noise = float(sigma_host[0]) * train_steps >= boundary * train_steps
        return handle.transformer if high_noise else handle.transformer_2

    def image_to_video_condition(self, vae: Any, image: torch.Tensor, frames: int) -> dict:
        if self.expand_timesteps:  # the causal VAE encodes frame 0 alone: the image's own latent
            return {"first_latent": vae.encode_video(image[:, None])}
        # as WanImageToVideoPipeline.prepare_latents: the first frame, then grey frames (0 in [-1, 1])
        batch, height, width, _ = image.shape
        video = torch.cat([image[:, None], image.new_full((batch, frames - 1, height, width, 3), 0.5)], dim=1)
        latent = vae.encode_video(video)
        t, h, w = self.temporal_factor, latent.shape[-2], latent.shape[-1]
        mask = torch.zeros(batch, 1, frames, h, w)
        mask[:, :, 0] = 1  # the given frame, repeated to fill the first latent frame's t slots
        mask = torch.cat([mask[:, :, :1].repeat_interleave(t, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch, -1, t, h, w).transpose(1, 2)
        return {"concat_latent": torch.cat([mask, latent], dim=1)}

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        length = max_length or call_default(pipe, "max_sequence_length")  # what __call__ passes (512)
        embeds, _ = pipe.encode_prompt(prompts, None, do_classifier_free_guidance=False, max_sequence_length=length,
                                       device=encoders.device)
        return embeds, None, None

    def normalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return (z - channel_view(vae.config.latents_mean, z)) / channel_view(vae.config.latents_std, z)

    def denormalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return z * channel_view(vae.config.latents_std, z) + channel_view(vae.config.latents_mean, z)


def _per_item(latent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A conditioning latent (one per prompt) repeated to the batch of ``like`` (CFG batches, batch_size)."""
    if like.shape[0] % latent.shape[0]:
        raise ValueError(f"the image-to-video latent has batch {latent.shape[0]}, the video {like.shape[0]}")
    return latent.repeat(like.shape[0] // latent.shape[0], *[1] * (latent.dim() - 1))


FAMILY = Wan()
