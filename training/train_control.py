"""Train the outline-map control adapter of shapes-dit (shapes-spec.md "Derived data": a 2 px
outline map of shapes placed anywhere, captions that may omit positions).

    python -m training.train_control --base models/shapes-dit --out DIR --minutes 3 [--minilm DIR]
    python -m training.train_control ... --kind tokens      # condition-token adapter instead

--kind controlnet (default, what ships in models/shapes-dit-outline-control/): a small
SD3ControlNetModel built from a *copy* of the base config (from_transformer would mutate the
base's config) with the first --layers joint blocks copied from the base, zero-initialised
output linears and input embedding, VAE latents of the outline map (drawn white on black) as
``controlnet_cond``, pooled text kept (force_zeros_for_pooled_projection=False). Written with
save_pretrained (fp16 safetensors + config.json): ControlNetLoader loads the folder.
--kind tokens: app/models/patches/condition_tokens.py's adapter (condition-token LoRA + patch
embedding), written as one safetensors file; --image-lora-rank R adds a LoRA on the image tokens'
attention (applied only with the condition), saved in the same file.

Binding levers (both off by default, so earlier RUNS.md rows reproduce): --p-two raises the share
of two-object scenes, the only scenes where a colour can land on the wrong shape; --object-weight
weights the loss on object pixels, which a binding error changes but which are a small part of
each image (the background dominates a plain mean).

Training renders scenes on the fly (training/world.py, control=True), the base transformer is
frozen, the loss is the base's flow-matching loss. The run ends with a held-out evaluation:
control IoU (training/evaluate.control_score) with and without the control, object accuracy.
Only torch, transformers, diffusers, safetensors (and this repository) are needed.
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
from training.train_lora import device_of, drop_captions, flow_batch, load_base, load_text, lr_at

T0 = time.time()
HELD_OUT_SEED = 123454321
TOKENS_FILE = "shapes-dit-outline-tokens.safetensors"


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def control_pixels(outline: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) outline map in [0, 1] -> the control image the VAE sees: white lines on black, [-1, 1]."""
    return outline.expand(-1, 3, -1, -1) * 2 - 1


def controlnet_from_transformer(transformer, layers: int, force_zeros_pooled: bool = False):
    """An SD3ControlNetModel whose embedders and first ``layers`` blocks copy ``transformer``.

    diffusers' ``from_transformer`` mutates the base config dict, so this builds from a copy.
    The control-input embedding and output projections keep their fresh initialisation.
    """
    from diffusers import SD3ControlNetModel

    config = dict(transformer.config)
    config.update(num_layers=layers, extra_conditioning_channels=0, force_zeros_for_pooled_projection=force_zeros_pooled)
    cn = SD3ControlNetModel.from_config(config)
    cn.pos_embed.load_state_dict(transformer.pos_embed.state_dict())
    cn.time_text_embed.load_state_dict(transformer.time_text_embed.state_dict())
    cn.context_embedder.load_state_dict(transformer.context_embedder.state_dict())
    own = cn.transformer_blocks.state_dict()
    cn.transformer_blocks.load_state_dict({k: v for k, v in transformer.transformer_blocks.state_dict().items()
                                           if k in own and own[k].shape == v.shape}, strict=False)
    return cn


def make_controlnet(transformer, layers: int):
    """The adapter to train: a copy of the base's first blocks whose control input starts at zero."""
    cn = controlnet_from_transformer(transformer, layers)
    with torch.no_grad():
        for p in cn.pos_embed_input.parameters():
            p.zero_()
    return cn


class Control:
    """The adapter being trained, behind one call: velocity(transformer, inputs, control latents)."""

    def __init__(self, kind: str, transformer, layers: int, rank: int, image_rank: int = 0):
        self.kind = kind
        if kind == "controlnet":
            self.module = make_controlnet(transformer, layers)
        else:
            from app.models.patches.condition_tokens import ConditionAdapterModule, ConditionKV, install_processors

            self.module = ConditionAdapterModule(transformer, rank=rank, image_rank=image_rank)
            self.holder = ConditionKV(self.module)
            install_processors(transformer, self.holder)

    def velocity(self, transformer, xt, t, h, p, cond, kv=None):
        if self.kind == "controlnet":
            residuals = self.module(hidden_states=xt, timestep=t, encoder_hidden_states=h, pooled_projections=p,
                                    controlnet_cond=cond, conditioning_scale=1.0, return_dict=False)[0]
            return transformer(hidden_states=xt, timestep=t, encoder_hidden_states=h, pooled_projections=p,
                               block_controlnet_hidden_states=residuals, return_dict=False)[0]
        self.holder.kv = kv if kv is not None else self.module.kv(transformer, cond)
        try:
            return transformer(hidden_states=xt, timestep=t, encoder_hidden_states=h, pooled_projections=p,
                               return_dict=False)[0]
        finally:
            self.holder.kv = None


