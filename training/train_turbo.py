"""Distil shapes-dit into a 1-4 step, guidance-free student: models/shapes-dit-turbo/.

    python -m training.train_turbo --base models/shapes-dit --out models/shapes-dit-turbo --seconds 540
    python -m training.train_turbo --resume models/shapes-dit-turbo --out models/shapes-dit-turbo --seconds 540
    python -m training.train_turbo --tiny --steps 3 --out /tmp/turbo          # CPU smoke run (seconds)

Method: rectified-flow *reflow* on teacher pairs, with classifier-free guidance baked in
(InstaFlow, Liu et al. 2023; one-step regression as in Luhman & Luhman 2021).
The teacher (the shipped shapes-dit, 28 Euler steps, CFG 2, shift 3 -- its own defaults)
maps noise z to an image latent x0 = T(z, caption) deterministically. The student, initialised
from the teacher, is trained with the teacher's own loss and parameterisation on the straight
line between the two ends of that coupling: x_s = (1 - s) x0 + s z, target v = z - x0.
- At s = 1 this is exactly one-step distillation (x0 = z - v(z, 1) regresses the teacher's
  sample), at other s it straightens the student's flow, so 2-4 Euler steps stay on it;
  training draws s at the student's own step points (s = 1 and the 4-step shifted grid) half
  of the time, logit-normal otherwise.
- The targets are CFG samples, so the student needs no negative pass: cfg 1, half the cost
  per step on top of 28 -> 4 (or 1) steps.
Why not the alternatives: consistency distillation (LCM) needs an ODE solver step inside every
training step and a target network, and its one-step samples are blurrier than reflow's on
simple data; DMD/ADD need a second score network or a discriminator (twice the memory, a
min-max game to tune). Reflow is a plain regression with the base model's loss: stable,
resumable with a fresh optimizer, and the student is an ordinary shapes-dit checkpoint that the
engine's Euler sampler runs unchanged (graphs/shapes-turbo.json, graphs/shapes-1step.json).

Teacher pairs are generated on the GPU into a pool (``--pool`` pairs, refreshed every
``--refresh`` student steps) because the 28-step CFG teacher costs ~56 forward passes per pair
while a student step costs one forward and backward. Each invocation trains for ``--seconds``
(keep it under 10 minutes per device call), writes the EMA student (fp16) in diffusers layout
with the base VAE and scheduler, a ditgraph.json whose defaults make the engine sample it at
4 steps without CFG, and train_state.json with the held-out scores of the student at 1, 2 and
4 steps and of the teacher at 28. ``--resume`` continues from a written student.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time

import torch
import torch.nn.functional as F

from training import sample as sampler
from training import world
from training.train_lora import HELD_OUT_SEED, device_of, load_base, load_text, log, lr_at

TEACHER_STEPS, TEACHER_CFG, SHIFT = 28, 2.0, 3.0
STUDENT_STEPS = (1, 2, 4)
DEFAULTS = {"steps": 4, "cfg": 1.0, "shift": SHIFT, "width": 128, "height": 128, "sampler": "euler",
            "scheduler": "shifted", "guidance_distilled": True, "variant": "shapes-dit-turbo"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.train_turbo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="models/shapes-dit", help="the teacher (and the VAE/scheduler copied)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", default=None, help="a student folder written by this script")
    ap.add_argument("--seconds", type=float, default=540, help="training time budget of this invocation")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many student steps (0: time only)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny batch/pool, 4-step teacher, tiny eval")
    ap.add_argument("--minilm", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--pool", type=int, default=8192, help="teacher pairs kept for training")
    ap.add_argument("--refresh", type=int, default=64, help="student steps between replacing 1/8 of the pool")
    ap.add_argument("--teacher-batch", type=int, default=1024)
    ap.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    ap.add_argument("--teacher-cfg", type=float, default=TEACHER_CFG)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--grid-frac", type=float, default=0.5, help="share of s drawn at the student's step points")
    ap.add_argument("--eval-n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.batch, args.pool, args.refresh, args.teacher_batch = 4, 8, 2, 8
        args.teacher_steps, args.eval_n, args.warmup = 4, 4, 1
    return args


# ---------------------------------------------------------------------------------------------
# teacher pairs


class PairPool:
    """(noise, teacher latent, caption embeddings) triples from the CFG teacher, refreshed in parts."""

    def __init__(self, teacher, text, args, dev: torch.device, gen: torch.Generator):
        self.teacher, self.text, self.args, self.dev, self.gen = teacher, text, args, dev, gen
        self.uncond = [t.float() for t in text("")]
        self.z = self.x0 = self.hidden = self.pooled = None
        self.cursor = 0
        self.fill(args.pool)

    def _generate(self, n: int) -> tuple[torch.Tensor, ...]:
        b = world.sample_scenes(n, self.gen, self.dev)
        hidden, pooled = (t.float() for t in self.text(world.captions(b)))
        c = self.teacher.config
        z = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=self.gen, device=self.dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=self.dev.type == "cuda"):
            x0 = sampler.sample_latents(self.teacher, hidden, pooled, *self.uncond, steps=self.args.teacher_steps,
                                        cfg=self.args.teacher_cfg, shift=SHIFT, noise=z)
        return z, x0.float(), hidden, pooled

    def fill(self, n: int) -> None:
        """Replace ``n`` pairs (round robin), generated in teacher batches."""
        parts = [self._generate(min(self.args.teacher_batch, n - k)) for k in range(0, n, self.args.teacher_batch)]
        fresh = [torch.cat(p) for p in zip(*parts, strict=True)]
        if self.z is None:
            self.z, self.x0, self.hidden, self.pooled = fresh
            return
        idx = (torch.arange(n, device=self.dev) + self.cursor) % len(self.z)
        for pool, new in zip((self.z, self.x0, self.hidden, self.pooled), fresh, strict=True):
            pool[idx] = new
        self.cursor = int((self.cursor + n) % len(self.z))

    def batch(self, size: int) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(self.z), (size,), generator=self.gen, device=self.dev)
        return self.z[idx], self.x0[idx], self.hidden[idx], self.pooled[idx]


def step_points(dev: torch.device) -> torch.Tensor:
    """Flow sigmas the student is sampled at (1, 2 and 4 shifted Euler steps), zero excluded."""
    points = torch.cat([sampler.sigmas(n, SHIFT, dev)[:-1] for n in STUDENT_STEPS])
    return torch.unique(points)


def draw_sigmas(n: int, points: torch.Tensor, grid_frac: float, gen: torch.Generator) -> torch.Tensor:
    """Half at the student's step points, half logit-normal (the base model's training law)."""
    dev = points.device
    on_grid = torch.rand(n, generator=gen, device=dev) < grid_frac
    grid = points[torch.randint(len(points), (n,), generator=gen, device=dev)]
    free = torch.sigmoid(torch.randn(n, generator=gen, device=dev))
    return torch.where(on_grid, grid, free)


def reflow_loss(student, z, x0, hidden, pooled, s) -> torch.Tensor:
    """MSE between the student's velocity on the straight line z -> x0 and that line's slope."""
    shape = (-1, 1, 1, 1)
    xs = (1 - s.view(shape)) * x0 + s.view(shape) * z
    with torch.autocast("cuda", torch.bfloat16, enabled=z.device.type == "cuda"):
        v = student(hidden_states=xs, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=s * 1000,
                    return_dict=False)[0]
    return F.mse_loss(v.float(), z - x0)


# ---------------------------------------------------------------------------------------------
# evaluation and output


@torch.no_grad()
def evaluate(student, teacher, vae, text, dev, n: int, teacher_steps: int) -> dict:
    """Held-out object/prompt accuracy: student at 1, 2, 4 steps (cfg 1), teacher at its default."""
    from training.evaluate import score_images

    b = world.sample_scenes(n, HELD_OUT_SEED, dev)
    caps = world.captions(b)
    hidden, pooled = (t.float() for t in text(caps))
    uh, up = (t.float() for t in text(""))
    runs = [(f"student_{k}step", student, k, 1.0) for k in STUDENT_STEPS]
    runs.append((f"teacher_{teacher_steps}step", teacher, teacher_steps, TEACHER_CFG))
    out = {}
    for name, model, steps, cfg in runs:
        start = time.time()
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            z = sampler.sample_latents(model, hidden, pooled, uh, up, steps=steps, cfg=cfg, shift=SHIFT,
                                       seed=HELD_OUT_SEED)
        images = sampler.decode(vae, z).permute(0, 2, 3, 1).cpu().numpy()
        scores = score_images(images, caps)
        out[name] = {"object_accuracy": scores["object_accuracy"], "prompt_accuracy": scores["prompt_accuracy"],
                     "seconds": round(time.time() - start, 3)}
    return out


def write_student(out: str, base: str, ema, state: dict) -> None:
    """Diffusers layout: the EMA transformer (fp16), the base VAE and scheduler, the manifest."""
    os.makedirs(out, exist_ok=True)
    half = copy.deepcopy(ema).to(torch.float16)
    half.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    for part in ("vae", "scheduler"):
        source, target = os.path.join(base, part), os.path.join(out, part)
        if os.path.isdir(source) and os.path.abspath(source) != os.path.abspath(target):
            shutil.copytree(source, target, dirs_exist_ok=True)
    with open(os.path.join(base, "ditgraph.json")) as fh:
        manifest = json.load(fh)
    manifest.update({"variant": DEFAULTS["variant"], "defaults": dict(DEFAULTS), "distilled_from": "shapes-dit"})
    with open(os.path.join(out, "ditgraph.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    with open(os.path.join(out, "train_state.json"), "w") as fh:
        json.dump(state, fh, indent=1)


def load_student(args, dev: torch.device, teacher) -> tuple[torch.nn.Module, dict]:
    """The student to train: the --resume folder's (and its record), else a copy of the teacher."""
    if not args.resume:
        return copy.deepcopy(teacher), {"runs": [], "steps": 0, "seconds": 0.0}
    from diffusers import SD3Transformer2DModel

    student = SD3Transformer2DModel.from_pretrained(os.path.join(args.resume, "transformer"),
                                                    torch_dtype=torch.float32).to(dev)
    with open(os.path.join(args.resume, "train_state.json")) as fh:
        return student, json.load(fh)


