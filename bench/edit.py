"""Editing benchmark on shapes-dit: change one object's colour or shape by prompt.

    python -m bench.edit --n 64                       # CPU; writes bench/results/edit.json
    python -m bench.edit --n 64 --device cuda --out /path/edit.json

Each case is a ground-truth scene of the shapes world (training/world.py), rendered exactly,
encoded with the model's VAE, and edited from its caption to a target caption in which one
object changes colour (even cases) or shape (odd cases). Scoring is training/evaluate.py's
``edit_score``: the edited object matches the target caption in its cell ("changed"), and the
PSNR between the source render and the decoded edit outside the edited object's cell.
Target for the best method: success >= 0.75 and PSNR >= 28 dB outside the edited cell.

Every method calls the same functions the editing nodes call (app/models/editing.py, app/models/sampling),
batched over all cases. Without the trained weights (models/shapes-dit) a random-weight model
of the same configuration is used, so the numbers then only test the pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.models.handles import ModelHandle, TextEncoders, VAEHandle
from bench.common import write_result
from app.models import editing as edit
from app.models import masks
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, sample
from nodes.text import encode
from training import evaluate, world

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "shapes-dit"
PSNR_TARGET = 28.0
STORE_STEPS = 2  # RF-Solver inversions record attention values for the first 2 editing steps
SUCCESS_TARGET = 0.75


# ---------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    source: world.Scene
    target: world.Scene
    index: int  # edited object
    kind: str  # "colour" | "shape"

    @property
    def cell(self) -> int:
        return self.source.objects[self.index].cell


def make_cases(n: int, seed: int = 0) -> tuple[list[Case], torch.Tensor]:
    """n edit cases and their source renders (n, 128, 128, 3) uint8."""
    import copy
    import random

    batch = world.sample_scenes(n, seed=seed)
    scenes = batch.scenes()
    rng = random.Random(seed)
    cases = []
    for i, scene in enumerate(scenes):
        index = rng.randrange(len(scene.objects))
        target = copy.deepcopy(scene)
        obj = target.objects[index]
        if i % 2 == 0:
            choices = [c for c in range(len(world.COLOUR_NAMES)) if c not in (obj.colour, scene.background)]
            obj.colour = rng.choice(choices)
            kind = "colour"
        else:
            obj.shape = rng.choice([s for s in range(len(world.SHAPE_NAMES)) if s != obj.shape])
            kind = "shape"
        cases.append(Case(scene, target, index, kind))
    images = world.render(batch).permute(0, 2, 3, 1).contiguous()
    return cases, images


def cell_masks(cases: list[Case], grow_px: int) -> torch.Tensor:
    out = []
    for case in cases:
        cell = masks.grid_cell(world.SIZE, world.SIZE, case.cell)
        out.append(masks.grow(cell[None], grow_px)[0] if grow_px else cell)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# model


def load_model(device: str, dtype: str, model_dir: Path) -> tuple[ModelHandle, TextEncoders, VAEHandle, str]:
    from nodes.loaders import load_checkpoint_folder

    dev = torch.device(device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if (model_dir / "ditgraph.json").is_file():
        model, encoders, vae = load_checkpoint_folder(model_dir, dt, dev)
        name = str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir)
        state = model_dir / "train_state.json"
        if state.is_file():
            import json

            name += f" ({json.loads(state.read_text()).get('dit_steps')} DiT training steps)"
        return model, encoders, vae, name
    # the trained weights are not here yet: the same architecture with random weights
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from training import text as textenc
    from training.train import DIT_CONFIG, VAE_CONFIG

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**DIT_CONFIG).to(dev, dt).eval()
    vae_module = AutoencoderKL(**VAE_CONFIG).to(dev, dt).eval()
    vae_module.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    tok, te = textenc.load_text_encoder(None, device=dev, dtype=dt)
    model = ModelHandle(transformer, "shapes-dit", dev, dt, defaults={"steps": 28, "cfg": 4.0, "shift": 3.0})
    encoders = TextEncoders({"minilm": (tok, te)}, "shapes-dit", dev, dt, {"max_length": 40})
    return model, encoders, VAEHandle(vae_module, dev, dt), "random weights (shapes-dit config; models/shapes-dit missing)"


# ---------------------------------------------------------------------------------------------
# methods: name -> (description, function(ctx) -> edited latents)


@dataclass
class Context:
    model: ModelHandle
    source: torch.Tensor  # (B, C, h, w) source latents
    src: object  # conditioning, B prompts
    tar: object
    neg: object
    cell_mask: torch.Tensor  # (B, 128, 128) the edited cell, grown
    steps: int
    cfg: float
    seed: int
    inversions: dict


def quiet(*_args) -> None:
    return None


def m_img2img(strength: float):
    def run(ctx: Context) -> tuple[torch.Tensor, int]:
        sigmas = compute_sigmas(ctx.model, "auto", ctx.steps, denoise=strength)
        out = sample(ctx.model, Latent(ctx.source), ctx.tar, ctx.neg, sigmas, ctx.seed, ctx.cfg, progress=quiet, preview=False)
        return out.samples, len(sigmas) - 1
    return run


def m_inpaint(strength: float, grow_px: int = 0):
    def run(ctx: Context) -> tuple[torch.Tensor, int]:
        m = edit.blend_mask(ctx.cell_mask, ctx.source, grow_px)
        sigmas = compute_sigmas(ctx.model, "auto", ctx.steps, denoise=strength)
        out = sample(ctx.model, Latent(ctx.source, m[:, 0].cpu()), ctx.tar, ctx.neg, sigmas, ctx.seed, ctx.cfg,
                     progress=quiet, preview=False)
        return out.samples, len(sigmas) - 1
    return run


def _inversion(ctx: Context, solver: str, gamma: float = 0.0, store_steps: int = 0, strength: float = 1.0,
               steps: int | None = None) -> edit.Inversion:
    """The inversion of this batch (shared by the methods that differ only in how they edit:
    recording attention values does not change the inversion)."""
    steps = steps or (ctx.steps // 2 if solver == "rf_solver" else ctx.steps)
    store_steps = max(store_steps, STORE_STEPS) if solver == "rf_solver" else store_steps
    key = (solver, gamma, store_steps, strength, steps)
    if key not in ctx.inversions:
        sigmas = compute_sigmas(ctx.model, "auto", steps, denoise=strength)
        ctx.inversions[key] = edit.invert(ctx.model, ctx.source, ctx.src, sigmas, solver=solver, gamma=gamma,
                                          seed=ctx.seed, store_steps=store_steps, progress=quiet, preview=False)
    return ctx.inversions[key]


def m_inversion(solver: str, cfg: float, inject: int = 0, gamma: float = 0.0, eta: float = 0.0, stop: float = 0.25,
                masked: bool = False, strength: float = 1.0):
    def run(ctx: Context) -> tuple[torch.Tensor, int]:
        inv = _inversion(ctx, solver, gamma, inject, strength)
        out = edit.edit_from_inversion(ctx.model, inv, ctx.tar, ctx.neg, cfg, inject_steps=inject, eta=eta,
                                       eta_stop=stop, mask=ctx.cell_mask if masked else None,
                                       progress=quiet, preview=False)
        per_step = 2 if solver == "rf_solver" else 1
        return out, 2 * inv.steps * per_step  # inversion + editing
    return run


def m_flowedit(n_max: int, src_cfg: float, tar_cfg: float, n_avg: int = 1, masked: bool = False):
    def run(ctx: Context) -> tuple[torch.Tensor, int]:
        sigmas = compute_sigmas(ctx.model, "auto", ctx.steps)
        out = edit.flow_edit(ctx.model, ctx.source, ctx.src, ctx.tar, sigmas, ctx.neg, source_cfg=src_cfg,
                             target_cfg=tar_cfg, n_max=n_max, n_avg=n_avg, seed=ctx.seed,
                             mask=ctx.cell_mask if masked else None, progress=quiet, preview=False)
        return out, 2 * min(n_max, ctx.steps) * n_avg
    return run


def methods(steps: int, cfg: float) -> dict[str, tuple[str, object]]:
    n_max = max(1, round(steps * 0.7))
    return {
        "img2img_0.6": ("SDEdit, strength 0.6, whole image", m_img2img(0.6)),
        "inpaint_cell": ("inpaint the edited 3x3 cell (grown 4 px), strength 1.0", m_inpaint(1.0)),
        "rf_solver_edit": (f"RF-Solver inversion (source prompt, cfg 1) + edit (cfg {cfg})", m_inversion("rf_solver", cfg)),
        "rf_edit_inject2": ("RF-Edit: as above, attention values injected for 2 steps (later half of the blocks)",
                            m_inversion("rf_solver", cfg, inject=2)),
        "rf_edit_masked": ("RF-Edit inject 2 + cell mask (outside follows the inversion)", m_inversion("rf_solver", cfg, inject=2, masked=True)),
        "rf_inversion": (f"RF-Inversion: Euler, gamma 0.5, eta 0.9 for the first 25%, cfg {cfg}",
                         m_inversion("euler", cfg, gamma=0.5, eta=0.9, stop=0.25)),
        "flowedit": (f"FlowEdit n_max {n_max}/{steps}, source cfg 1.5, target cfg {cfg + 1.5}", m_flowedit(n_max, 1.5, cfg + 1.5)),
        "flowedit_masked": ("FlowEdit as above + cell mask", m_flowedit(n_max, 1.5, cfg + 1.5, masked=True)),
    }


# ---------------------------------------------------------------------------------------------
# run


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def score(cases: list[Case], sources: np.ndarray, edited: np.ndarray) -> dict:
    rows = []
    for case, src, out in zip(cases, sources, edited, strict=True):
        r = evaluate.edit_score(src, out, case.target, case.index)
        rows.append((bool(r["changed"]), float(r["psnr_outside"]), case.kind))
    psnrs = [min(p, 99.0) for _, p, _ in rows]
    changed = [c for c, _, _ in rows]
    return {
        "success": round(sum(changed) / len(rows), 4),
        "success_colour": round(statistics.fmean([c for c, _, k in rows if k == "colour"] or [0]), 4),
        "success_shape": round(statistics.fmean([c for c, _, k in rows if k == "shape"] or [0]), 4),
        "psnr_outside_mean": round(statistics.fmean(psnrs), 2),
        "psnr_outside_median": round(statistics.median(psnrs), 2),
        "psnr_outside_p10": round(float(np.percentile(psnrs, 10)), 2),
        "success_and_psnr28": round(sum(c and p >= PSNR_TARGET for c, p, _ in rows) / len(rows), 4),
    }


def save_grid(path: Path, sources: np.ndarray, edited: np.ndarray, count: int = 16) -> None:
    from PIL import Image

    k = min(count, len(sources))
    pairs = np.concatenate([sources[:k], edited[:k]], axis=2)  # (k, 128, 256, 3)
    rows = [np.concatenate(list(pairs[i:i + 4]), axis=1) for i in range(0, k, 4)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="number of edits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/edit.json)")
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg", type=float, default=0.0, help="guidance scale (0: the model's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="edits per batch")
    parser.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--save-images", default=None, help="folder for source|edit grids per method")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, encoders, vae, model_name = load_model(args.device, args.dtype, Path(args.model))
    args.cfg = args.cfg or float(model.defaults.get("cfg", 2.0))
    cases, images = make_cases(args.n, args.seed)
    sources = images.numpy()
    table = methods(args.steps, args.cfg)
    wanted = [m for m in args.methods.split(",") if m] or list(table)
    unknown = [m for m in wanted if m not in table]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(table)}")

    start = time.perf_counter()
    latents, conds = [], []
    for i in range(0, args.n, args.batch):
        chunk = cases[i:i + args.batch]
        latents.append(vae.encode(images[i:i + args.batch].float() / 255.0))
        conds.append((encode(encoders, [world.caption(c.source) for c in chunk], "shapes-dit"),
                      encode(encoders, [world.caption(c.target) for c in chunk], "shapes-dit")))
    negative = encode(encoders, [""], "shapes-dit")
    recon = to_uint8(torch.cat([vae.decode(z) for z in latents]))
    results = {"vae_reconstruction": {"description": "decode(encode(source)): the ceiling of every method",
                                      **score(cases, sources, recon), "nfe": 0, "seconds": round(time.perf_counter() - start, 2)}}
    print(f"{'method':<20} {'success':>8} {'colour':>7} {'shape':>6} {'psnr':>6} {'med':>6} {'both':>6} {'nfe':>4} {'s':>7}")

    def report(name: str, row: dict) -> None:
        print(f"{name:<20} {row['success']:>8.3f} {row['success_colour']:>7.3f} {row['success_shape']:>6.3f} "
              f"{row['psnr_outside_mean']:>6.2f} {row['psnr_outside_median']:>6.2f} {row['success_and_psnr28']:>6.3f} "
              f"{row['nfe']:>4} {row['seconds']:>7.1f}", flush=True)

    report("vae_reconstruction", results["vae_reconstruction"])
    for name in wanted:
        description, function = table[name]
        t0 = time.perf_counter()
        outputs, nfe = [], 0
        for b, i in enumerate(range(0, args.n, args.batch)):
            chunk = cases[i:i + args.batch]
            ctx = Context(model, latents[b], conds[b][0], conds[b][1], negative, cell_masks(chunk, 4), args.steps,
                          args.cfg, args.seed + i, {})
            edited, nfe = function(ctx)
            outputs.append(vae.decode(edited))
        edited_images = to_uint8(torch.cat(outputs))
        row = {"description": description, **score(cases, sources, edited_images), "nfe": nfe,
               "seconds": round(time.perf_counter() - t0, 2)}
        results[name] = row
        report(name, row)
        if args.save_images:
            folder = Path(args.save_images)
            folder.mkdir(parents=True, exist_ok=True)
            save_grid(folder / f"{name}.png", sources, edited_images)

    ranked = [(k, v) for k, v in results.items() if k != "vae_reconstruction"]
    best = max(ranked, key=lambda kv: (kv[1]["success_and_psnr28"], kv[1]["success"], kv[1]["psnr_outside_mean"]))
    data = {
        "model": model_name,
        "n": args.n,
        "steps": args.steps,
        "cfg": args.cfg,
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.seed,
        "targets": {"success": SUCCESS_TARGET, "psnr_outside_db": PSNR_TARGET},
        "best": {"method": best[0], "success": best[1]["success"], "psnr_outside_mean": best[1]["psnr_outside_mean"],
                 "meets_target": best[1]["success"] >= SUCCESS_TARGET and best[1]["psnr_outside_mean"] >= PSNR_TARGET},
        "methods": results,
        "notes": ("success = evaluate.edit_score 'changed' (the edited object, in its cell, has the target colour and "
                  "shape); psnr_outside = PSNR vs the ground-truth source render outside the edited cell (capped at "
                  "99 dB); nfe = transformer evaluations per image (CFG pairs count once)."),
    }
    path = write_result("edit", data, args.out)
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
