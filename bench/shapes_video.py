"""shapes-video quality and speed, measured through ditgraph's shipped workflows.

    python -m bench.shapes_video --n 128 --steps 8 28 --device cuda --out bench/results/shapes_video_quality.json
    python -m bench.shapes_video --n 2 --steps 1 --device cpu --models DIR --out /tmp/sv.json   # smoke (tiny models)
    python -m bench.shapes_video --caption-seed 24680 --modes t2v --steps 8 --variants graph shift=5 cfg=6,sampler=heun

Held-out clips come from the video world's grammar with the evaluator's held-out seed (never used
in training). ``--caption-seed`` draws another set (a validation set, to choose sampler settings
without looking at the held-out one); ``--variants`` reruns each mode with the video sampler's
inputs overridden ("graph": as shipped). Modes, each one run of a shipped graph per clip with the
caption, seed (= clip index) and steps overridden, scored by training.evaluate_video (object /
prompt / motion accuracy, temporal stability; image-to-video: PSNR of frame 0 to the given image):

  t2v         graphs/shapes-t2v.json
  i2v         graphs/shapes-i2v.json: shapes-dit draws the first frame from the frame-0 caption
              (its own prompt accuracy is reported as given_prompt_accuracy)
  i2v_render  the same graph given the world's rendered frame 0 (train_video's held-out i2v check)
``--models DIR`` puts a models folder (checkpoints/shapes-video, checkpoints/shapes-dit) first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app.core import paths
from app.core import workflow as graph
from app.core.executor import Engine
from app.core.memo import MemoCache
from bench.common import write_result
from training import evaluate, evaluate_video, world
from training import video_world as vw

HELD_OUT_SEED = 987_654_321  # training.evaluate_video.self_test's and train_video's held-out seed
GRAPHS = Path(__file__).resolve().parent.parent / "graphs"
MODES = ("t2v", "i2v", "i2v_render")
# the shipped graphs: file name and node ids
T2V = {"graph": "shapes-t2v", "prompt": "2", "samplers": ("5",), "video_sampler": "5", "decode": "6", "loaders": ("1",)}
I2V = {"graph": "shapes-i2v", "prompt": "8", "image_prompt": "2", "samplers": ("5", "11"), "video_sampler": "11", "image": "6", "decode": "12",
       "i2v": "10", "loaders": ("1", "7")}


def node_ids(mode: str) -> dict:
    """``mode``'s shipped graph: its file name and node ids (i2v_render runs the i2v graph)."""
    return T2V if mode == "t2v" else I2V


def held_out(n: int, seed: int = HELD_OUT_SEED) -> tuple[list[str], list[str], np.ndarray]:
    """(video captions, frame-0 image captions, rendered frame 0 (N, 128, 128, 3) uint8) of caption seed ``seed``."""
    batch = vw.sample_clips(n, seed)
    firsts = vw.first_frames(batch).permute(0, 2, 3, 1).numpy()
    return vw.captions(batch), world.captions(batch.scenes), firsts


def parse_variant(text: str) -> dict:
    """"graph" -> {} (as shipped); "shift=5,sampler=heun" -> {"shift": 5, "sampler": "heun"}."""
    if text == "graph":
        return {}
    variant = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--variants {text!r}: {item!r} is not NAME=VALUE")
        try:
            variant[key] = json.loads(value)
        except json.JSONDecodeError:
            variant[key] = value
    return variant


def base_workflow(mode: str, device: str, sampler_inputs: dict | None = None) -> graph.Workflow:
    """The shipped graph of ``mode`` on ``device``, the video sampler's inputs updated by ``sampler_inputs``."""
    ids = node_ids(mode)
    document = json.loads((GRAPHS / f"{ids['graph']}.json").read_text())
    for node in ids["loaders"]:
        document["nodes"][node]["inputs"]["device"] = device
    video_sampler = document["nodes"][ids["video_sampler"]]["inputs"]
    settable = set(video_sampler) - {"model", "positive", "negative", "latent", "seed", "steps"}  # the bench sets those
    unknown = sorted(set(sampler_inputs or {}) - settable)
    if unknown:
        raise ValueError(f"variant: {', '.join(unknown)}: not among {ids['graph']}'s video sampler inputs "
                         f"{sorted(settable)}")
    video_sampler.update(sampler_inputs or {})
    if mode == "i2v_render":  # the rendered frame from the input folder instead of shapes-dit's
        document["nodes"]["given"] = {"type": "LoadImage", "inputs": {"image": "0000.png"}}
        document["nodes"][I2V["i2v"]]["inputs"]["start_image"] = {"from": ["given", "image"]}
    return graph.loads(json.dumps(document))


