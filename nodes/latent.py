"""Latent nodes: empty latents sized per family, VAE encode/decode, batch ops."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import torch

from app.core.context import current
from app.core.registry import Link, node
from app.core.types import IMAGE, LATENT, MASK, MODEL, VAE, Spec
from app.models.budget import decode_needs_tiles
from app.models.handles import VAEHandle
from app.models.latents import Latent


def _need(value, what: str, hint: str):
    if value is None:
        raise ValueError(f"no {what} connected: {hint}")
    return value


@node(category="latent", outputs={"latent": LATENT})
def EmptyLatent(
    model: Link(MODEL, "The model the latent is for (gives the channels and the VAE factor).", optional=True) = None,
    vae: Link(VAE, "Alternatively the VAE (gives channels and factor).", optional=True) = None,
    width: Annotated[int, Spec(min=16, max=16384, step=16, snap=True)] = 1024,
    height: Annotated[int, Spec(min=16, max=16384, step=16, snap=True)] = 1024,
    batch_size: Annotated[int, Spec(min=1, max=256)] = 1,
) -> Latent:
    """A blank (zero) latent for text-to-image, sized for the model's latent space."""
    if model is None and vae is None:
        raise ValueError("EmptyLatent needs a model or a VAE to know the latent size")
    if model is not None and model.info.video:  # one frame of a video model (text-to-image)
        return Latent(torch.zeros(_video_shape(model, width, height, 1, batch_size)))
    if vae is not None:
        channels, factor = vae.latent_channels, vae.factor
    else:
        channels, factor = model.latent_channels, model.info.vae_factor
    if model is not None:
        channels = model.latent_channels
    multiple = factor * (model.patch_size if model is not None else 1)
    if width % multiple or height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple} for this model (got {width}x{height})")
    samples = torch.zeros(batch_size, channels, height // factor, width // factor)
    return Latent(samples[:, :, None] if vae is not None and vae.is_video else samples)  # video VAE: one frame


def _video_shape(model, width: int, height: int, frames: int, batch_size: int) -> tuple[int, ...]:
    problem = model.info.size_problem(model.config, width, height, frames)
    if problem:
        raise ValueError(problem)
    return model.info.latent_shape(model.config, batch_size, width, height, frames)


@node(category="latent", outputs={"latent": LATENT})
def EmptyVideoLatent(
    model: MODEL,
    width: Annotated[int, Spec(min=16, max=8192, step=16, snap=True)] = 832,
    height: Annotated[int, Spec(min=16, max=8192, step=16, snap=True)] = 480,
    frames: Annotated[int, Spec(min=1, max=1025, step=4, snap=True,
                                tooltip="Pixel frames: the VAE's temporal factor times n, plus 1 (Wan 4n+1, LTX 8n+1).")] = 81,
    batch_size: Annotated[int, Spec(min=1, max=64)] = 1,
) -> Latent:
    """A blank video latent (B, C, f, h, w) for text-to-video, sized by the model family's VAE factors."""
    if not model.info.video:
        raise ValueError(f"EmptyVideoLatent needs a video model; {model.family} makes images (use EmptyLatent)")
    return Latent(torch.zeros(_video_shape(model, width, height, frames, batch_size)))


@node(category="latent", outputs={"latent": LATENT})
def VAEEncode(vae: VAE, image: IMAGE) -> Latent:
    """Encode an image into the model's normalised latent space (posterior mean)."""
    _need(vae, "VAE", "connect a VAELoader or a checkpoint with a VAE")
    b, h, w, _ = image.shape
    f = vae.factor
    if h % f or w % f:
        image = image[:, : h - h % f, : w - w % f]
    return Latent(vae.encode(image))


def _tiled_needed(latent: torch.Tensor, vae: VAEHandle, mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    if any(p.get("tiled") for p in getattr(vae, "memory", ())):  # the VRAM plan chose tiles at load time
        return hasattr(vae.vae, "tiled_decode")
    h, w = latent.shape[-2:]
    too_big = h * w * vae.factor**2 > 2048 * 2048 or decode_needs_tiles(h * vae.factor, w * vae.factor, vae.device,
                                                                         current().memory)
    return too_big and hasattr(vae.vae, "tiled_decode")


@node(category="latent", outputs={"image": IMAGE})
def VAEDecode(
    vae: VAE,
    latent: LATENT,
    tiled: Annotated[str, Spec(choices=["auto", "on", "off"], tooltip="Decode in tiles (less memory); auto: above 4 megapixels.")] = "auto",
) -> torch.Tensor:
    """Decode a latent into an image (B, H, W, 3) in [0, 1]; a video latent gives all its frames
    (clip after clip) as the image batch."""
    _need(vae, "VAE", "connect a VAELoader or a checkpoint with a VAE")
    samples = latent.samples
    if samples.shape[1] != vae.latent_channels:
        raise ValueError(f"latent has {samples.shape[1]} channels but the VAE expects {vae.latent_channels}: "
                         "are the model and the VAE from the same family?")
    images = vae.decode(samples, tiled=_tiled_needed(samples, vae, tiled))
    return images.flatten(0, 1) if images.dim() == 5 else images


@node(category="latent", outputs={"latent": LATENT})
def SetLatentNoiseMask(latent: LATENT, mask: MASK) -> Latent:
    """Restrict sampling to the masked area (1 = regenerate); the rest keeps the input latent."""
    return replace(latent, noise_mask=mask.float())


@node(category="latent/batch", outputs={"latent": LATENT})
def LatentBatch(first: LATENT, second: LATENT) -> Latent:
    """Concatenate two latent batches."""
    if first.samples.shape[1:] != second.samples.shape[1:]:
        raise ValueError(f"latent shapes differ: {tuple(first.samples.shape[1:])} vs {tuple(second.samples.shape[1:])}")
    index = None
    if first.batch_index or second.batch_index:
        a = first.batch_index or list(range(len(first.samples)))
        b = second.batch_index or list(range(len(second.samples)))
        index = a + [i + max(a) + 1 for i in b]
    mask = None
    if first.noise_mask is not None or second.noise_mask is not None:
        def m(lat: Latent) -> torch.Tensor:
            if lat.noise_mask is not None:
                return lat.noise_mask.expand(len(lat.samples), *lat.noise_mask.shape[-2:])
            return torch.ones(len(lat.samples), *lat.samples.shape[-2:])
        ma, mb = m(first), m(second)
        if ma.shape[-2:] != mb.shape[-2:]:
            raise ValueError("noise masks of different sizes cannot be batched")
        mask = torch.cat([ma, mb])
    return Latent(torch.cat([first.samples, second.samples]), mask, index)


@node(category="latent/batch", outputs={"latent": LATENT})
def LatentFromBatch(
    latent: LATENT,
    index: Annotated[int, Spec(min=0, max=4095)] = 0,
    length: Annotated[int, Spec(min=1, max=4096)] = 1,
) -> Latent:
    """Pick items [index, index+length) of a batch; they keep their noise (batch_index)."""
    n = len(latent.samples)
    if index >= n:
        raise ValueError(f"index {index} is outside the batch of {n}")
    end = min(n, index + length)
    base = latent.batch_index or list(range(n))
    mask = latent.noise_mask
    if mask is not None and mask.dim() == 3 and mask.shape[0] == n:
        mask = mask[index:end]
    return Latent(latent.samples[index:end].clone(), mask, base[index:end])


@node(category="latent/batch", outputs={"latent": LATENT})
def RepeatLatentBatch(latent: LATENT, amount: Annotated[int, Spec(min=1, max=256)] = 1) -> Latent:
    """Repeat a latent batch ``amount`` times (each copy gets its own noise)."""
    samples = latent.samples.repeat(amount, 1, 1, 1)
    mask = latent.noise_mask
    if mask is not None and mask.dim() == 3 and mask.shape[0] == len(latent.samples):
        mask = mask.repeat(amount, 1, 1)
    return Latent(samples, mask, None)


@node(category="latent", outputs={"latent": LATENT})
def UpscaleLatent(
    latent: LATENT,
    scale: Annotated[float, Spec(min=0.25, max=8.0, step=0.05)] = 1.5,
    mode: Annotated[str, Spec(choices=["nearest-exact", "bilinear", "bicubic"])] = "bilinear",
) -> Latent:
    """Resize a latent (for a second, partially-denoised sampling pass)."""
    h, w = latent.samples.shape[-2:]
    size = (max(2, round(h * scale / 2) * 2), max(2, round(w * scale / 2) * 2))
    samples = torch.nn.functional.interpolate(latent.samples, size=size, mode=mode)
    return Latent(samples, None, latent.batch_index)
