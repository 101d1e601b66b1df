"""Distil shapes-video into a guidance-free student that keeps its quality at 8 steps.

    python -m training.train_video_turbo --base models/shapes-video --out $OUT/shapes-video --seconds 300 --minilm .carry/minilm
    python -m training.train_video_turbo --base TEACHER --resume STUDENT --out $OUT/shapes-video --seconds 300
    python -m training.train_video_turbo --tiny --base TINY_MODEL --steps 3 --out /tmp/svt      # CPU smoke run

Why: the teacher (D9, CFG 4, shift 3) meets every target at 28 steps but loses small squares' corners
at 8 (training/RUNS-video.md: 14 of 33 small squares wrong at 8 steps, 7 at 28); the last of 8 Euler
steps spans sigma 0.30 -> 0, so a curved path cannot be followed. Sampler settings alone moved it by
noise-sized amounts. The fix is the method of training/train_turbo.py (shapes-dit-turbo), for video:

- **Reflow with guidance baked in** (Liu et al. 2023; InstaFlow): the teacher, 28 Euler steps at CFG 4,
  maps noise z to a clip latent x0 = T(z, caption); the student, initialised from the teacher, regresses
  the slope z - x0 on the straight line x_s = (1 - s) x0 + s z. Straight paths are what few Euler
  steps follow exactly; targets with CFG baked in let the student run at cfg 1 (one pass per step
  instead of two, so 28 steps cost what 14 did).
- **Only right teacher clips are targets** (``--keep prompt``): every pair is decoded and scored by
  the shapes-video evaluator against its caption, and pairs whose clip the evaluator calls wrong are
  dropped, so the student learns the teacher's successes, not its rounded small squares.
- Image-to-video pairs (``--p-i2v``): the given first frame's latent is held clean with timestep 0 on
  its tokens (Wan 2.2 TI2V's mechanism, as in train_video.py) in the teacher, and in the student's
  loss, which skips that frame.
- Sigmas: half at the 8-step shifted grid (where the shipped 8-step graphs evaluate the student),
  half logit-normal (the base law, for 28 steps).

The teacher pool is generated once per call (``--pool`` pairs or ``--pool-seconds``, whichever ends
first; scoring runs in worker processes while the GPU generates the next chunk) and kept on the GPU.
Output: the base folder's VAE and scheduler, the EMA student (fp16), a ditgraph.json whose defaults
say cfg 1 and guidance-distilled, and train_state.json: the teacher's record plus a "distillation"
section (runs, pool statistics, the final evaluation on ``--eval-seed``'s captions at 8 and 28 steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import shutil
import time

import torch

from training import text as textenc
from training import train_video as tv
from training import video_world as vw
from training.train import log
from training.train_turbo import draw_sigmas, reflow_train

TEACHER = {"steps": 28, "cfg": 4.0, "shift": 3.0}
STUDENT_STEPS = 8
VALIDATION_SEED = 24680  # train_video's --eval-seed of session 13: never the held-out set the bench scores


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.train_video_turbo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="models/shapes-video", help="the teacher folder (its VAE and scheduler are copied)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--logdir", default=None, help="where distill_log.txt goes (default: --out's parent folder)")
    ap.add_argument("--resume", default=None, help="a student folder written by this script")
    ap.add_argument("--minilm", default=None, help="MiniLM folder or training/text.py's trimmed copy")
    ap.add_argument("--seconds", type=float, default=300, help="student training time of this invocation")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many student steps (0: time only)")
    ap.add_argument("--pool", type=int, default=24576, help="teacher pairs to generate (before filtering)")
    ap.add_argument("--pool-seconds", type=float, default=120, help="time cap of the teacher pool")
    ap.add_argument("--teacher-batch", type=int, default=512)
    ap.add_argument("--teacher-steps", type=int, default=TEACHER["steps"])
    ap.add_argument("--keep", choices=("prompt", "all"), default=None,
                    help="prompt (default; all with --tiny): keep the pairs whose clip the evaluator scores right; "
                         "all: no filter")
    ap.add_argument("--workers", type=int, default=0, help="scoring processes (0: CPU count - 1)")
    ap.add_argument("--p-i2v", type=float, default=0.3, help="share of image-to-video pairs")
    ap.add_argument("--p-two", type=float, default=0.7, help="share of two-object captions in the pool")
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--grid-frac", type=float, default=0.5, help="share of sigmas at the 8-step grid")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE")
    ap.add_argument("--eval-n", type=int, default=128)
    ap.add_argument("--eval-seed", type=int, default=VALIDATION_SEED)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny pool, 2-step teacher, tiny eval")
    args = ap.parse_args(argv)
    if args.tiny:  # small defaults; what the command line sets stays
        tiny = {"pool": 6, "teacher_batch": 3, "teacher_steps": 2, "batch": 2, "eval_n": 2, "warmup": 1, "workers": 1}
        for name, value in tiny.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    args.keep = args.keep or ("all" if args.tiny else "prompt")  # a tiny random teacher gets nothing right
    return args


# ---------------------------------------------------------------------------------------------
# the teacher pool


def _score(item) -> bool:
    """Worker: is the teacher's clip right for its caption (every object and the background)?"""
    from training.evaluate_video import score_clip

    video, caption = item
    return score_clip(video, caption)["prompt_right"]