@torch.no_grad()
def sample_controlled(transformer, control: Control | None, h, p, uh, up, cond, steps, cfg, shift, seed):
    """Euler + CFG (training/sample.py's loop) with the control on both halves of the CFG batch."""
    dev = h.device
    b = h.shape[0]
    c = transformer.config
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(b, c.in_channels, c.sample_size, c.sample_size, generator=g, device=dev)
    eh, ep = torch.cat([uh.expand(b, -1, -1), h]), torch.cat([up.expand(b, -1), p])
    cond2 = torch.cat([cond, cond])
    kv = None
    if control is not None and control.kind == "tokens":
        kv = control.module.kv(transformer, cond2)  # computed once: the condition KV cache
    sig = sampler.sigmas(steps, shift, dev)
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        t = (s * 1000).expand(2 * b)
        xx = torch.cat([x, x])
        if control is None:
            v = transformer(hidden_states=xx, timestep=t, encoder_hidden_states=eh, pooled_projections=ep,
                            return_dict=False)[0]
        else:
            v = control.velocity(transformer, xx, t, eh, ep, cond2, kv)
        v_u, v_c = v.float().chunk(2)
        x = x + (s_next - s) * (v_u + cfg * (v_c - v_u))
    return x


@torch.no_grad()
def evaluate_control(transformer, control, vae, tok, te, dev, n, steps, cfg, shift) -> dict:
    import numpy as np

    from training.evaluate import binding_score, control_score, score_images

    # positions never named: only the words can bind each colour to its controlled shape
    b = world.sample_scenes(n, HELD_OUT_SEED, dev, control=True, p_name_position=0.0)
    caps = world.captions(b)
    scenes, masks = b.scenes(), world.object_masks(b).cpu().numpy()
    maps = world.outline_map(b)
    cond = sampler.encode(vae, control_pixels(maps))
    h, p = textenc.encode_prompts(tok, te, caps)
    uh, up = textenc.encode_prompts(tok, te, [""])
    out = {}
    for name, ctl in (("control", control), ("none", None)):
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            z = sample_controlled(transformer, ctl, h.float(), p.float(), uh.float(), up.float(), cond, steps, cfg,
                                  shift, HELD_OUT_SEED)
        images = sampler.decode(vae, z).permute(0, 2, 3, 1).cpu().numpy()
        iou = [control_score(im, m[0].cpu().numpy(), int(bg))
               for im, m, bg in zip(images, maps, b.background.tolist(), strict=True)]
        scores = score_images(images, caps)
        binding = [binding_score(im, s, m) for im, s, m in zip(images, scenes, masks, strict=True)]
        out[name] = {"iou": float(np.mean(iou)), "object_accuracy": scores["object_accuracy"],
                     "binding_objects": sum(x["objects_right"] for x in binding) / sum(x["objects_total"] for x in binding),
                     "binding_scenes": float(np.mean([x["scene_right"] for x in binding]))}
    return out