def generate(engine: Engine, base: graph.Workflow, mode: str, index: int, caption: str, image_caption: str,
             steps: int, image_steps: int = 28) -> tuple[np.ndarray, np.ndarray | None]:
    """One clip (17, 128, 128, 3) uint8 and, for i2v, the given first frame (128, 128, 3) uint8."""
    ids = node_ids(mode)
    workflow = base.copy()
    workflow.nodes[ids["prompt"]].inputs["text"] = caption
    for node in ids["samplers"]:
        workflow.nodes[node].inputs.update(seed=index, steps=steps)
    targets = [ids["decode"]]
    if mode == "i2v":
        workflow.nodes[ids["image_prompt"]].inputs["text"] = image_caption
        workflow.nodes[ids["samplers"][0]].inputs["steps"] = image_steps  # the first frame: shapes-dit's own count
        targets.append(ids["image"])
    if mode == "i2v_render":
        workflow.nodes["given"].inputs["image"] = f"{index:04d}.png"
        targets.append("given")
    result = engine.run(workflow, targets=targets).raise_for_status()
    video = result.output(ids["decode"]).frames
    given = result.output(targets[-1]) if mode != "t2v" else None
    return _uint8(video), None if given is None else _uint8(given[0])


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    return pixels.float().clamp(0, 1).mul(255).round().byte().cpu().numpy()


def run(args, write=None) -> dict:
    """The bench's result; ``write(result)`` after every row, so a run cut short (a device call's
    timeout) keeps the rows it finished."""
    if args.models:
        paths.configure(models=args.models)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {text: parse_variant(text) for text in args.variants}  # bad ones fail before any model loads
    captions, image_captions, rendered = held_out(args.n, args.caption_seed)
    inputs = tempfile.TemporaryDirectory()
    from PIL import Image

    for i, frame in enumerate(rendered):
        Image.fromarray(frame).save(Path(inputs.name) / f"{i:04d}.png")
    paths.configure(inputs=inputs.name)
    engine = Engine(cache=MemoCache(max_bytes=2 << 30), device=args.device)
    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    seed = {"held_out_seed": HELD_OUT_SEED} if args.caption_seed == HELD_OUT_SEED else {"caption_seed": args.caption_seed}
    rows = []
    result = {"device": device, **seed, "n": args.n, "image_steps": args.image_steps,
              "workflows": ["graphs/shapes-t2v.json", "graphs/shapes-i2v.json"], "rows": rows}
    for mode, (name, variant) in ((m, v) for m in args.modes for v in variants.items()):
        base = base_workflow(mode, args.device, variant)
        cfg = base.nodes[node_ids(mode)["video_sampler"]].inputs["cfg"]
        generate(engine, base, mode, 0, captions[0], image_captions[0], 1, 1)  # loads the models, outside the timings
        for steps in args.steps:
            videos, given, seconds = [], [], []
            for i, caption in enumerate(captions):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                video, image = generate(engine, base, mode, i, caption, image_captions[i], steps, args.image_steps)
                seconds.append(time.perf_counter() - start)
                videos.append(video)
                given.append(image)
            scores = evaluate_video.score_clips(videos, captions, None if mode == "t2v" else given)
            row = {"mode": mode, "steps": steps, "cfg": cfg, **({"variant": name} if variant else {}),
                   "clips": len(videos),
                   "seconds_per_clip": round(float(np.median(seconds)), 4),
                   **{k: round(float(v), 4) for k, v in scores.items() if isinstance(v, float)}}
            if mode == "i2v":
                row["given_prompt_accuracy"] = round(float(evaluate.score_images(given, image_captions)["prompt_accuracy"]), 4)
            if args.save_dir:
                folder = Path(args.save_dir) / f"{mode}_steps{steps}{'_' + name if variant else ''}"
                folder.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(folder / "clips.npz", videos=np.stack(videos), captions=np.array(captions),
                                    **({} if mode == "t2v" else {"images": np.stack(given)}))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if write:
                write(result)
    inputs.cleanup()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="held-out clips per mode and step count")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 28])
    parser.add_argument("--caption-seed", type=int, default=HELD_OUT_SEED, help="default: the held-out set")
    parser.add_argument("--variants", nargs="+", default=["graph"],
                        help='video sampler overrides, each "graph" (as shipped) or NAME=VALUE[,NAME=VALUE]')
    parser.add_argument("--image-steps", type=int, default=28, help="shapes-dit steps for i2v's first frame")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["t2v", "i2v"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help="a models folder to use (checkpoints/shapes-video, shapes-dit)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--save-dir", default=None, help="also write each mode's clips as an .npz (evaluate_video reads it)")
    parser.add_argument("--out", default=None, help="default bench/results/shapes_video_quality.json")
    args = parser.parse_args(argv)
    result = run(args, write=lambda partial: write_result("shapes_video_quality", partial, args.out))
    print(write_result("shapes_video_quality", result, args.out))
    return result


if __name__ == "__main__":
    main()
