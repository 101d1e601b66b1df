"""The VAE value: a VAE with its latent normalisation, and the latent->RGB preview fit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.models import families
from app.models.families import Family
from app.models.residency import Resident


@dataclass(eq=False)
class VAEHandle(Resident):
    """A VAE with its latent normalisation, which comes from the family owning the VAE class
    (SD3/Flux: z = (mean - shift) * scale; Wan/LTX: per-channel mean and std). Image VAEs work
    on (B, C, h, w) latents, video VAEs on (B, C, f, h, w)."""

    vae: torch.nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    source: str = ""
    residency: str = "resident"

    def _modules(self) -> list[torch.nn.Module]:
        return [self.vae]

    @property
    def family(self) -> Family:
        """The family whose conventions this VAE's latents follow (by its class)."""
        return families.for_vae(type(self.vae).__name__)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", 0.0) or 0.0)

    @property
    def latent_channels(self) -> int:
        """Channels of the normalised latents (Flux.2: the VAE's 32 patchified to 128)."""
        c = self.vae.config
        return int(getattr(c, "latent_channels", None) or c.z_dim) * self.family.vae_patch(self.vae) ** 2  # Wan: z_dim

    @property
    def factor(self) -> int:
        """Spatial downsampling of the normalised latents."""
        ratio = getattr(self.vae, "spatial_compression_ratio", None)  # video VAEs, DC-AE
        if ratio:
            return int(ratio)
        c = self.vae.config
        return 2 ** (len(c.block_out_channels) - 1) * self.family.vae_patch(self.vae)

    @property
    def temporal_factor(self) -> int:
        """Temporal downsampling (1 for image VAEs)."""
        return int(getattr(self.vae, "temporal_compression_ratio", None) or getattr(self.vae.config, "scale_factor_temporal", None) or 1)

    @property
    def is_video(self) -> bool:
        return self.family.video

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> normalised latents (B, C, h, w) float32 (posterior mean);
        a video VAE encodes each image as a one-frame video: (B, C, 1, h, w)."""
        return self.encode_video(images[:, None]) if self.is_video else self._encode(images.permute(0, 3, 1, 2))

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, F, H, W, 3) in [0, 1] -> normalised latents (B, C, f, h, w) float32."""
        return self._encode(frames.permute(0, 4, 1, 2, 3))

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.ensure_device()
        x = pixels.to(self.device, self.dtype) * 2 - 1
        try:
            out = self.vae.encode(x)
            latent = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
            return self.family.normalise_latents(self.vae, latent.float()).cpu()
        finally:
            self.release()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Normalised latents -> (B, H, W, 3) float in [0, 1] on CPU; video latents (B, C, f, h, w)
        -> (B, F, H, W, 3)."""
        self.ensure_device()
        z = self.family.denormalise_latents(self.vae, latents.to(self.device, torch.float32)).to(self.dtype)
        kwargs = self.family.decode_kwargs(self.vae, z)
        try:
            if tiled and hasattr(self.vae, "tiled_decode"):
                pixels = self.vae.tiled_decode(z, return_dict=False, **kwargs)[0]
            else:
                pixels = self.vae.decode(z, return_dict=False, **kwargs)[0]
            channels_last = (0, 2, 3, 4, 1) if pixels.dim() == 5 else (0, 2, 3, 1)
            return ((pixels.float().clamp(-1, 1) + 1) / 2).permute(*channels_last).cpu()
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