def _one_thread() -> None:
    torch.set_num_threads(1)


class TeacherPool:
    """(noise, teacher latent, caption states, given-first-frame flag) of the kept teacher pairs."""

    def __init__(self, teacher, vae, tok, te, args, dev, gen):
        self.teacher, self.vae, self.tok, self.te, self.args, self.dev, self.gen = teacher, vae, tok, te, args, dev, gen
        self.uncond = textenc.encode_prompts(tok, te, [""])[0].float()
        self.stats = {"generated": 0, "kept": 0, "generated_i2v": 0, "kept_i2v": 0}

    @torch.no_grad()
    def _chunk(self, n: int, i2v: bool):
        """n teacher pairs of one mode: (z, x0, hidden, given, decoded uint8 clips, captions)."""
        batch = vw.sample_clips(n, self.gen, self.dev, p_two=self.args.p_two)  # only i2v needs a render: frame 0
        caps = vw.captions(batch)
        hidden = textenc.encode_prompts(self.tok, self.te, caps)[0].float()
        c = self.vae.config
        shape = (c.z_dim, (tv.FRAMES - 1) // 4 + 1, tv.SIZE // 8, tv.SIZE // 8)
        z = torch.randn((n, *shape), generator=self.gen, device=self.dev)
        with tv.autocast(self.dev):
            first = tv.encode(self.vae, vw.first_frames(batch, out="float")[:, :, None])[:, :, 0] if i2v else None
            x0 = tv.sample_latents(self.teacher, hidden, self.uncond, shape, noise=z, first=first,
                                   **dict(TEACHER, steps=self.args.teacher_steps))
            clips = torch.cat([tv.decode(self.vae, part) for part in x0.split(64)]).cpu().numpy()
        given = torch.full((n,), i2v, device=self.dev)
        return z, x0.float(), hidden, given, clips, caps

    def fill(self, workers) -> None:
        """Generate up to --pool pairs within --pool-seconds, scoring chunk k while chunk k+1 is sampled."""
        args, start = self.args, time.time()
        kept, pending, queued = [], [], 0
        while queued < args.pool and time.time() - start < args.pool_seconds:
            n = min(args.teacher_batch, args.pool - queued)
            n_i2v = round(n * args.p_i2v)
            for count, i2v in ((n - n_i2v, False), (n_i2v, True)):
                if count:
                    *tensors, clips, caps = self._chunk(count, i2v)
                    job = (workers.map_async(_score, list(zip(clips, caps, strict=True)), chunksize=8)
                           if args.keep == "prompt" else None)
                    pending.append((tensors, job))
            queued += n
            while len(pending) > 4:  # bound the clips waiting in host memory
                kept.append(self._collect(*pending.pop(0)))
        kept += [self._collect(*p) for p in pending]
        self.z, self.x0, self.hidden, self.given = (torch.cat(t) for t in zip(*kept, strict=True))
        self.stats["seconds"] = round(time.time() - start, 1)
        if not len(self.z):
            raise SystemExit("train_video_turbo: the evaluator rejected every teacher clip; nothing to train on")

    def _collect(self, tensors, job):
        right = torch.ones(len(tensors[0]), dtype=torch.bool) if job is None else torch.tensor(job.get())
        right = right.to(self.dev)
        i2v = bool(tensors[3][0])
        self.stats["generated"] += len(right)
        self.stats["kept"] += int(right.sum())
        if i2v:
            self.stats["generated_i2v"] += len(right)
            self.stats["kept_i2v"] += int(right.sum())
        return [t[right] for t in tensors]

    def batch(self, size: int):
        idx = torch.randint(len(self.z), (size,), generator=self.gen, device=self.dev)
        return self.z[idx], self.x0[idx], self.hidden[idx], self.given[idx]


# ---------------------------------------------------------------------------------------------
# the student


def step_points(dev) -> torch.Tensor:
    """The sigmas the shipped 8-step graphs evaluate the student at (shifted Euler grid, zero excluded)."""
    return tv.sampler.sigmas(STUDENT_STEPS, TEACHER["shift"], dev)[:-1]


def reflow_loss(student, z, x0, hidden, given, s) -> torch.Tensor:
    """MSE of the student's velocity against the slope of the line z -> x0, off the given first frames."""
    b = len(z)
    xs = (1 - s.view(b, 1, 1, 1, 1)) * x0 + s.view(b, 1, 1, 1, 1) * z
    weight = tv.hold_given_frames(xs, x0, given)
    with tv.autocast(z.device):
        v = student(hidden_states=xs, timestep=tv.token_timesteps(s, given, x0.shape), encoder_hidden_states=hidden,
                    return_dict=False)[0]
    return tv.masked_mse(v, z - x0, weight)


def train(args, student, ema, pool: TeacherPool, gen, dev, fh) -> dict:
    """Reflow steps on the kept pairs (train_turbo's loop): the run's steps, seconds and final loss."""
    tv.compile_modules(args.compile, student)
    points = step_points(dev)

    def batch_loss():
        z, x0, hidden, given = pool.batch(args.batch)
        return reflow_loss(student, z, x0, hidden, given, draw_sigmas(args.batch, points, args.grid_frac, gen))

    steps, seconds, loss = reflow_train(args, student, ema, batch_loss, report=lambda line: log(line, fh))
    return {"steps": steps, "seconds": round(seconds, 1), "loss": round(loss, 5)}


def evaluate(student, teacher, vae, tok, te, dev, n: int, seed: int) -> list[dict]:
    """The student at 8 and 28 steps (cfg 1), t2v and i2v, and the teacher at 8 steps (t2v), on ``seed``'s captions."""
    runs = [(student, 1.0, STUDENT_STEPS, "t2v", "student"), (student, 1.0, 28, "t2v", "student"),
            (student, 1.0, STUDENT_STEPS, "i2v", "student"), (teacher, TEACHER["cfg"], STUDENT_STEPS, "t2v", "teacher")]
    out = []
    for model, cfg, steps, mode, name in runs:
        with tv.eager():
            out.append({"model": name, **tv.evaluate(model, vae, tok, te, dev, n, cfg, TEACHER["shift"], steps, mode,
                                                     seed=seed)})
    return out


# ---------------------------------------------------------------------------------------------
# output


def write_student(out: str, base: str, ema, state: dict) -> None:
    """The base folder's VAE and scheduler, the EMA student (fp16), the manifest, the record and the card."""
    os.makedirs(out, exist_ok=True)
    copy.deepcopy(ema).to(torch.float16).save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    for part in ("vae", "scheduler"):
        source, target = os.path.join(base, part), os.path.join(out, part)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copytree(source, target, dirs_exist_ok=True)
    with open(os.path.join(base, "ditgraph.json")) as fh:
        manifest = json.load(fh)
    manifest["defaults"].update(cfg=1.0, guidance_distilled=True)
    with open(os.path.join(out, "ditgraph.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    with open(os.path.join(out, "train_state.json"), "w") as fh:
        json.dump(state, fh, indent=1)
    tv.write_card(out, state)


def main(argv=None) -> int:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    args = parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    logdir = args.logdir or os.path.dirname(os.path.abspath(args.out))
    os.makedirs(logdir, exist_ok=True)
    fh = open(os.path.join(logdir, "distill_log.txt"), "a")
    log(f"device {dev} args {vars(args)}", fh)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.base, "vae"), torch_dtype=torch.float32).to(dev).eval()
    teacher = WanTransformer3DModel.from_pretrained(os.path.join(args.base, "transformer"), torch_dtype=torch.float32)
    teacher = teacher.to(dev).eval().requires_grad_(False)
    student_dir = os.path.join(args.resume or args.base, "transformer")
    student = WanTransformer3DModel.from_pretrained(student_dir, torch_dtype=torch.float32).to(dev).train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    with open(os.path.join(args.resume or args.base, "train_state.json")) as f:
        state = json.load(f)
    record = state.get("distillation", {"method": "reflow on evaluator-filtered CFG teacher pairs", "teacher": TEACHER,
                                        "runs": [], "steps": 0, "seconds": 0.0})
    tok, te = textenc.load_text_encoder(args.minilm, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
    gen = torch.Generator(device=dev).manual_seed(args.seed * 1000 + 29 + record["steps"])
    pool = TeacherPool(teacher, vae, tok, te, args, dev, gen)
    workers = args.workers or max(1, (os.cpu_count() or 2) - 1)
    with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as procs:
        pool.fill(procs)
    log(f"teacher pool: {pool.stats}", fh)
    run = train(args, student, ema, pool, gen, dev, fh)
    run["pool"] = pool.stats
    run["eval"] = evaluate(ema, teacher, vae, tok, te, dev, args.eval_n, args.eval_seed)
    for r in run["eval"]:
        log(f"eval {r['model']} {r['mode']} {r['steps']} steps cfg {r['cfg']}: object {r['object_accuracy']} "
            f"prompt {r['prompt_accuracy']} motion {r['motion_accuracy']} stability {r['temporal_stability']} "
            f"psnr {r.get('i2v_psnr_mean', '-')}", fh)
    run["args"] = {k: v for k, v in vars(args).items() if k != "resume"}
    record = dict(record, runs=record["runs"] + [run], steps=record["steps"] + run["steps"],
                  seconds=round(record["seconds"] + run["seconds"], 1), eval=run["eval"])
    write_student(args.out, args.base, ema, dict(state, distillation=record))
    log(f"wrote {args.out} ({record['steps']} student steps in all)", fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
