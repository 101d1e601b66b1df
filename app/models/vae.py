"""The VAE value: a VAE with its latent normalisation, and the latent->RGB preview fit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.models.residency import Resident


@dataclass(eq=False)
class VAEHandle(Resident):
    """A VAE with its latent normalisation: z = (mean - shift) * scale (SD3/Flux style;
    shift 0 for PixArt/Sana)."""

    vae: torch.nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    source: str = ""
    residency: str = "resident"

    def _modules(self) -> list[torch.nn.Module]:
        return [self.vae]

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", 0.0) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def factor(self) -> int:
        c = self.vae.config
        if hasattr(c, "encoder_block_out_channels"):  # AutoencoderDC
            return 2 ** (len(c.encoder_block_out_channels) - 1)
        return 2 ** (len(c.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> normalised latents (B, C, h, w) float32 (posterior mean)."""
        self.ensure_device()
        x = images.permute(0, 3, 1, 2).to(self.device, self.dtype) * 2 - 1
        try:
            out = self.vae.encode(x)
            latent = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
            return ((latent.float() - self.shift_factor) * self.scaling_factor).cpu()
        finally:
            self.release()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Normalised latents -> (B, H, W, 3) float in [0, 1] on CPU."""
        self.ensure_device()
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        z = z.to(self.dtype)
        try:
            if tiled and hasattr(self.vae, "tiled_decode"):
                image = self.vae.tiled_decode(z, return_dict=False)[0]
            else:
                image = self.vae.decode(z, return_dict=False)[0]
            return ((image.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()
        finally:
            self.release()


ANCHOR_COLOURS = [(1, 1, 1), (0, 0, 0), (0.5, 0.5, 0.5), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1),
                  (1, 0, 1), (0.9, 0.9, 0.9), (0.2, 0.2, 0.2), (1, 0.5, 0)]


@torch.no_grad()
def fit_preview_projection(vae: VAEHandle, blocks: int = 6, seed: int = 0) -> torch.Tensor:
    """Least-squares affine map from normalised latents to RGB: encode one image of solid-colour
    blocks (anchors such as white, black and the primaries, then random colours) and pair each
    latent pixel inside a block with the block's colour. Approximate (latents also code texture),
    but good enough to see composition and colours while sampling."""
    f = vae.factor
    cell = 4  # latent pixels per block side; the outer ring is dropped (edges mix colours)
    size = cell * f
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(blocks * blocks, 3, generator=g)
    colours[: len(ANCHOR_COLOURS)] = torch.tensor(ANCHOR_COLOURS, dtype=torch.float32)
    colours = colours.reshape(blocks, blocks, 3)
    image = colours.repeat_interleave(size, 0).repeat_interleave(size, 1)[None]
    latent = vae.encode(image)[0]
    c = latent.shape[0]
    inner = latent.reshape(c, blocks, cell, blocks, cell)[:, :, 1:-1, :, 1:-1]
    z = inner.permute(1, 3, 2, 4, 0).reshape(blocks, blocks, -1, c)
    targets = colours[:, :, None, :].expand(blocks, blocks, z.shape[2], 3).reshape(-1, 3)
    design = torch.cat([z.reshape(-1, c), torch.ones(targets.shape[0], 1)], dim=1)
    ridge = 1e-3 * torch.eye(c + 1)
    return torch.linalg.solve(design.T @ design + ridge, design.T @ targets)
