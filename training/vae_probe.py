"""CPU probe of the video VAE's training recipe: a few hundred steps on small crops of the world.

Trains `train_video`'s VAE (its `build_vae` and `vae_loss`, the same step as `fit_vae`) on clips
area-downsampled to --size pixels and cut to --frames frames (cheap enough for a 2-core CPU), either
overfitting --n fixed clips or on fresh clips every step (--fresh), and prints the loss and the PSNR of
posterior-mean reconstructions (train clips, 4 held-out clips) as it goes. --recipe call1 is call 1's
recipe (diffusers' default init, lr 1e-3, diffusers' `.kl()` normalisation), for comparison.

    OMP_NUM_THREADS=1 python -m training.vae_probe --steps 300 --size 32 --frames 5
    OMP_NUM_THREADS=1 python -m training.vae_probe --steps 300 --size 32 --frames 5 --recipe call1 --lr 1e-3
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from training import train_video as tv
from training.train import HELD_OUT_SEED


def clips(n: int, gen, size: int, frames: int) -> torch.Tensor:
    """(n, 3, frames, size, size) world clips in [-1, 1]."""
    x = tv.render_batch(n, gen, torch.device("cpu"))[1][:, :, :frames]
    if size != tv.SIZE:
        x = F.interpolate(x.flatten(1, 2), size=size, mode="area").view(*x.shape[:3], size, size)
    return x


@torch.no_grad()
def psnr(vae, x: torch.Tensor) -> float:
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return 10 * math.log10(4 / F.mse_loss(rec, x).item())  # [-1, 1]: peak-to-peak 2


def call1_loss(vae, x, kl_weight):
    """Call 1's loss: diffusers' `.kl()` (sums dims 1-3 only) over the latent numel."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample.float()
    kl = post.kl().mean() / post.mean[0].numel()
    return (rec - x).abs().mean() + F.mse_loss(rec, x) + kl_weight * kl, kl


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m training.vae_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=["real", "tiny"], default="real")
    ap.add_argument("--recipe", choices=["fixed", "call1"], default="fixed")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--logvar-init", type=float, default=-6.0)
    ap.add_argument("--no-calibrate", action="store_true", help="no unit-scale init of the latent")
    ap.add_argument("--kl", type=float, default=None, help="KL weight (default: train_video's, or 1e-4 for call1)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--n", type=int, default=4, help="clips per step")
    ap.add_argument("--fresh", action="store_true", help="new clips every step (else overfit n fixed clips)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    config = tv.TINY_VAE if a.config == "tiny" else tv.VAE_CONFIG
    if a.recipe == "call1":
        from diffusers import AutoencoderKLWan

        vae, loss_fn, kl_w = AutoencoderKLWan(**config), call1_loss, 1e-4 if a.kl is None else a.kl
    else:
        calibrate = None if a.no_calibrate else clips(a.n, torch.Generator().manual_seed(7), a.size, a.frames)
        vae, loss_fn = tv.build_vae(config, a.logvar_init, calibrate), tv.vae_loss
        kl_w = a.kl if a.kl is not None else tv.parser().get_default("vae_kl")
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(123)
    fixed = clips(a.n, gen, a.size, a.frames)
    held = clips(4, torch.Generator().manual_seed(HELD_OUT_SEED), a.size, a.frames)
    print(f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params; {vars(a)}; kl weight {kl_w}", flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        for gp in opt.param_groups:
            gp["lr"] = a.lr * min(1.0, step / a.warmup)
        x = clips(a.n, gen, a.size, a.frames) if a.fresh else fixed
        loss, kl = loss_fn(vae, x, kl_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % a.every == 0 or step == 1:
            lv = vae.encode(held).latent_dist.logvar.mean().item()
            print(f"step {step} loss {loss.item():.4f} kl {kl.item():.3f} logvar {lv:.2f} psnr train "
                  f"{psnr(vae, fixed if not a.fresh else x):.2f} held-out {psnr(vae, held):.2f} {time.time() - t0:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
