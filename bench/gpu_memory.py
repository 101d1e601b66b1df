"""GPU memory benchmark: storage formats × residency plans under VRAM caps, and a model switch.

    python -m bench.gpu_memory [--models flux-dev,sd3.5-large] [--caps none,12,8] [--out PATH]
    python -m bench.gpu_memory --tiny          # CPU smoke run of every code path (tiny configs)

Random full-size weights (bench/gpu_speed.py builds them on the GPU; a CPU master copy is kept),
1024², bf16 compute, sampling only (no text encoders, no VAE). Per model, cap (GiB, via
``torch.cuda.set_per_process_memory_fraction``; "none" = the whole GPU), storage
(bf16, fp8_e4m3 layerwise casting, int8 / float8 torchao weight-only) and plan (``auto``: the
planner of app/models/memory.py under the cap; ``resident``; ``blocks``: everything streamed):
the plan chosen (mode, resident blocks, estimate), ``peak_gib`` (max allocated), ``reserved_gib``,
``s_per_image``, ``drift`` (relative L2 of the final latent vs bf16 resident without a cap).
A variant that does not fit or is refused records its error (an OOM is a result).
Then the switch test: Flux -> SD3.5-large -> Flux under one cap (default 16 GiB) through a memo
cache whose ``make_room`` the planner calls before placing each model (the LRU eviction path
of the loader): peak per stage and whether it stayed under the cap.
Results go to bench/results/gpu_memory.json after every row.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_speed  # noqa: E402
from bench.common import RESULTS, write_result  # noqa: E402

SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
# gpu_speed's Setup builds models by name: SD3.5-large joins its table here (same layout as its rows)
gpu_speed.MODELS.setdefault("sd3.5-large", ("sd3", "SD3Transformer2DModel", SD35_LARGE, 333, 2048, 3.5,
                                            {"shift": 3.0}))
gpu_speed.TINY.setdefault("sd3.5-large", {**gpu_speed.TINY["sd3.5-medium"], "qk_norm": "rms_norm"})
MODELS = ("flux-dev", "sd3.5-large")
TINY_BLOCKS = {"flux-dev": dict(num_layers=2, num_single_layers=4), "sd3.5-large": dict(num_layers=6)}  # to stream
STORAGES = ("bf16", "fp8_e4m3", "int8", "float8")
PLANS = ("auto", "resident", "blocks")


def cap_memory(device: torch.device, cap_gib: float | None, master: torch.nn.Module | None = None) -> int:
    """Limit this process's allocations to ``cap_gib`` (None: the whole GPU); returns the budget
    in bytes. On CPU (--tiny) the cap is scaled to the tiny model: as far from the least it can
    run in (streamed) towards all of it resident as ``cap_gib`` is from 4 to 24 GiB."""
    if device.type != "cuda":
        if not cap_gib or master is None:
            return 0
        from app.models.memory import min_need, need_of

        need = need_of(master, "transformer")
        share = min(1.0, max(0.0, (cap_gib - 4) / 20))
        return int(min_need(need) + (need.weight_bytes + need.work - min_need(need)) * share)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = int(cap_gib * 2**30) if cap_gib else total
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    return budget


def build(name: str, device: torch.device, args):
    """gpu_speed's Setup (random weights, inputs); --tiny models get six blocks so some can stream."""
    saved = gpu_speed.TINY[name]
    gpu_speed.TINY[name] = {**saved, **TINY_BLOCKS[name]}
    try:
        return gpu_speed.Setup(name, device, args.tiny, args.steps)
    finally:
        gpu_speed.TINY[name] = saved


def placed(setup, master: torch.nn.Module, storage: str, plan: str, budget: int, make_room=None):
    """A MODEL of ``master``'s weights in ``storage``, placed under ``budget`` by the planner."""
    from app.models.budget import place, plan_loaded
    from app.models.handles import ModelHandle
    from app.models.storage import apply_storage, bytes_per_param

    transformer = copy.deepcopy(master)
    apply_storage(transformer, "auto" if storage == "bf16" else storage, setup.handle.dtype, setup.device)
    handle = ModelHandle(transformer, setup.family, setup.device, setup.handle.dtype,
                         scheduler_config=setup.handle.scheduler_config)
    memory = {"vram": budget, **({"make_room": make_room} if make_room else {})}
    stored = None if storage == "bf16" else bytes_per_param(storage, setup.handle.dtype)
    chosen = plan_loaded({"transformer": (transformer, "transformer")}, plan, memory, setup.device, stored)
    place(chosen, {"transformer": handle}, {"transformer": transformer}, setup.device)
    return handle, chosen.as_dict()["models"][0]