def object_weights(batch, size: tuple[int, int], weight: float) -> torch.Tensor:
    """(B, 1, h, w) loss weights at latent resolution: 1 + weight x the share of each latent pixel
    covered by an object (world.object_masks pooled to the latent grid)."""
    masks = world.object_masks(batch).any(1, keepdim=True).float()
    return 1 + weight * F.adaptive_avg_pool2d(masks, size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train_control", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="models/shapes-dit")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kind", choices=["controlnet", "tokens"], default="controlnet")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--minilm", default=None)
    ap.add_argument("--layers", type=int, default=2, help="controlnet: joint blocks copied from the base")
    ap.add_argument("--rank", type=int, default=32, help="tokens: LoRA rank of the condition branch")
    ap.add_argument("--image-lora-rank", type=int, default=0,
                    help="tokens: also a LoRA of this rank on the image tokens' attention q/k/v/out (0: none)")
    ap.add_argument("--p-two", type=float, default=0.5, help="share of training scenes with two objects")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="extra loss weight on object pixels (loss weight 1 + W x object coverage)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default 3e-4 (controlnet), 1e-3 (tokens)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--sigma-bias", type=float, default=0.5, help="logit-normal mean: >0 favours noisy steps (layout)")
    ap.add_argument("--p-name-position", type=float, default=0.5,
                    help="share of training captions that name positions (the rest bind by words alone)")
    ap.add_argument("--init", default=None, help="controlnet: resume from this ControlNet folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    if args.image_lora_rank and args.kind != "tokens":
        ap.error("--image-lora-rank is an option of --kind tokens")
    if args.lr is None:
        args.lr = 3e-4 if args.kind == "controlnet" else 1e-3
    dev = device_of(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    log(f"device {dev}; args {vars(args)}")
    vae, transformer = load_base(args.base, dev)
    tok, te = load_text(args.base, args.minilm, dev)
    control = Control(args.kind, transformer, args.layers, args.rank, args.image_lora_rank)
    if args.init:
        from diffusers import SD3ControlNetModel

        control.module.load_state_dict(SD3ControlNetModel.from_pretrained(args.init).state_dict())
    control.module.to(dev).train()
    params = [p for p in control.module.parameters() if p.requires_grad]
    log(f"{args.kind}: {sum(p.numel() for p in params) / 1e6:.3f}M trainable parameters")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device=dev).manual_seed(args.seed * 1000 + 57)
    budget = args.minutes * 60
    start = time.time()
    step, acc, acc_n = 0, 0.0, 0
    while time.time() - start < budget and not (args.max_steps and step >= args.max_steps):
        opt.param_groups[0]["lr"] = lr_at(step, (time.time() - start) / budget, args.lr, args.warmup)
        with torch.no_grad():
            b = world.sample_scenes(args.batch, gen, dev, control=True, p_two=args.p_two,
                                    p_name_position=args.p_name_position)
            caps = drop_captions(world.captions(b), args.cfg_drop, gen, dev)
            h, p = textenc.encode_prompts(tok, te, caps)
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                x0 = sampler.encode(vae, world.render(b, out="float"))
                cond = sampler.encode(vae, control_pixels(world.outline_map(b)))
            xt, s, target = flow_batch(x0, gen)
            if args.sigma_bias:
                s = torch.sigmoid(torch.logit(s.clamp(1e-4, 1 - 1e-4)) + args.sigma_bias)
                noise = target + x0
                xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            pred = control.velocity(transformer, xt, s * 1000, h.float(), p.float(), cond)
        if args.object_weight:
            weight = object_weights(b, x0.shape[-2:], args.object_weight)
            loss = ((pred.float() - target) ** 2 * weight).mean() / weight.mean()
        else:
            loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc, acc_n = acc + loss.detach(), acc_n + 1
        if step % 200 == 0 or (args.max_steps and step == args.max_steps):
            log(f"step {step} loss {float(acc) / acc_n:.4f} {step / (time.time() - start):.1f} it/s")
            acc, acc_n = 0.0, 0
    seconds = time.time() - start
    log(f"trained {step} steps in {seconds:.0f}s")
    control.module.eval()
    info = {"kind": f"shapes-dit outline control ({args.kind})", "steps": step, "seconds": round(seconds, 1),
            "batch": args.batch, "layers": args.layers if args.kind == "controlnet" else None,
            "rank": args.rank if args.kind == "tokens" else None,
            "image_lora_rank": args.image_lora_rank or None, "p_two": args.p_two, "object_weight": args.object_weight}
    if args.kind == "controlnet":
        control.module.to(torch.float16).save_pretrained(args.out, safe_serialization=True, max_shard_size="12MB")
        control.module.float()
        files = [f for f in os.listdir(args.out) if f.endswith(".safetensors")]
    else:
        from app.models.patches.condition_tokens import save_condition_adapter

        save_condition_adapter(control.module, os.path.join(args.out, TOKENS_FILE), info)
        files = [TOKENS_FILE]
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files)
    log(f"wrote {', '.join(files)} to {args.out} ({size / 1e6:.2f} MB)")
    evaluation = evaluate_control(transformer, control, vae, tok, te, dev, args.eval_n, args.eval_steps, args.cfg,
                                  args.shift)
    for name, r in evaluation.items():
        log(f"eval {name}: control IoU {r['iou']:.3f} object acc {r['object_accuracy']:.3f} "
            f"binding {r['binding_objects']:.3f} objects / {r['binding_scenes']:.3f} scenes")
    state = dict(info, args=vars(args), eval=evaluation, files=files, bytes=size)
    with open(os.path.join(args.out, "train_state.json"), "w") as fh:
        json.dump(state, fh, indent=1)
    log(f"done in {time.time() - T0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
