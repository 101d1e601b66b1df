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


class NoiseStream:
    """Successive draws of one seeded CPU generator: draw 0 is :func:`make_noise`'s start noise,
    draw i + 1 the fresh noise of step i (stochastic samplers). Draws are made lazily and kept,
    so any step may ask in any order. This is the order in which the diffusers pipelines draw from
    their ``generator`` (latents, then one draw per scheduler step), so the same seed gives the
    same image."""

    def __init__(self, shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None):
        self.shape, self.batch_index = tuple(shape), batch_index
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed) % (2**64))
        self.draws: list[torch.Tensor] = []

    def __call__(self, index: int) -> torch.Tensor:
        count = max(self.batch_index) + 1 if self.batch_index else self.shape[0]
        while len(self.draws) <= index:
            self.draws.append(torch.randn((count, *self.shape[1:]), generator=self.generator, dtype=torch.float32))
        draw = self.draws[index]
        return draw[list(self.batch_index)] if self.batch_index else draw