def measure(setup, handle) -> dict:
    device = setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup.sample(handle)  # warm-up (pins, first copies)
    seconds, final = gpu_speed.timed(lambda: setup.sample(handle), device)
    row = {"s_per_image": seconds, "finite": bool(torch.isfinite(final).all())}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if setup.reference is None:
        setup.reference = final
    row["drift"] = float((final.float() - setup.reference.float()).norm() / setup.reference.float().norm())
    return row


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_model(name: str, args, device: torch.device, result: dict, save) -> None:
    setup = build(name, device, args)
    master = setup.handle.transformer.to("cpu")
    setup.handle.transformer = master
    free(device)
    result.update(family=setup.family, steps=args.steps, rows={})
    for cap in [None] + args.caps:
        budget = cap_memory(device, cap, master)
        for storage in args.storages:
            for plan in PLANS:
                label = f"cap={cap or 'none'} {storage} {plan}"
                row: dict = {}
                try:
                    handle, row["plan"] = placed(setup, master, storage, plan, budget)
                    row.update(measure(setup, handle))
                    del handle
                except Exception as exc:  # OOM or a refusal: a result, and the others still run
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                free(device)
                result["rows"][label] = row
                print(f"{name} {label}: {row}", flush=True)
                save()
    cap_memory(device, None)


def switch_test(args, device: torch.device) -> dict:
    """Flux -> SD3.5-large -> Flux under one cap, evicting by LRU through the memo cache."""
    from app.core.memo import MemoCache

    masters, stages = {}, []
    if device.type == "cpu":  # --tiny: the cap scaled to the first model (cap_memory)
        masters["flux-dev"] = (setup := _cpu_setup("flux-dev", args, device), setup.handle.transformer)
    budget = cap_memory(device, args.switch_cap, masters.get("flux-dev", (None, None))[1])
    cache = MemoCache(max_bytes=1 << 50, max_device_bytes=budget)
    for step, name in enumerate(("flux-dev", "sd3.5-large", "flux-dev")):
        stage = {"model": name}
        try:
            if name not in masters:
                setup = _cpu_setup(name, args, device)
                masters[name] = (setup, setup.handle.transformer)
            setup, master = masters[name]
            key = f"{name}-model"
            entry = cache.get(key)
            if entry is None:
                handle, stage["plan"] = placed(setup, master, "bf16", "auto", budget, cache.make_room)
                cache.put(key, (handle,))
            else:
                cache.make_room(0)
                handle = entry.outputs[0]
                handle.ensure_device()
                stage["reused"] = True
            stage.update(measure(setup, handle))
            stage["under_cap"] = device.type != "cuda" or stage["peak_gib"] * 2**30 <= budget
        except Exception as exc:
            stage["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        stage["memo_device_gib"] = cache.device_bytes / 2**30
        stages.append(stage)
        print(f"switch {step}: {stage}", flush=True)
    cap_memory(device, None)
    return {"cap_gib": args.switch_cap, "stages": stages}


def _cpu_setup(name: str, args, device: torch.device):
    """Build the full-size random model without a cap (it is larger than the cap), then cap again."""
    cap_memory(device, None)
    setup = build(name, device, args)
    setup.handle.transformer = setup.handle.transformer.to("cpu")
    free(device)
    cap_memory(device, args.switch_cap)
    return setup


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--caps", default="12,8", help="GiB caps besides the uncapped run, comma-separated")
    parser.add_argument("--storages", default=",".join(STORAGES))
    parser.add_argument("--switch-cap", type=float, default=16.0, help="GiB for the switch test (0: skip it)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (a smoke test of every path)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (28; --tiny: 2)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_memory.json"))
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 28)
    args.caps = [float(c) for c in args.caps.split(",") if c.strip()]
    args.storages = [s for s in args.storages.split(",") if s]
    names = [n for n in args.models.split(",") if n]
    if unknown := [n for n in names if n not in MODELS] + [s for s in args.storages if s not in STORAGES]:
        parser.error(f"unknown {unknown}; models: {', '.join(MODELS)}; storages: {', '.join(STORAGES)}")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "tiny": args.tiny, "versions": gpu_speed.versions(), "models": {}}

    def save() -> None:
        write_result("gpu_memory", {"gpu_memory": report}, args.out)

    for name in names:
        result = report["models"][name] = {}
        try:
            bench_model(name, args, device, result, save)
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        save()
    if args.switch_cap:
        report["switch"] = switch_test(args, device)
    save()
    return report


if __name__ == "__main__":
    main()
