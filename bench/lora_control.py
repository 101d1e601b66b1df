"""shapes-dit LoRA and control adapters, measured through ditgraph's own patches and sampler.

    python -m bench.lora_control --device cuda --n 128          # GPU: scores + timings
    python -m bench.lora_control --device cpu --n 8 --steps 14  # CPU smoke run

- style: held-out on-grid prompts, style score (training.evaluate.style_score: fraction of object
  boundary pixels that are outline-dark) and object accuracy with the "outlined" LoRA (MODEL +
  VAE-decoder parts), each part alone, and none. Targets: >= 0.8 with, <= 0.1 without.
- control: held-out control scenes (objects anywhere, off the 3x3 grid; captions may omit
  positions), their outline maps as control images, control IoU (training.evaluate.control_score)
  without control, with the outline ControlNet (and the condition-token adapter when given),
  and with ControlNet + LoRA at once (IoU and style). Target IoU >= 0.7.
- timing: seconds per sampled batch for base, LoRA (hooks), LoRA (fused), ControlNet, both.
Adapters default to the bundled ones (models/shapes-dit-outlined-lora/,
models/shapes-dit-outline-control/); missing ones are skipped and reported.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from app.models.handles import ModelHandle, TextEncoders, VAEHandle
from app.models.latents import Latent
from app.models.patches.condition_tokens import ConditionTokenPatch, load_condition_adapter
from app.models.patches.controlnet import ControlNetPatch, load_controlnet
from app.models.patches.lora import lora_patch, read_lora, vae_with_lora
from app.models.sampling import compute_sigmas, sample
from bench.common import write_result
from nodes.text import encode
from training import evaluate, world

REPO = Path(__file__).resolve().parent.parent
STYLE_SEED = 987_654_321
CONTROL_SEED = 123_454_321
LORA_FILE = REPO / "models" / "shapes-dit-outlined-lora" / "shapes-dit-outlined.safetensors"
CONTROL_DIR = REPO / "models" / "shapes-dit-outline-control"


def load(base: Path, device: torch.device, minilm: str | None):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from training.train_lora import load_text

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer", torch_dtype=dtype).to(device).eval()
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=dtype).to(device).eval()
    tok, te = load_text(str(base), minilm, device)
    model = ModelHandle(transformer, "shapes-dit", device, dtype, defaults={"shift": 3.0}, source=str(base))
    encoders = TextEncoders({"minilm": (tok, te)}, "shapes-dit", device, te.dtype, {"max_length": 40})
    return model, VAEHandle(vae, device, dtype, str(base / "vae")), encoders


def generate(model, vae, encoders, captions, steps, cfg, seed, batch, patches=(), vae_override=None,
             controls=None) -> np.ndarray:
    """(N, 128, 128, 3) uint8 images; ``controls(start, stop)`` gives per-chunk patches (control images)."""
    images = []
    negative = encode(encoders, [""], "shapes-dit")
    decoder = vae_override or vae
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        handle = model
        for patch in patches:
            handle = handle.with_patch(patch)
        if controls is not None:
            for patch in controls(start, start + len(chunk)):
                handle = handle.with_patch(patch)
        positive = encode(encoders, chunk, "shapes-dit")
        latent = Latent(torch.zeros(len(chunk), 4, 16, 16))
        sigmas = compute_sigmas(handle, "shifted", steps, 3.0)
        out = sample(handle, latent, positive, negative, sigmas, seed + start, cfg, progress=lambda *a: None,
                     preview=False)
        pixels = decoder.decode(out.samples)
        images.append((pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(images)


def nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def style_scores(images, captions) -> dict:
    scores = evaluate.score_images(images, captions)
    return {"style": nanmean(evaluate.style_score(im, c) for im, c in zip(images, captions, strict=True)),
            "object_accuracy": scores["object_accuracy"], "prompt_accuracy": scores["prompt_accuracy"]}


def control_scores(images, maps, backgrounds, scenes=None, masks=None) -> dict:
    """IoU of the controlled geometry, and (given the scenes) colour binding per object and per scene."""
    result = {"iou": float(np.mean([evaluate.control_score(im, m, int(bg))
                                    for im, m, bg in zip(images, maps, backgrounds, strict=True)]))}
    if scenes is not None:
        scores = [evaluate.binding_score(im, s, m) for im, s, m in zip(images, scenes, masks, strict=True)]
        result["binding_objects"] = sum(s["objects_right"] for s in scores) / max(1, sum(s["objects_total"] for s in scores))
        result["binding_scenes"] = float(np.mean([s["scene_right"] for s in scores]))
    return result


def _unplaced(scene: world.Scene) -> world.Scene:
    """Off-grid scenes: objects are looked for over the whole image."""
    return world.Scene(scene.background, [world.SceneObject(o.shape, o.colour, o.size, None) for o in scene.objects])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(REPO / "models" / "shapes-dit"))
    ap.add_argument("--lora", default=str(LORA_FILE))
    ap.add_argument("--control", default=str(CONTROL_DIR), help="ControlNet folder")
    ap.add_argument("--tokens", default=None, help="condition-token adapter file (optional)")
    ap.add_argument("--minilm", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="style,control,timing", help="comma-separated subset to run")
    ap.add_argument("--json", default=None, help="output file (default bench/results/lora_control.json)")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, vae, encoders = load(Path(args.base), device, args.minilm)
    run = dict(steps=args.steps, cfg=args.cfg, seed=args.seed, batch=min(args.batch, args.n))
    result: dict = {"n": args.n, "steps": args.steps, "cfg": args.cfg, "device": str(device), "skipped": []}

    lora = read_lora(args.lora) if Path(args.lora).exists() else None
    lora_vae = lora_model_patch = None
    if lora is None:
        result["skipped"].append(f"LoRA {args.lora} not found")
    else:
        lora_model_patch = lora_patch(lora, model, 1.0)
        result["lora"] = lora_model_patch.report.summary()
        if lora_model_patch.report.vae:
            lora_vae, _ = vae_with_lora(vae, lora, 1.0)

    parts = set(args.parts.split(","))
    captions = world.captions(world.sample_scenes(args.n, seed=STYLE_SEED))
    if "style" in parts:
        run_style(model, vae, encoders, captions, lora, lora_model_patch, lora_vae, run, result)
    adapters = control_adapters(args, model, vae, device, result)
    if "control" in parts:
        run_control(model, vae, encoders, args.n, adapters, lora, lora_model_patch, lora_vae, run,
                    result)
    if "timing" in parts:
        run_timing(model, vae, encoders, captions, adapters, lora, lora_model_patch, run, device,
                   result)
    target = write_result("lora_control", result, args.json)
    print(f"wrote {target}")


def run_style(model, vae, encoders, captions, lora, lora_model_patch, lora_vae, run, result) -> None:
    style = {"none": style_scores(generate(model, vae, encoders, captions, **run), captions)}
    if lora is not None:
        style["lora"] = style_scores(generate(model, vae, encoders, captions, patches=[lora_model_patch],
                                              vae_override=lora_vae, **run), captions)
        if lora_vae is not None:
            style["dit_part_only"] = style_scores(generate(model, vae, encoders, captions,
                                                           patches=[lora_model_patch], **run), captions)
            style["vae_part_only"] = style_scores(generate(model, vae, encoders, captions, vae_override=lora_vae,
                                                           **run), captions)
    result["style"] = style
    print(json.dumps({"style": style}, indent=1), flush=True)


def control_scenes(n: int):
    """Held-out control placements: off-grid, captions never name positions (the case where only the
    words bind colours to the controlled shapes)."""
    scenes = world.sample_scenes(n, seed=CONTROL_SEED, control=True, p_name_position=0.0)
    maps = world.outline_map(scenes)  # (N, 1, 128, 128)
    return scenes, maps


def control_adapters(args, model, vae, device, result) -> list:
    """(name, controls(start, stop) -> patches) for each control adapter found."""
    scenes, maps = control_scenes(args.n)
    control_images = maps[:, 0, :, :, None].expand(-1, -1, -1, 3).contiguous()
    adapters = []
    if Path(args.control, "config.json").is_file():
        net = load_controlnet(args.control, model.dtype, device)
        adapters.append(("controlnet", lambda s, e, net=net: [ControlNetPatch(net, control_images[s:e], vae)]))
    else:
        result["skipped"].append(f"ControlNet {args.control} not found")
    if args.tokens:
        adapter = load_condition_adapter(args.tokens, model.dtype, device)
        adapters.append(("tokens", lambda s, e, a=adapter: [ConditionTokenPatch(a, control_images[s:e], vae)]))
    return adapters


def run_control(model, vae, encoders, n, adapters, lora, lora_model_patch, lora_vae, run, result) -> None:
    scenes, maps = control_scenes(n)
    control_caps = world.captions(scenes)
    maps_np = maps[:, 0].numpy()
    masks = world.object_masks(scenes).numpy()
    scene_list = scenes.scenes()
    backgrounds = scenes.background.tolist()

    def scores(images):
        return control_scores(images, maps_np, backgrounds, scene_list, masks)

    control = {"none": scores(generate(model, vae, encoders, control_caps, **run))}
    for name, controls in adapters:
        control[name] = scores(generate(model, vae, encoders, control_caps, controls=controls, **run))
        if lora is not None:
            images = generate(model, vae, encoders, control_caps, patches=[lora_model_patch], vae_override=lora_vae,
                              controls=controls, **run)
            control[f"{name}+lora"] = {**scores(images),
                                       "style": nanmean(evaluate.style_score(im, _unplaced(s))
                                                        for im, s in zip(images, scene_list, strict=True))}
    result["control"] = control
    print(json.dumps({"control": control}, indent=1), flush=True)


def run_timing(model, vae, encoders, captions, adapters, lora, lora_model_patch, run, device, result) -> None:
    timing_caps = captions[:8]
    variants = {"base": ([], None)}
    if lora is not None:
        variants["lora_hooks"] = ([lora_model_patch], None)
        variants["lora_fused"] = ([lora_patch(lora, model, 1.0, fuse=True)], None)
    for name, controls in adapters:
        variants[name] = ([], controls)
        if lora is not None:
            variants[f"{name}+lora"] = ([lora_model_patch], controls)
    timing = {}
    for name, (patches, controls) in variants.items():
        generate(model, vae, encoders, timing_caps, patches=patches, controls=controls, **dict(run, steps=2))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, vae, encoders, timing_caps, patches=patches, controls=controls, **run)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing[name] = round(time.perf_counter() - start, 4)
    result["seconds_per_batch"] = {"batch": len(timing_caps), **timing}
    print(json.dumps({"seconds_per_batch": result["seconds_per_batch"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
