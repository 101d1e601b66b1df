"""The LATENT value shared by the sampling, editing and latent nodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class Latent:
    """The LATENT value: ``samples`` (B, C, H, W), or (B, C, F, H, W) for video models, float32 on
    CPU in the model's normalised latent space; ``noise_mask`` (B, H, W) or None, 1 where the sampler may change the latent;
    ``batch_index`` which noise each item takes (so item k of a batch reproduces alone)."""

    samples: torch.Tensor
    noise_mask: torch.Tensor | None = None
    batch_index: list[int] | None = None

    def __getitem__(self, key: str):  # dict-style access for code written against {"samples": ...}
        return getattr(self, key)
