"""Private reference sampler of shapes-dit (monitoring during training only).

Flow-matching convention (the engine's sampler nodes implement exactly this):
    x_t = (1 - s) * x0 + s * noise,  model predicts v = noise - x0,  timestep argument = s * 1000
    sigmas: s_i = 1 - i/steps, shifted s' = shift*s / (1 + (shift-1)*s); Euler x += (s_next - s) * v
    CFG: v = v_u + cfg * (v_c - v_u), unconditional = "" encoded like any prompt.
Latents: z = (vae_mean - shift_factor) * scaling_factor; decode(z / scaling_factor + shift_factor).
"""

from __future__ import annotations

import torch


def sigmas(steps: int, shift: float, device="cpu") -> torch.Tensor:
    s = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def sample_latents(transformer, hidden, pooled, uncond_hidden, uncond_pooled, steps=28, cfg=4.0,
                   shift=3.0, seed=0, noise=None):
    """Euler flow-matching sampling with CFG. hidden: (B, 40, 384); uncond_*: (1, ...) or (B, ...)."""
    device = hidden.device
    dtype = next(transformer.parameters()).dtype
    B = hidden.shape[0]
    cfg_ = transformer.config
    if noise is None:
        g = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn(B, cfg_.in_channels, cfg_.sample_size, cfg_.sample_size, generator=g, device=device)
    x = noise.float()
    uh = uncond_hidden.expand(B, -1, -1)
    up = uncond_pooled.expand(B, -1)
    eh = torch.cat([uh, hidden]).to(dtype)
    ep = torch.cat([up, pooled]).to(dtype)
    sig = sigmas(steps, shift, device)
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        t = (s * 1000).expand(2 * B).to(dtype)
        v = transformer(hidden_states=torch.cat([x, x]).to(dtype), encoder_hidden_states=eh,
                        pooled_projections=ep, timestep=t, return_dict=False)[0].float()
        v_u, v_c = v.chunk(2)
        v = v_u + cfg * (v_c - v_u)
        x = x + (s_next - s) * v
    return x


@torch.no_grad()
def decode(vae, z) -> torch.Tensor:
    """Normalised latents -> (B, 3, 128, 128) uint8."""
    c = vae.config
    lat = z / c.scaling_factor + c.shift_factor
    img = vae.decode(lat.to(next(vae.parameters()).dtype)).sample.float()
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> normalised latents (mean of the posterior)."""
    c = vae.config
    lat = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist.mean.float()
    return (lat - c.shift_factor) * c.scaling_factor
