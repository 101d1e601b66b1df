"""shapes-dit quality and speed, measured through ditgraph's own default workflow.

    python -m bench.shapes --n 256 --steps 8 14 28 50 --device cuda --out PATH   # scores (GPU)
    python -m bench.shapes --n 4 --steps 28 --device cpu --timing-only          # CPU s/image
    python -m bench.shapes --workflow graphs/shapes-turbo.json --steps 1 2 4 --out bench/results/shapes_turbo.json

Held-out captions come from the spec's grammar with a seed never used in training
(training uses seeds < 10^6 per the training scripts; this uses HELD_OUT_SEED). Each image
is one run of graphs/shapes-txt2img.json (or --workflow: any graph with the same prompt, sampler and
decode node ids, e.g. shapes-turbo.json) with the prompt, seed and steps overridden, scored
by training.evaluate (object / background / prompt accuracy of shapes-spec.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from app.core import workflow as graph
from app.core.executor import Engine
from app.core.memo import MemoCache
from bench.common import write_result
from training import evaluate, world

HELD_OUT_SEED = 987_654_321
WORKFLOW = Path(__file__).resolve().parent.parent / "graphs" / "shapes-txt2img.json"
PROMPT_NODE, SAMPLER_NODE, DECODE_NODE = "2", "5", "6"


def held_out_captions(count: int) -> list[str]:
    return world.captions(world.sample_scenes(count, seed=HELD_OUT_SEED))


def generate(engine: Engine, base: graph.Workflow, prompt: str, seed: int, steps: int, cfg: float | None) -> np.ndarray:
    """One image (H, W, 3) uint8 through the shipped workflow."""
    workflow = base.copy()
    workflow.nodes[PROMPT_NODE].inputs["text"] = prompt
    sampler = workflow.nodes[SAMPLER_NODE].inputs
    sampler["seed"], sampler["steps"] = seed, steps
    if cfg is not None:
        sampler["cfg"] = cfg
    result = engine.run(workflow, targets=[DECODE_NODE]).raise_for_status()
    image = result.output(DECODE_NODE)[0]
    return (image.float().clamp(0, 1).mul(255).round().byte().cpu().numpy())


def load_workflow(path: Path, device: str, quantize: str | None, compile_model: bool) -> graph.Workflow:
    """The shapes graph, with QuantizeModel / CompileModel after its loader when asked."""
    from app.models.fast import FAST_COMPILE, insert_fast_nodes
    from app.models.quantizers import SKIP_IO

    plan = ([{"type": "QuantizeModel", "inputs": {"method": quantize, "skip": SKIP_IO}}] if quantize else []) + (
        [{"type": "CompileModel", "inputs": dict(FAST_COMPILE)}] if compile_model else [])
    doc = json.loads(path.read_text())
    return graph.loads(json.dumps(insert_fast_nodes(doc, device, plan) if plan else doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 14, 28, 50])
    parser.add_argument("--cfg", type=float, default=None, help="override the workflow's cfg")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing-only", action="store_true", help="only CPU seconds per image")
    parser.add_argument("--save-dir", default=None, help="also write the images (PNG) here")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workflow", default=str(WORKFLOW), help="a shapes graph with nodes 2 (prompt), 5 (sampler), 6 (decode)")
    parser.add_argument("--quantize", default=None, help="a QuantizeModel method put after the loader (e.g. int8-dynamic)")
    parser.add_argument("--compile", action="store_true", help="CompileModel (its defaults) after the loader")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = Engine(cache=MemoCache(max_bytes=2 << 30), device=args.device)
    base = load_workflow(Path(args.workflow), args.device, args.quantize, args.compile)
    base.nodes["1"].inputs["device"] = args.device
    captions = held_out_captions(args.n)
    generate(engine, base, captions[0], 0, 2, args.cfg)  # load the model once, outside the timings

    rows = []
    for steps in args.steps:
        images, seconds, cpu_seconds = [], [], []
        for index, caption in enumerate(captions):
            start, cpu_start = time.perf_counter(), time.process_time()
            images.append(generate(engine, base, caption, seed=index, steps=steps, cfg=args.cfg))
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        # CPU seconds are what a loaded shared machine cannot distort; wall seconds are what a user waits
        row = {"steps": steps, "images": len(images), "seconds_per_image": round(float(np.median(seconds)), 3),
               "cpu_seconds_per_image": round(float(np.median(cpu_seconds)), 3), "torch_threads": torch.get_num_threads()}
        if not args.timing_only:
            scores = evaluate.score_images(images, captions)
            row.update({k: round(float(v), 4) for k, v in scores.items() if isinstance(v, (int, float))})
        if args.save_dir:
            folder = Path(args.save_dir) / f"steps{steps}"
            folder.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            for index, image in enumerate(images):
                Image.fromarray(image).save(folder / f"{index:04d}.png")
            (folder / "captions.json").write_text(json.dumps({f"{i:04d}.png": c for i, c in enumerate(captions)}))
        rows.append(row)
        print(json.dumps(row), flush=True)
    cfg = args.cfg if args.cfg is not None else base.nodes[SAMPLER_NODE].inputs.get("cfg")
    workflow = Path(args.workflow).resolve()
    shown = workflow.relative_to(WORKFLOW.parent.parent) if workflow.is_relative_to(WORKFLOW.parent.parent) else workflow
    result = {"device": args.device, "workflow": str(shown), "cfg": cfg, "quantize": args.quantize,
              "compile": args.compile,
              "held_out_seed": HELD_OUT_SEED, "rows": rows}
    name = "shapes_cpu_timing" if args.timing_only else "shapes_quality"
    print(write_result(name, result, args.out))


if __name__ == "__main__":
    main()