# ---------------------------------------------------------------------------------------------


def reflow_train(args, student, ema, batch_loss, after_step=None, report=log) -> tuple[int, float, float]:
    """The student's optimisation loop (shared with train_video_turbo): AdamW on ``batch_loss()`` (a fresh
    batch's loss each call), warmup and decay by ``lr_at``, grad clip 1, EMA ``args.ema``, until ``args.seconds``
    (or ``args.steps``); ``after_step(step)`` runs after each step, ``report(line)`` logs. Returns (steps, seconds, mean loss of the last 100)."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99), fused=params[0].is_cuda)
    start, step, recent = time.time(), 0, []
    while time.time() - start < args.seconds and not (args.steps and step >= args.steps):
        opt.param_groups[0]["lr"] = lr_at(step, (time.time() - start) / args.seconds, args.lr, args.warmup)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), params, 1 - args.ema)
        step += 1
        recent = (recent + [float(loss.detach())])[-100:]
        if after_step:
            after_step(step)
        if step % 200 == 0 or (args.steps and step == args.steps):
            report(f"step {step} loss {sum(recent) / len(recent):.4f} {step / (time.time() - start):.1f} it/s")
    return step, time.time() - start, sum(recent) / max(1, len(recent))


def train(args, student, ema, pool: PairPool, dev: torch.device, gen: torch.Generator) -> tuple[int, float, float]:
    """Reflow steps on the pool, refreshed every ``args.refresh`` steps: (steps, seconds, mean loss of the last 100)."""
    points = step_points(dev)

    def batch_loss():
        z, x0, hidden, pooled = pool.batch(args.batch)
        return reflow_loss(student, z, x0, hidden, pooled, draw_sigmas(args.batch, points, args.grid_frac, gen))

    def refresh(step):
        if step % args.refresh == 0:
            pool.fill(max(1, len(pool.z) // 8))

    return reflow_train(args, student, ema, batch_loss, refresh)


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = device_of(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    log(f"device {dev}; args {vars(args)}")
    vae, teacher = load_base(args.base, dev)
    tok, te = load_text(args.base, args.minilm, dev)

    def text(prompts):
        from training import text as textenc

        return textenc.encode_prompts(tok, te, [prompts] if isinstance(prompts, str) else prompts)

    student, state = load_student(args, dev, teacher)
    student.train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    gen = torch.Generator(device=dev).manual_seed(args.seed * 1000 + 7 + state["steps"])
    started = time.time()
    pool = PairPool(teacher, text, args, dev, gen)
    log(f"teacher pool of {len(pool.z)} pairs in {time.time() - started:.1f}s")
    steps, seconds, loss = train(args, student, ema, pool, dev, gen)
    scores = evaluate(ema, teacher, vae, text, dev, args.eval_n, args.teacher_steps)
    for name, r in scores.items():
        log(f"eval {name}: object acc {r['object_accuracy']:.3f} prompt acc {r['prompt_accuracy']:.3f} ({r['seconds']}s)")
    run = {"steps": steps, "seconds": round(seconds, 1), "loss": round(loss, 5), "eval": scores,
           "args": {k: v for k, v in vars(args).items() if k != "resume"}}
    state = {"method": "reflow on CFG teacher pairs", "teacher": os.path.abspath(args.base),
             "runs": state["runs"] + [run], "steps": state["steps"] + steps,
             "seconds": round(state["seconds"] + seconds, 1), "eval": scores}
    write_student(args.out, args.base, ema, state)
    log(f"wrote {args.out} ({state['steps']} steps in all); done in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
