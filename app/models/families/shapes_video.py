"""shapes-video: the bundled small text/image-to-video model (training/train_video.py).

A Wan-architecture model (``WanTransformer3DModel`` + ``AutoencoderKLWan``, 8 latent channels,
17 frames at 128 px) conditioned on MiniLM text as shapes-dit (no pooled input). Image-to-video
is Wan 2.2 TI2V's mechanism (``expand_timesteps``): the given image's latent is the first latent
frame, held clean at timestep 0 (see :class:`app.models.families.wan.Wan`).
"""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.shapes_dit import encode_minilm
from app.models.families.wan import Wan


class ShapesVideo(Wan):
    name = "shapes-video"
    pipeline_class = None  # no diffusers pipeline encodes MiniLM text: encode_text does it
    pipeline_aliases = ()
    latent_channels = 8
    text_slots = ("minilm",)
    pipeline_text_slots = {"minilm": "text_encoder"}
    guessed_from_text = False  # a lone MiniLM is shapes-dit's: the family comes from the checkpoint
    manifest_text_encoder = True  # ditgraph.json names the MiniLM package or folder
    expand_timesteps = True
    default_steps = 28
    default_cfg = 4.0
    default_shift = 3.0
    default_size = 128
    default_frames = 17
    default_fps = 8.0
    batch_cfg = True  # as training's sampler: uncond and cond in one call
    detect_priority = 30  # a Wan transformer config: asked before wan

    def matches_config(self, config: dict) -> bool:
        # MiniLM-sized text inputs: the bundled model (even before its manifest is written)
        return super().matches_config(config) and config.get("text_dim") == 384

    def matches_pipeline(self, class_name: str) -> bool:
        return False

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        if "minilm" not in encoders.slots:
            raise ValueError(f"shapes-video needs the MiniLM text encoder; got {', '.join(encoders.slots) or 'none'}")
        tokenizer, model = encoders.slots["minilm"]
        hidden, _ = encode_minilm(tokenizer, model, prompts, max_length or int(encoders.options.get("max_length", 40)))
        return hidden, None, None  # ditgraph.json: "pooling": null

    def text_options(self, transformer: torch.nn.Module) -> dict:
        return {}


FAMILY = ShapesVideo()
