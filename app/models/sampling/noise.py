"""Seeded noise, generated on CPU so every device draws the same numbers."""

from __future__ import annotations

import torch


def make_noise(shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """Seeded Gaussian noise generated on CPU (identical on every device). With ``batch_index``,
    item k gets the noise it would have had at position batch_index[k] of a larger batch."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed) % (2**64))
    if batch_index:
        count = max(batch_index) + 1
        full = torch.randn((count, *shape[1:]), generator=generator, dtype=torch.float32)
        return full[list(batch_index)]
    return torch.randn(shape, generator=generator, dtype=torch.float32)
