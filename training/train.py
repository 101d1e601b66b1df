"""Train shapes-dit (VAE, then the SD3-style MM-DiT) on on-the-fly renders of the shapes world.

One invocation works for a fixed wall-clock budget (the GPU machine gives 10 minutes a call):
    python -m training.train --out $OUT/shapes-dit --seconds 520 --vae-seconds 150      # call 1
    python -m training.train --out $OUT/shapes-dit --seconds 540 --resume models/shapes-dit  # later
The output folder is a diffusers-style model folder (vae/, transformer/ with fp16 safetensors,
the transformer weights being the EMA), plus train_state.json and eval grids written to --logdir.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from training import sample as sampler
from training import text as textenc
from training import world
from training.evaluate import score_images

T0 = time.time()
HELD_OUT_SEED = 987654321  # never used for training scenes

VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 64, 128, 128], layers_per_block=1, latent_channels=4,
    norm_num_groups=16, sample_size=128, act_fn="silu",
)
DIT_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
    attention_head_dim=32, num_attention_heads=6, joint_attention_dim=384,
    caption_projection_dim=192, pooled_projection_dim=384, pos_embed_max_size=16,
    qk_norm="rms_norm",
)


def log(msg: str, fh=None):
    line = f"[{time.time() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    if fh:
        fh.write(line + "\n")
        fh.flush()


def train_vae(args, dev, fh):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    deadline = time.time() + args.vae_seconds
    step = 0
    while time.time() < deadline:
        frac = 1 - (deadline - time.time()) / args.vae_seconds
        lr = 1e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * (1 - frac))
        for gp in opt.param_groups:
            gp["lr"] = lr
        b = world.sample_scenes(args.vae_batch, gen, dev)
        x = world.render(b, out="float")
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + l2 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            log(f"vae step {step} l1 {l1.item():.4f} l2 {l2.item():.5f} kl {kl.item():.3f} lr {lr:.2e}", fh)
    vae.eval()
    # latent statistics (SD3-style normalisation)
    with torch.no_grad():
        lats = []
        g = torch.Generator(device=dev).manual_seed(args.seed + 2)
        for _ in range(8):
            x = world.render(world.sample_scenes(256, g, dev), out="float")
            lats.append(vae.encode(x).latent_dist.mean.float())
        lats = torch.cat(lats)
        shift = lats.mean().item()
        scale = 1.0 / lats.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    # reconstruction check through the evaluator
    with torch.no_grad():
        b = world.sample_scenes(256, HELD_OUT_SEED, dev)
        x = world.render(b, out="float")
        rec = sampler.decode(vae, sampler.encode(vae, x))
        res = score_images(rec.permute(0, 2, 3, 1).cpu().numpy(), world.captions(b))
        err = (rec.float() - world.render(b).float()).abs().mean().item()
    log(f"vae done: {step} steps, shift {shift:.4f} scale {scale:.4f}, recon MAE {err:.2f}/255, "
        f"recon object acc {res['object_accuracy']:.4f} prompt acc {res['prompt_accuracy']:.4f}", fh)
    return vae, {"vae_steps": step, "vae_recon_mae": err, "vae_recon_object_accuracy": res["object_accuracy"],
                 "vae_recon_prompt_accuracy": res["prompt_accuracy"], "shift_factor": shift, "scaling_factor": scale}


def finetune_decoder(vae, args, dev, fh):
    """Fine-tune the VAE decoder only (encoder frozen: the latent space the DiT learnt stays the
    same) on posterior means, which is what the DiT produces. Keeps the result only if the
    reconstruction object accuracy on held-out scenes does not drop."""
    import copy

    def recon_acc(v):
        with torch.no_grad():
            b = world.sample_scenes(args.recon_n, HELD_OUT_SEED + 1, dev)
            x = world.render(b, out="float")
            rec = sampler.decode(v, sampler.encode(v, x))
            r = score_images(rec.permute(0, 2, 3, 1).cpu().numpy(), world.captions(b))
        return r["object_accuracy"], r["prompt_accuracy"]

    before = recon_acc(vae)
    old = copy.deepcopy(vae.state_dict())
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p_ in params:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.dec_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 5 + int(time.time()) % 1000)
    deadline = time.time() + args.dec_seconds
    step = 0
    while time.time() < deadline:
        frac = 1 - (deadline - time.time()) / args.dec_seconds
        for gp in opt.param_groups:
            gp["lr"] = args.dec_lr * min(1.0, (step + 1) / 100) * (1 - 0.9 * frac)
        b = world.sample_scenes(args.vae_batch, gen, dev)
        x = world.render(b, out="float")
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            with torch.no_grad():
                lat = vae.encode(x).latent_dist.mean
            rec = vae.decode(lat).sample.float()
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 500 == 0:
            log(f"decoder step {step} loss {loss.item():.5f}", fh)
    vae.requires_grad_(False)
    after = recon_acc(vae)
    keep = after[0] >= before[0]
    if not keep:
        vae.load_state_dict(old)
    log(f"decoder fine-tune {step} steps: recon object/prompt acc {before} -> {after}; kept={keep}", fh)
    return {"decoder_finetune_steps": step, "recon_before": before, "recon_after": after, "kept": keep}


def save_model(out, vae, ema, state):
    os.makedirs(out, exist_ok=True)
    vae.to(torch.float16).save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    vae.float()
    ema.to(torch.float16).save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    ema.float()
    with open(os.path.join(out, "train_state.json"), "w") as fh:
        json.dump(state, fh, indent=1)


@torch.no_grad()
def evaluate(ema, vae, tok, te, dev, n, cfgs, shifts, steps=28, save_grid=None):
    b = world.sample_scenes(n, HELD_OUT_SEED, dev)
    caps = world.captions(b)
    h, p = textenc.encode_prompts(tok, te, caps)
    uh, up = textenc.encode_prompts(tok, te, [""])
    results = []
    for cfg in cfgs:
        for shift in shifts:
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                z = sampler.sample_latents(ema, h.float(), p.float(), uh.float(), up.float(), steps=steps,
                                           cfg=cfg, shift=shift, seed=HELD_OUT_SEED)
            imgs = sampler.decode(vae, z).permute(0, 2, 3, 1).cpu().numpy()
            r = score_images(imgs, caps)
            results.append({"cfg": cfg, "shift": shift, "steps": steps, "n": n,
                            "object_accuracy": r["object_accuracy"], "background_accuracy": r["background_accuracy"],
                            "prompt_accuracy": r["prompt_accuracy"]})
            if save_grid and cfg == cfgs[0] and shift == shifts[0]:
                import numpy as np
                from PIL import Image

                k = min(64, n)
                grid = imgs[:k].reshape(8, k // 8, 128, 128, 3).transpose(0, 2, 1, 3, 4).reshape(8 * 128, -1, 3)
                Image.fromarray(np.ascontiguousarray(grid)).save(save_grid)
                with open(save_grid + ".txt", "w") as fh:
                    fh.write("\n".join(caps[:k]) + "\n")
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--logdir", default=None)
    ap.add_argument("--seconds", type=float, default=520, help="total wall budget of this invocation")
    ap.add_argument("--vae-seconds", type=float, default=150)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-kl", type=float, default=1e-4)
    ap.add_argument("--dec-seconds", type=float, default=0, help="decoder-only fine-tune (resume mode)")
    ap.add_argument("--dec-lr", type=float, default=3e-4)
    ap.add_argument("--recon-n", type=int, default=512)
    ap.add_argument("--resume", default=None, help="model folder with vae/ and transformer/ to continue from")
    ap.add_argument("--minilm", default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--decay-frac", type=float, default=0.0, help="linear lr decay to 10% over the last fraction of time")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=float, default=120, help="seconds between quick evals")
    ap.add_argument("--eval-n", type=int, default=256)
    ap.add_argument("--final-cfgs", default="2,3,4.5,6")
    ap.add_argument("--final-shifts", default="1,2,3")
    ap.add_argument("--final-reserve", type=float, default=45)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    logdir = args.logdir or args.out
    os.makedirs(logdir, exist_ok=True)
    fh = open(os.path.join(logdir, "train_log.txt"), "a")
    log(f"device {dev} {torch.cuda.get_device_name() if dev.type == 'cuda' else ''} args {vars(args)}", fh)
    end_time = T0 + args.seconds

    prev = {}
    if args.resume:
        vae = AutoencoderKL.from_pretrained(os.path.join(args.resume, "vae"), torch_dtype=torch.float32).to(dev).eval()
        model = SD3Transformer2DModel.from_pretrained(os.path.join(args.resume, "transformer"),
                                                      torch_dtype=torch.float32).to(dev)
        sp = os.path.join(args.resume, "train_state.json")
        if os.path.exists(sp):
            prev = json.load(open(sp))
        vae_info = {k: prev.get(k) for k in ("vae_steps", "decoder_finetunes", "vae_recon_mae", "vae_recon_object_accuracy",
                                             "vae_recon_prompt_accuracy", "shift_factor", "scaling_factor")}
        log(f"resumed from {args.resume}: {prev.get('dit_steps')} DiT steps so far", fh)
        if args.dec_seconds > 0:
            ft = finetune_decoder(vae, args, dev, fh)
            vae_info["decoder_finetunes"] = list(prev.get("decoder_finetunes", [])) + [ft]
            if ft["kept"]:
                vae_info["vae_recon_object_accuracy"], vae_info["vae_recon_prompt_accuracy"] = ft["recon_after"]
    else:
        vae, vae_info = train_vae(args, dev, fh)
        model = SD3Transformer2DModel(**DIT_CONFIG).to(dev)
    vae.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"DiT params {n_params / 1e6:.3f}M", fh)

    tok, te = textenc.load_text_encoder(args.minilm, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)

    ema = SD3Transformer2DModel.from_config(model.config).to(dev)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())

    decay, no_decay = [], []
    for n_, p_ in model.named_parameters():
        (no_decay if p_.ndim < 2 or "norm" in n_ or "pos_embed" in n_ else decay).append(p_)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), eps=1e-8, fused=dev.type == "cuda")
    fwd = torch.compile(model) if args.compile else model

    uncond_h, uncond_p = textenc.encode_prompts(tok, te, [""])
    gen = torch.Generator(device=dev).manual_seed(args.seed * 1000 + 17 + int(prev.get("dit_steps") or 0))
    step0 = int(prev.get("dit_steps") or 0)
    history = list(prev.get("history", []))
    step = 0
    train_start = time.time()
    train_end = end_time - args.final_reserve
    last_eval = time.time()
    last_save = time.time()
    loss_acc, loss_n = 0.0, 0
    dit_seconds_prev = float(prev.get("dit_seconds") or 0)
    while time.time() < train_end:
        frac = (time.time() - train_start) / max(train_end - train_start, 1)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if args.decay_frac > 0 and frac > 1 - args.decay_frac:
            lr *= 1 - 0.9 * (frac - (1 - args.decay_frac)) / args.decay_frac
        for gp in opt.param_groups:
            gp["lr"] = lr
        with torch.no_grad():
            b = world.sample_scenes(args.batch, gen, dev)
            caps = world.captions(b)
            drop = torch.rand(len(caps), generator=gen, device=dev) < args.cfg_drop
            caps = ["" if d else c for c, d in zip(caps, drop.tolist(), strict=False)]
            h, p = textenc.encode_prompts(tok, te, caps)
            x = world.render(b, out="float")
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                x0 = sampler.encode(vae, x)
            s = torch.sigmoid(torch.randn(args.batch, generator=gen, device=dev))
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
            target = noise - x0
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            pred = fwd(hidden_states=xt, encoder_hidden_states=h.float(), pooled_projections=p.float(),
                       timestep=s * 1000, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step0 + step) / (10 + step0 + step))
            torch._foreach_lerp_(ema_params, model_params, 1 - d)
        step += 1
        loss_acc += loss.item() if step % 25 == 0 else 0.0
        loss_n += 1 if step % 25 == 0 else 0
        if step % 250 == 0:
            el = time.time() - train_start
            log(f"dit step {step0 + step} loss {loss_acc / max(loss_n, 1):.4f} gn {gn.item():.3f} lr {lr:.2e} "
                f"{step / el:.2f} it/s", fh)
            history.append({"step": step0 + step, "loss": loss_acc / max(loss_n, 1)})
            loss_acc, loss_n = 0.0, 0
        if time.time() - last_eval > args.eval_every:
            r = evaluate(ema, vae, tok, te, dev, args.eval_n, [4.0], [3.0])[0]
            log(f"eval @ {step0 + step}: {r}", fh)
            history.append({"step": step0 + step, "eval": r})
            last_eval = time.time()
        if time.time() - last_save > 150:
            state = dict(vae_info, dit_steps=step0 + step, history=history, n_params=n_params, config=DIT_CONFIG,
                         dit_seconds=dit_seconds_prev + time.time() - train_start)
            save_model(args.out, vae, ema, state)
            last_save = time.time()
    dit_seconds = dit_seconds_prev + time.time() - train_start
    log(f"training done: {step} steps this run ({step0 + step} total), {dit_seconds / 60:.1f} DiT minutes total", fh)
    state = dict(vae_info, dit_steps=step0 + step, history=history, n_params=n_params, config=DIT_CONFIG,
                 dit_seconds=dit_seconds, batch=args.batch)
    save_model(args.out, vae, ema, state)
    cfgs = [float(c) for c in args.final_cfgs.split(",")]
    shifts = [float(c) for c in args.final_shifts.split(",")]
    final = evaluate(ema, vae, tok, te, dev, args.eval_n, cfgs, shifts,
                     save_grid=os.path.join(logdir, "samples.png"))
    for r in final:
        log(f"final eval: {r}", fh)
    best = max(final, key=lambda r: (r["prompt_accuracy"], r["object_accuracy"]))
    state["final_eval"] = final
    state["best"] = best
    with open(os.path.join(args.out, "train_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    log(f"best {best}; total {time.time() - T0:.0f}s", fh)


if __name__ == "__main__":
    main()
