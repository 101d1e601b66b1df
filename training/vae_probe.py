"""CPU probe of the video VAE's training recipe: a few hundred steps on small crops of the world.

Trains `train_video`'s VAE (its `build_vae` and `vae_loss`, the same step as `fit_vae`) on clips
area-downsampled to --size pixels and cut to --frames frames (cheap enough for a 2-core CPU), either
overfitting --n fixed clips or on fresh clips every step (--fresh), and prints the loss and the PSNR of
posterior-mean reconstructions (train clips, 4 held-out clips) as it goes. --recipe call1 is call 1's
recipe (diffusers' default init, lr 1e-3, diffusers' `.kl()` normalisation), for comparison.
--resume continues a trained VAE (e.g. models/shapes-video) instead; at --size 128 the held-out check
then also scores --eval-n clips with the evaluator's shape rule and reports the PSNR within 2.5 px of
object edges (where a trained VAE's error is), so loss levers (--edge-weight, --decoder-only) can be
compared on CPU in the regime that matters. --corner-weight is train_video's --vae-corner-weight;
--opt-state resumes the trained parameters' AdamW moments from --resume's vae_opt.pt (fresh moments
restart badly); --frames 1 probes frame 0 alone (V3's weakest frame; cheap enough for hundreds of steps).

    OMP_NUM_THREADS=1 python -m training.vae_probe --steps 300 --size 32 --frames 5
    OMP_NUM_THREADS=1 python -m training.vae_probe --steps 300 --size 32 --frames 5 --recipe call1 --lr 1e-3
    python -m training.vae_probe --resume models/shapes-video --size 128 --frames 5 --n 2 --fresh \
        --lr 1e-4 --warmup 20 --steps 150 --every 50 --edge-weight 9
    python -m training.vae_probe --resume models/shapes-video --size 128 --frames 1 --n 8 --fresh --decoder-only \
        --opt-state --lr 5e-5 --warmup 10 --steps 400 --every 100 --edge-weight 9 --corner-weight 30 --eval-n 128
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from training import train_video as tv
from training import video_world as vw
from training.evaluate_video import score_clips
from training.train import HELD_OUT_SEED


def _area(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if size == tv.SIZE else F.interpolate(x.flatten(1, 2), size=size, mode="area").view(*x.shape[:3], size, size)


def clips(n: int, gen, size: int, frames: int, edge_weight: float = 0.0, corner_weight: float = 0.0):
    """(n, 3, frames, size, size) world clips in [-1, 1]; with edge_weight or corner_weight, (clips, their
    edge_weights, batch)."""
    batch, x = tv.render_batch(n, gen, torch.device("cpu"))
    x = _area(x[:, :, :frames], size)
    if not (edge_weight or corner_weight):
        return x
    return x, _area(tv.edge_weights(batch, edge_weight, corner_weight)[:, :, :frames], size), batch


@torch.no_grad()
def shape_check(vae, n: int, frames: int) -> dict:
    """Full-size held-out clips cut to `frames`: the evaluator's shape accuracy (frames 0 and the last),
    frame-0 PSNR (the i2v check) and the PSNR within EDGE_BAND px of object edges, within CORNER_RADIUS px
    of vertices, and elsewhere."""
    batch, x = tv.render_batch(n, torch.Generator().manual_seed(HELD_OUT_SEED), torch.device("cpu"))
    x = x[:, :, :frames]  # cut from 17-frame clips (render_clips(frames=5) would move objects 4x as fast)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 4]).latent_dist.mean).sample for i in range(0, n, 4)])
    u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    gt = vw.render_clips(batch)[:, :frames].permute(0, 1, 3, 4, 2)
    both = (lambda v: v.repeat(1, 2, 1, 1, 1)) if frames == 1 else (lambda v: v)  # the evaluator wants >= 2 frames
    r = score_clips(both(u8).numpy(), vw.captions(batch), gt[:, 0].numpy())
    err = ((u8.float() - gt.float()) ** 2).mean(-1)  # (n, T, H, W)
    ring = tv.edge_weights(batch, 1.0)[:, 0, :frames] > 1
    corner = tv.edge_weights(batch, 0.0, 1.0)[:, 0, :frames] > 1
    db = lambda e: round(10 * math.log10(255 ** 2 / e.mean().item()), 2)  # noqa: E731
    return {"shape": round(r["shape_accuracy"], 3), "i2v_psnr": round(r["i2v_psnr_mean"], 2),
            "edge_psnr": db(err[ring]), "corner_psnr": db(err[corner]), "rest_psnr": db(err[~ring])}


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


def resume_moments(opt, vae, params, saved: dict) -> None:
    """Load train_video's saved AdamW state (indexed over all VAE parameters) for `params`, a subset
    (e.g. the decoder): a probe that starts from fresh moments measures the restart, not the loss."""
    index = {id(p): i for i, p in enumerate(vae.parameters())}
    if saved["n_params"] != len(index):
        raise SystemExit(f"{tv.OPT_FILE}: saved for {saved['n_params']} parameter tensors, this VAE has {len(index)}")
    tv.load_opt_state(opt, {"n_params": len(params), "state": {j: saved["state"][index[id(p)]]
                                                                for j, p in enumerate(params)}})


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m training.vae_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=["real", "tiny"], default="real")
    ap.add_argument("--recipe", choices=["fixed", "call1"], default="fixed")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--logvar-init", type=float, default=-6.0)
    ap.add_argument("--no-calibrate", action="store_true", help="no unit-scale init of the latent")
    ap.add_argument("--resume", default=None, help="a model folder: continue its vae/ (default: a fresh VAE)")
    ap.add_argument("--edge-weight", type=float, default=0.0, help="train_video's --vae-edge-weight")
    ap.add_argument("--corner-weight", type=float, default=0.0, help="train_video's --vae-corner-weight")
    ap.add_argument("--opt-state", action="store_true",
                    help=f"resume the AdamW moments of the trained parameters from --resume's {tv.OPT_FILE}")
    ap.add_argument("--decoder-only", action="store_true", help="train the decoder (and post-quant conv) only")
    ap.add_argument("--eval-n", type=int, default=32, help="held-out clips of the shape check (--size 128)")
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
    if a.resume:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(f"{a.resume}/vae", torch_dtype=torch.float32)
        loss_fn, kl_w = tv.vae_loss, a.kl if a.kl is not None else tv.parser().get_default("vae_kl")
    elif a.recipe == "call1":
        from diffusers import AutoencoderKLWan

        vae, loss_fn, kl_w = AutoencoderKLWan(**config), call1_loss, 1e-4 if a.kl is None else a.kl
    else:
        calibrate = None if a.no_calibrate else clips(a.n, torch.Generator().manual_seed(7), a.size, a.frames)
        vae, loss_fn = tv.build_vae(config, a.logvar_init, calibrate), tv.vae_loss
        kl_w = a.kl if a.kl is not None else tv.parser().get_default("vae_kl")
    params = (list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if a.decoder_only
              else list(vae.parameters()))
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if a.opt_state:
        resume_moments(opt, vae, params, torch.load(f"{a.resume}/{tv.OPT_FILE}", map_location="cpu"))
    gen = torch.Generator().manual_seed(123)
    fixed = clips(a.n, gen, a.size, a.frames)
    held = clips(4, torch.Generator().manual_seed(HELD_OUT_SEED), a.size, a.frames)
    print(f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params; {vars(a)}; kl weight {kl_w}", flush=True)
    if (a.edge_weight or a.corner_weight) and not a.fresh:
        raise SystemExit("--edge-weight/--corner-weight need --fresh (the weights come with each new batch)")
    if a.size == tv.SIZE:
        print(f"step 0 held-out shape check ({a.eval_n} clips): {shape_check(vae, a.eval_n, a.frames)}", flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        for gp in opt.param_groups:
            gp["lr"] = a.lr * min(1.0, step / a.warmup)
        weight = None
        if a.edge_weight or a.corner_weight:
            x, weight, _ = clips(a.n, gen, a.size, a.frames, a.edge_weight, a.corner_weight)
        else:
            x = clips(a.n, gen, a.size, a.frames) if a.fresh else fixed
        loss, kl = loss_fn(vae, x, kl_w, weight) if weight is not None else loss_fn(vae, x, kl_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.every == 0 or step == 1:
            lv = vae.encode(held).latent_dist.logvar.mean().item()
            print(f"step {step} loss {loss.item():.4f} kl {kl.item():.3f} logvar {lv:.2f} psnr train "
                  f"{psnr(vae, fixed if not a.fresh else x):.2f} held-out {psnr(vae, held):.2f} {time.time() - t0:.0f}s",
                  flush=True)
            if a.size == tv.SIZE:
                print(f"step {step} held-out shape check ({a.eval_n} clips): {shape_check(vae, a.eval_n, a.frames)}",
                      flush=True)


if __name__ == "__main__":
    main()
