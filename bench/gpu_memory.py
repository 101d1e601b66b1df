"""GPU memory benchmark: storage formats × residency plans under VRAM caps, and a model switch.

    python -m bench.gpu_memory [--models flux-dev,sd3.5-large] [--caps none,12,8] [--out PATH]
    python -m bench.gpu_memory --tiny          # CPU smoke run of every code path (tiny configs)
    python -m bench.gpu_memory --e2e [--rows flux-dev/none/bf16/resident,flux-dev/12/fp8_e4m3/auto]
    python -m bench.gpu_memory --e2e --tiny    # CPU smoke run of the end-to-end rows

End to end (``--e2e``): text encoders + transformer + VAE (random full-size weights from the
config dicts below, as bench/gpu_parity.py builds them), 1024², 28 steps: TextEncode(Pair) ->
Sampler -> VAEDecode, every part placed by the planner as CheckpointLoader places it (storage
applies to the transformer). Each row runs in a subprocess of its own on a GPU (the cap, the
peak statistics and the pinned host RAM are then the row's alone; a row that hangs or dies is
recorded and the next one runs); rows are written to the JSON as they finish. Per row: the plan
(mode, resident blocks, tiled decode, estimates), ``peak_gib`` / ``reserved_gib``,
``s_per_image`` (one timed image after a 2-step warm-up), ``drift`` (relative L2 of the final
latent vs the model's bf16 resident uncapped row, which runs first and saves its latent and its
encoded prompt beside the JSON; ``--reuse-reference`` skips it when they are there),
``encode_drift`` (the same for the encoded prompt: the text encoders are bf16 in every row, so
anything but 0 is a placement bug), ``repeat_drifts`` / ``repeats_equal`` with ``--repeat N``
(the image N times: a placement must give the same bits each time; ``--serial-copies``, no copy
overlapping compute, is the race control), ``pinned_gib`` (the pinned host allocator's bytes), ``host_peak_gib`` (max RSS) and
``build_s`` / ``place_s`` / ``row_s``, and ``stages``: per stage (build, plan, place, then encode,
sample and decode of the warm-up and of the timed image) its seconds and the GiB allocated at its
end, its peak, reserved (max, and at its end) and the allocator's trips to the driver
(``alloc_retries``: at the cap, a sync and a free of every cached segment). ``--profile``: a
short sampling run after the timed image under torch.profiler (``profile``: per step device
busy ms by kernel kind, H2D copy ms and the share of it overlapped by kernels, GPU idle ms, host
calls that synchronise or go to the driver, allocator counters; :func:`step_profile`).
``--alloc-conf`` runs the rows under a PYTORCH_CUDA_ALLOC_CONF (e.g. expandable_segments:True),
``--share-copy-stream`` with one copy stream for all streamed models (residency's
SHARE_COPY_STREAM), ``--fast-cast`` with fp8 weights upcast by the compiled cast instead of eager
``.to()`` (storage's FAST_CAST, off by default; row ``fast_cast``; its kernels count as "inductor",
eager's as "copy") and ``--prefix-resident`` with a streamed model's first blocks kept rather than spread
among the streamed ones (the planner's SPREAD_RESIDENT; row ``spread_resident``), each recorded
per row and in the row labels. A failed row keeps its plan
and stages and says ``failed_stage`` and ``allocated_gib_at_error``; ``--memory-history`` adds
an allocator snapshot (memory_viz) beside the JSON and ``live_by_place``. The end-to-end switch
test runs all three stages in one process (reuse needs one); each stage records
``reserved_gib_before`` (before make_room's eviction; its plan stage's ``reserved_end_gib``:
after). Wall time per GPU row is dominated by building and moving the
random weights; see :data:`ROW_SECONDS`.

Transformer only (without ``--e2e``): random full-size weights (bench/gpu_speed.py builds them on the GPU; a CPU master copy is kept),
1024², bf16 compute, sampling only (no text encoders, no VAE). Per model, cap (GiB, via
``torch.cuda.set_per_process_memory_fraction``; "none" = the whole GPU), storage
(bf16, fp8_e4m3 stored and upcast per layer by app/models/storage.py, int8 / float8 torchao
weight-only) and plan (``auto``: the
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
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.models import memory as memory_planner  # noqa: E402
from app.models import residency  # noqa: E402
from app.models import storage as weight_storage  # noqa: E402
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
    from app.models.storage import apply_storage

    transformer = copy.deepcopy(master)
    apply_storage(transformer, "auto" if storage == "bf16" else storage, setup.handle.dtype, setup.device)
    handle = ModelHandle(transformer, setup.family, setup.device, setup.handle.dtype,
                         scheduler_config=setup.handle.scheduler_config)
    memory = {"vram": budget, **({"make_room": make_room} if make_room else {})}
    chosen = plan_loaded({"transformer": (transformer, "transformer")}, plan, memory, setup.device)
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
    row["drift"] = relative_drift(final, setup.reference)
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


# ---------------------------------------------------------------------------------------------
# end to end (--e2e): text encoders + transformer + VAE, each row in a subprocess on a GPU

T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
SD3_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# Per model: family, transformer class, and per diffusers component (class, config): the
# released configs of Flux.1-dev (bench/gpu_parity.py's) and SD3.5-large.
E2E_FULL = {
    "flux-dev": ("flux", {
        "transformer": ("FluxTransformer2DModel", {**gpu_speed.MODELS["flux-dev"][2]}),
        "text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL),
        "vae": ("AutoencoderKL", {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159})}),
    "sd3.5-large": ("sd3", {
        "transformer": ("SD3Transformer2DModel", SD35_LARGE),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", T5_XXL), "vae": ("AutoencoderKL", SD3_VAE)}),
}
_TINY_CLIP = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                  max_position_embeddings=77)
_TINY_T5 = dict(d_model=32, d_ff=37, d_kv=8, num_layers=4, num_heads=4, vocab_size=100, relative_attention_num_buckets=8)
_TINY_VAE = dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
E2E_TINY = {  # six transformer blocks and four T5 blocks, so that some can stream
    "flux-dev": {"transformer": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8]),
                 "text_encoder": dict(_TINY_CLIP, hidden_size=32, projection_dim=32), "text_encoder_2": _TINY_T5,
                 "vae": dict(_TINY_VAE, scaling_factor=0.4, shift_factor=0.1)},
    "sd3.5-large": {"transformer": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                                        qk_norm="rms_norm"),
                    "text_encoder": dict(_TINY_CLIP, hidden_size=16, projection_dim=16),
                    "text_encoder_2": dict(_TINY_CLIP, hidden_size=16, projection_dim=16),
                    "text_encoder_3": _TINY_T5, "vae": dict(_TINY_VAE, scaling_factor=1.5, shift_factor=0.06)},
}
E2E_SIZE, E2E_TINY_SIZE = 1024, 64
# Wall seconds of one Flux-dev GPU row on an H200, which the lead's commands are sized by.
# Measured (session 6): the bf16 resident row 49 (process start + imports ~8, building the random
# weights on the GPU and copying them to host RAM 35.5, placing 5.2, warm-up + one image ~6).
# Estimated for the others: placing pins every streamed weight (the streamed transformer blocks
# and T5's 8.9 GiB; kept blocks are not pinned) at the issue's ~1.5-2.2 s/GB, and each step
# copies the streamed blocks again (~20-25 GB/s): fp8 under 12 GiB streams 4.9 GiB a step, under
# 8 GiB 9.5, bf16 under 12 GiB 13.8. SD3.5-large: ~0.8x Flux's weights. The switch test builds
# both models once (~70) and places three times. Rows record build_s / place_s / row_s and per
# stage seconds: re-estimate from those.
ROW_SECONDS = {"bf16 resident": 49, "fp8 auto 12 GiB": 90, "fp8 auto 8 GiB": 110, "bf16 auto 12 GiB": 130,
               "blocks": 150, "switch (both models)": 220}


def _module(class_name: str, config: dict):
    import diffusers
    import transformers

    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name)(**config)
    if class_name == "T5EncoderModel":
        return transformers.T5EncoderModel(transformers.T5Config(**config, decoder_start_token_id=0, pad_token_id=0,
                                                                 eos_token_id=1))
    return getattr(transformers, class_name)(transformers.CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1,
                                                                         pad_token_id=1))


def build_e2e(name: str, device: torch.device, tiny: bool, storage: str) -> dict:
    """Every component of ``name`` with random weights (seeded per component: every row's
    subprocess builds the same ones), built on ``device`` (fast), the transformer stored in
    ``storage``, then moved to host RAM: the planner places them as the loader would. On the
    meta device: no weights, for their sizes."""
    from app.models.storage import apply_storage
    from bench.gpu_parity import clip_tokenizer, t5_tokenizer

    family, full = E2E_FULL[name]
    dtype = torch.float32 if tiny else torch.bfloat16
    parts = {"family": family}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for seed, (component, (class_name, config)) in enumerate(full.items()):
            torch.manual_seed(seed)
            with torch.device(device):
                module = _module(class_name, E2E_TINY[name][component] if tiny else config)
            parts[component] = module.to(dtype=dtype).eval().requires_grad_(False)
            if component.startswith("text_encoder"):
                tokenizer = t5_tokenizer() if class_name == "T5EncoderModel" else clip_tokenizer()
                parts[component.replace("text_encoder", "tokenizer")] = tokenizer
    finally:
        torch.set_default_dtype(previous)
    apply_storage(parts["transformer"], "auto" if storage == "bf16" else storage, dtype, device)
    if device.type == "meta":  # sizes only (the tests plan the GPU rows from these)
        return parts
    for key, module in parts.items():
        if isinstance(module, torch.nn.Module):
            parts[key] = module.to("cpu")
    free(device)
    return parts


def handles_e2e(parts: dict, device: torch.device) -> tuple:
    """(model, text encoders, VAE, parts by plan name -> (value, module)) as CheckpointLoader makes them."""
    from app.models import families
    from app.models.handles import ModelHandle, TextEncoders, VAEHandle

    family = parts["family"]
    dtype = next(parts["vae"].parameters()).dtype
    scheduler = dict(gpu_speed.MODELS[{"flux": "flux-dev", "sd3": "sd3.5-large"}[family]][6])
    model = ModelHandle(parts["transformer"], family, device, dtype, scheduler_config=scheduler, source=f"random {family}")
    slots = {slot: (parts[c.replace("text_encoder", "tokenizer")], parts[c])
             for slot, c in families.get(family).pipeline_text_slots.items()}
    encoders = TextEncoders(slots, family, device, dtype)
    vae = VAEHandle(parts["vae"], device, dtype)
    named = {"transformer": (model, model.transformer), **{s: (encoders, m) for s, (_, m) in slots.items()},
             "vae": (vae, vae.vae)}
    return model, encoders, vae, named


def plan_e2e(named: dict, family: str, plan: str, memory: dict, device: torch.device):
    """The loader's plan for the parts (measured as stored: build_e2e applied the storage)."""
    from app.models.budget import plan_loaded

    roles = {n: "transformer" if n == "transformer" else "vae" if n == "vae" else "text_encoder" for n in named}
    return plan_loaded({n: (m, roles[n]) for n, (_, m) in named.items()}, plan, memory, device, family=family)


def run_e2e(model, encoders, vae, size: int, steps: int, stage=None, prefix: str = "",
            conditioning: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latent, image): TextEncode(Pair) -> EmptyLatent -> Sampler -> VAEDecode, as a workflow runs them;
    ``stage`` (a :class:`Stages`) records each of encode, sample and decode under ``prefix``;
    ``conditioning`` receives the encoded tensors (:func:`conditioning_tensors`)."""
    import contextlib

    from nodes.latent import EmptyLatent, VAEDecode
    from nodes.sampling import Sampler

    step = stage or (lambda name: contextlib.nullcontext())
    with step(prefix + "encode"):
        pos, neg, cfg = encode_e2e(model, encoders)
    if conditioning is not None:
        conditioning.update(conditioning_tensors(pos, neg))
    with step(prefix + "sample"):
        latent = EmptyLatent(model, vae, size, size, 1)
        out = Sampler(model, pos, latent, neg, seed=0, steps=steps, cfg=cfg)
    with step(prefix + "decode"):
        image = VAEDecode(vae, out)
    return out.samples, image


def conditioning_tensors(pos, neg) -> dict[str, torch.Tensor]:
    """The encoded prompt's tensors on the CPU by name (positive/negative embeds and pooled)."""
    return {f"{side}.{name}": value.float().cpu() for side, cond in (("positive", pos), ("negative", neg))
            if cond is not None for name in ("embeds", "pooled") if (value := getattr(cond, name)) is not None}


def relative_drift(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def encode_e2e(model, encoders) -> tuple:
    """(positive, negative or None, cfg) as the family's workflow encodes the bench prompt."""
    from app.models import families
    from nodes.text import TextEncode, TextEncodePair

    family = families.get(model.family)
    guided = family.distilled_guidance is None
    prompt = "a photo of a red fox sitting in fresh snow, morning light, highly detailed"
    pos, neg = TextEncodePair(encoders, prompt, "") if guided else (TextEncode(encoders, prompt), None)
    return pos, neg, family.default_cfg if guided else 1.0


# The CUDA caching allocator's counters (torch.cuda.memory_stats) that say it went to the driver:
# a retry is an allocation that found no cached block of its stream and, at the cap, first had
# to synchronise and free every cached segment (cudaFree syncs the device)
ALLOCATOR_COUNTS = {"alloc_retries": "num_alloc_retries", "device_allocs": "num_device_alloc",
                    "device_frees": "num_device_free"}


def allocator_counts(device: torch.device) -> dict[str, int]:
    stats = torch.cuda.memory_stats(device)
    return {name: stats.get(key, 0) for name, key in ALLOCATOR_COUNTS.items()}


# Host calls that wait for the GPU or go to the driver, counted per profiled step
HOST_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaFree", "cudaMalloc")


def profile_sampling(model, encoders, vae, size: int, device: torch.device, streamed: int = 0,
                     steps: int = gpu_speed.PROFILED_STEPS) -> dict:
    """Where a sampling step's time goes with the row's placement under its cap: one sampling run
    of ``steps`` + 1 steps under torch.profiler, measured from the end of its first step (the
    run's setup and the first block's prefetch are not a step's cost) to the end of the device's
    work; :func:`step_profile` per step, the allocator's counters over those steps, and with
    ``streamed`` (the transformer's bytes the plan streams each step) the copy rate it got."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from app.core.context import current
    from nodes.latent import EmptyLatent
    from nodes.sampling import Sampler

    cuda = device.type == "cuda"
    pos, neg, cfg = encode_e2e(model, encoders)
    latent = EmptyLatent(model, vae, size, size, 1)
    ctx, window, counts = current(), record_function(gpu_speed.STEPS_LABEL), {}
    emit = ctx.emit

    def mark(event: dict) -> None:  # the sampler reports after each step: open the window after the first
        if event.get("type") == "progress" and event["step"] in (1, event["total"]):
            counts[event["step"]] = allocator_counts(device) if cuda else {}
            if event["step"] == 1:
                window.__enter__()
            else:
                window.__exit__(None, None, None)
        emit(event)

    ctx.emit = mark
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            Sampler(model, pos, latent, neg, seed=0, steps=steps + 1, cfg=cfg)
            gpu_speed.sync(device)
    finally:
        ctx.emit = emit
    row = step_profile(list(prof.events()), steps, cuda)
    if cuda:
        row["allocator_per_step"] = {k: (counts[steps + 1][k] - counts[1][k]) / steps for k in ALLOCATOR_COUNTS}
        row["streamed_gib_per_step"] = streamed / 2**30
        row["h2d_gb_per_s"] = streamed / 1e9 / (row["h2d_ms"] / 1000) if streamed and row["h2d_ms"] else None
    return row


def step_profile(events: list, steps: int, cuda: bool) -> dict:
    """Per step of a profiled window (the ``gpu_speed.STEPS_LABEL`` range): ``host_ms`` and
    ``host_calls`` (:data:`HOST_CALLS`: count and host ms); on CUDA, from the device activities
    that started in the window on: ``wall_ms`` (to the last one's end), ``busy_ms_by_kind``
    (gpu_speed's kernel kinds, host-to-device copies as "h2d"), ``h2d_ms`` and
    ``h2d_overlapped`` (the share of copy time that some kernel ran beside: 0 = the block
    streaming hides nothing), ``idle_ms`` (no activity on any stream), ``pageable_h2d``
    (copies from unpinned RAM: each synchronises), gpu_speed's ``timeline`` and ``host_syncs``."""
    cpu = torch.autograd.DeviceType.CPU
    window = next(e for e in events if e.name == gpu_speed.STEPS_LABEL and e.device_type == cpu)
    start, end = window.time_range.start, window.time_range.end
    calls = {name: {"per_step": 0.0, "ms": 0.0} for name in HOST_CALLS}
    for event in events:
        if event.name in calls and event.device_type == cpu and start <= event.time_range.start <= end:
            calls[event.name]["per_step"] += 1 / steps
            calls[event.name]["ms"] += (event.time_range.end - event.time_range.start) / 1000 / steps
    row = {"steps": steps, "host_ms": (end - start) / 1000 / steps, "host_calls": calls}
    if not cuda:
        row["device"] = "skipped: a CPU run has no device timeline"
        return row
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in gpu_speed.device_events(events)
             if e.time_range.start >= start]
    copies = [s for s in spans if "HtoD" in s[2]]
    kernels = [s for s in spans if not s[2].startswith(("Memcpy", "Memset"))]
    kinds: dict[str, float] = {}
    for begin, stop, name in spans:
        kind = "h2d" if "HtoD" in name else gpu_speed.kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + (stop - begin) / 1000 / steps
    h2d = covered(copies)
    row.update(wall_ms=(max((s[1] for s in spans), default=start) - start) / 1000 / steps,
               busy_ms_by_kind=dict(sorted(kinds.items(), key=lambda kv: -kv[1])), h2d_ms=h2d / 1000 / steps,
               h2d_overlapped=overlap(copies, kernels) / h2d if h2d else None,
               pageable_h2d=sum("Pageable" in s[2] for s in copies) / steps,
               timeline=gpu_speed.timeline(spans, start, steps),
               host_syncs=gpu_speed.host_syncs(events, start, end, steps))
    row["idle_ms"] = row["wall_ms"] - covered(spans) / 1000 / steps
    return row


def merged(spans: list[tuple]) -> list[tuple[float, float]]:
    """The union of (start, end, ...) intervals as disjoint (start, end), in order."""
    out: list[list[float]] = []
    for begin, stop, *_ in sorted(spans):
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([begin, stop])
    return [(a, b) for a, b in out]


def covered(spans: list[tuple]) -> float:
    """Time inside at least one of ``spans``."""
    return sum(b - a for a, b in merged(spans))


def overlap(first: list[tuple], second: list[tuple]) -> float:
    """Time inside both some interval of ``first`` and some of ``second``."""
    a, b, i, j, both = merged(first), merged(second), 0, 0, 0.0
    while i < len(a) and j < len(b):
        both += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return both


class Stages:
    """Records a row's stages: per finished stage its seconds and, on CUDA, the GiB allocated at
    its end, its peak and reserved (peak statistics reset at each start: ``reserved_gib`` is at
    least what was reserved when it started), ``reserved_end_gib`` and the allocator's
    :data:`ALLOCATOR_COUNTS` during the stage; ``row["stage"]`` names
    the one running, so a failure says where it happened. ``save`` runs after each stage (a row
    subprocess writes its partial result: a row that times out still says how far it got)."""

    def __init__(self, device: torch.device, row: dict, save=lambda: None):
        self.device, self.row, self.save = device, row, save
        row["stages"] = {}

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def stage():
            self.row["stage"] = name
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
                counts = allocator_counts(self.device)
            started = time.perf_counter()
            yield
            entry = {"s": round(time.perf_counter() - started, 3)}
            if cuda:
                entry.update(allocated_gib=torch.cuda.memory_allocated(self.device) / 2**30,
                             peak_gib=torch.cuda.max_memory_allocated(self.device) / 2**30,
                             reserved_gib=torch.cuda.max_memory_reserved(self.device) / 2**30,
                             reserved_end_gib=torch.cuda.memory_reserved(self.device) / 2**30,
                             **{k: v - counts[k] for k, v in allocator_counts(self.device).items()})
            self.row["stages"][name] = entry
            del self.row["stage"]
            self.save()

        return stage()

    def most(self, key: str, names: tuple[str, ...]) -> float | None:
        """The largest ``key`` over the stages whose name ends with one of ``names``."""
        values = [v[key] for k, v in self.row["stages"].items() if k.endswith(names) and key in v]
        return max(values) if values else None


SNAPSHOT_LIMIT = 14 * 2**20  # bytes: what a device run can send back


def start_history(entries: int = 20000) -> None:
    """Record the CUDA allocator's history (Python stacks, the last ``entries`` events) for :func:`dump_snapshot`."""
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=entries)


def dump_snapshot(path: Path, limit: int = SNAPSHOT_LIMIT) -> dict:
    """The allocator snapshot (pytorch.org/memory_viz reads it) pickled to ``path``, its event
    history cut from the oldest end, then its stack frames dropped, until under ``limit``
    bytes; returns where the live bytes were allocated (the largest 12 places)."""
    import pickle

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    places = live_by_place(snapshot)  # before any stack frames are dropped
    traces = snapshot.get("device_traces", [])
    keep = max((len(t) for t in traces), default=0)
    while True:
        data = pickle.dumps({**snapshot, "device_traces": [t[-keep:] if keep else [] for t in traces]})
        if len(data) <= limit:
            break
        if keep:
            keep //= 2
            continue
        for segment in snapshot.get("segments", []):
            for block in segment.get("blocks", []):
                block.pop("frames", None)
        data = pickle.dumps({**snapshot, "device_traces": []})
        break
    path.write_bytes(data)
    return {"file": path.name, "bytes": len(data), "events_kept": keep, "live_by_place": places}


def live_by_place(snapshot: dict, top: int = 12) -> list[dict]:
    """GiB of live allocations grouped by the first stack frame outside torch (where they were made)."""
    places: dict[str, int] = {}
    for segment in snapshot.get("segments", []):
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = [f for f in block.get("frames", []) if "/torch/" not in f.get("filename", "")]
            where = f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "unknown"
            places[where] = places.get(where, 0) + block.get("size", 0)
    ranked = sorted(places.items(), key=lambda kv: -kv[1])[:top]
    return [{"where": where, "gib": round(size / 2**30, 3)} for where, size in ranked]


def _context(memory: dict, device: torch.device):
    """A run context carrying the budget (VAEDecode reads it to decide on tiles)."""
    import threading

    from app.core.context import RunContext

    return RunContext("bench", "e2e", "bench", device, Path.cwd(), {}, lambda e: None, threading.Event(), memory=memory)


def _tiny_budget(parts: dict, cap_gib: float | None, size: int) -> int:
    """--tiny on CPU: a cap scaled to the tiny models, as far from the least they run in towards
    all of them resident as ``cap_gib`` is from 4 to 24 GiB (0: no cap)."""
    from app.models.budget import needs_of
    from app.models.memory import min_need

    if not cap_gib:
        return 0
    modules = {k: (v, "transformer" if k == "transformer" else "vae" if k == "vae" else "text_encoder")
               for k, v in parts.items() if isinstance(v, torch.nn.Module)}
    needs = needs_of(modules, parts["family"], {"size": (size, size)})
    encoders = [n for n in needs if n.role == "text_encoder"]  # on the GPU together while they encode
    low = max([min_need(n) for n in needs if n not in encoders]
              + [sum(min_need(n) - n.work for n in encoders) + max(n.work for n in encoders)])
    high = sum(n.weight_bytes for n in needs) + max(n.work for n in needs)
    return int(low + (high - low) * min(1.0, max(0.0, (cap_gib - 4) / 20)))


def _reserve(args, budget: int) -> int:
    """--reserve GiB under a GPU cap (the allocator's fragmentation and the CUDA caching slack
    the plan does not model); on CPU (--tiny) none: the tiny budgets are a few MiB wide."""
    return int(args.reserve * 2**30) if budget and not args.tiny else 0


def _host_stats(device: torch.device) -> dict:
    import resource

    stats = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        stats["pinned_gib"] = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**30
    return stats


def e2e_row(name: str, cap: float | None, storage: str, plan: str, args, device: torch.device,
            save=lambda row: None) -> dict:
    """One end-to-end row: build, cap, plan and place, a 2-step warm-up, one timed image. A row
    that fails still returns how far it got: its plan (``plan``, ``plan_lines``), each finished
    stage's seconds and GiB (``stages``), the stage it failed in (``failed_stage``), the GiB
    allocated then, and the error; with --memory-history an allocator snapshot beside --out."""
    import time

    from app.core.context import reset_current, set_current
    from app.models.budget import place
    from app.models.memory import describe

    started = time.perf_counter()
    size = E2E_TINY_SIZE if args.tiny else E2E_SIZE
    row: dict = {"model": name, "cap_gib": cap, "storage": storage, "plan_requested": plan,
                 "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),  # what this process's allocator read
                 "share_copy_stream": residency.SHARE_COPY_STREAM, "fast_cast": weight_storage.FAST_CAST,
                 "spread_resident": memory_planner.SPREAD_RESIDENT}
    stage = Stages(device, row, lambda: save(row))
    cuda = device.type == "cuda"
    if weight_storage.FAST_CAST and device.type in weight_storage.FAST_CAST_DEVICES:
        # every fp8 bit pattern through the compiled cast against .to() on this device: whether a
        # drift seen with --fast-cast is the kernel's (zeros: it is exact here)
        row["fast_cast_mismatches"] = weight_storage.fast_cast_mismatches(device)
    try:
        with stage("build"):
            parts = build_e2e(name, device, args.tiny, storage)
        budget = cap_memory(device, cap) if cuda else _tiny_budget(parts, cap, size)
        memory = {"vram": budget, "reserve": _reserve(args, budget), "size": (size, size)} if budget else {"size": (size, size)}
        row["reserve_gib"] = memory.get("reserve", 0) / 2**30
        if cuda and args.memory_history:
            start_history()
        token = set_current(_context(memory, device))
        try:
            with stage("plan"):
                model, encoders, vae, named = handles_e2e(parts, device)
                chosen = plan_e2e(named, parts["family"], plan, memory, device)
                described = describe(chosen)
                row["plan"] = {p["name"]: {k: p[k] for k in ("mode", "resident_blocks", "blocks", "tiled", "peak")}
                               for p in described["models"]}
                row["plan_lines"] = described["lines"]
            with stage("place"):
                place(chosen, {n: v for n, (v, _) in named.items()}, {n: m for n, (_, m) in named.items()}, device)
            run_e2e(model, encoders, vae, size, 2, stage, "warmup ")  # pins, first copies, kernels
            conditioning: dict = {}
            seconds, (final, image) = gpu_speed.timed(
                lambda: run_e2e(model, encoders, vae, size, args.steps, stage, conditioning=conditioning), device)
            # the same image again: a placement that overlaps copies with compute must give the
            # same bits each time (an unequal repeat is a race, not fp8's rounding)
            repeats = [run_e2e(model, encoders, vae, size, args.steps)[0].float().cpu() for _ in range(args.repeat - 1)]
            if args.profile:  # after the timed image, whose time stays the profiler's-free one
                try:  # the breakdown must not lose the row's measurements
                    streamed = sum(p.weight_bytes - p.resident_bytes for p in chosen.placements
                                   if p.name == "transformer" and p.mode in ("stream", "blocks"))
                    with stage("profile"):
                        row["profile"] = profile_sampling(model, encoders, vae, size, device, streamed)
                except Exception as exc:
                    row["profile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    row.pop("stage", None)
        finally:
            reset_current(token)
            row["fast_cast"] = weight_storage.FAST_CAST  # as the row ends: a failed compile turns it off
            if cuda:
                cap_memory(device, None)
    except Exception as exc:  # an OOM or a refusal is a result: say where, with what was on the GPU
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["failed_stage"] = row.pop("stage", None)
        if cuda:
            row["allocated_gib_at_error"] = torch.cuda.memory_allocated(device) / 2**30
            if args.memory_history:
                slug = "".join(c if c.isalnum() else "_" for c in f"{name}_{cap}_{storage}_{plan}")
                row["snapshot"] = dump_snapshot(Path(args.out).with_name(f"gpu_memory_{slug}_error.pickle"))
        row.update(_host_stats(device))
        row["row_s"] = time.perf_counter() - started
        return row
    if cuda and args.memory_history:
        torch.cuda.memory._record_memory_history(enabled=None)
    row["build_s"], row["place_s"] = row["stages"]["build"]["s"], row["stages"]["place"]["s"]
    row.update(s_per_image=seconds, finite=bool(torch.isfinite(final).all() and torch.isfinite(image).all()))
    if cuda:
        runs = ("encode", "sample", "decode")  # from the warm-up on, as before the stages were recorded
        row["peak_gib"], row["reserved_gib"] = stage.most("peak_gib", runs), stage.most("reserved_gib", runs)
        row["under_cap"] = not cap or row["reserved_gib"] <= cap
    row.update(_host_stats(device))
    reference = reference_path(args.out, name)
    reference_conditioning = reference.with_name(f"gpu_memory_{name}_reference_conditioning.pt")
    final = final.float().cpu()
    if cap is None and storage == "bf16" and plan == "resident":
        reference.parent.mkdir(parents=True, exist_ok=True)  # --out may name a folder not made yet
        torch.save(final, reference)
        torch.save(conditioning, reference_conditioning)
    if reference.is_file():
        ref = torch.load(reference, weights_only=True)
        row["drift"] = relative_drift(final, ref)
        if repeats:
            row["repeat_drifts"] = [relative_drift(again, ref) for again in repeats]
    if repeats:
        row["repeats_equal"] = all(torch.equal(again, final) for again in repeats)
    if reference_conditioning.is_file():  # the text encoders keep bf16 in every row: ~0 unless a copy raced
        ref_cond = torch.load(reference_conditioning, weights_only=True)
        row["encode_drift"] = {k: relative_drift(v, ref_cond[k]) for k, v in conditioning.items() if k in ref_cond}
    row["row_s"] = time.perf_counter() - started
    return row


def reference_path(out: str, name: str) -> Path:
    """Where ``name``'s bf16 resident uncapped row keeps its final latent, beside --out."""
    return Path(out).with_name(f"gpu_memory_{name}_reference.pt")


def serialise_copies() -> None:
    """Make every diffusers group onload wait for all the device's queued work first (--serial-copies)."""
    from diffusers.hooks.group_offloading import ModuleGroup

    onload = ModuleGroup.onload_

    def serial_onload(group) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        onload(group)
        if group.stream is not None:
            group.stream.synchronize()

    ModuleGroup.onload_ = serial_onload


def parse_row(spec: str) -> tuple[str, float | None, str, str]:
    """model/cap/storage/plan (cap "none": uncapped) -> a row."""
    try:
        name, cap, storage, plan = spec.strip().split("/")
        return name, None if cap in ("none", "0", "") else float(cap), storage, plan
    except ValueError:
        raise SystemExit(f"--rows: {spec!r} is not model/cap/storage/plan (e.g. flux-dev/12/fp8_e4m3/auto)") from None


def e2e_rows(args) -> list[tuple[str, float | None, str, str]]:
    """(model, cap GiB or None, storage, plan) of every row asked for: ``--rows`` as
    model/cap/storage/plan (cap "none"), else the grid of --models × caps × storages × plans,
    each model's bf16 resident uncapped row first (the drift reference); "none": no rows (the
    switch test alone)."""
    if args.rows == "none":
        return []
    if args.rows:
        rows = [parse_row(spec) for spec in args.rows.split(",")]
    else:
        rows = [(n, c, s, p) for n in args.models for c in [None, *args.caps] for s in args.storages for p in args.plans]
    reference = [(n, None, "bf16", "resident") for n in dict.fromkeys(r[0] for r in rows)]
    if args.reuse_reference:  # a reference latent already beside --out (same configs, --steps as it was)
        reference = [r for r in reference if not reference_path(args.out, r[0]).is_file()]
    rows = reference + [r for r in rows if r not in reference]
    bad = [r for r in rows if r[0] not in MODELS or r[2] not in STORAGES or r[3] not in PLANS]
    if bad:
        raise SystemExit(f"unknown rows {bad}; models: {', '.join(MODELS)}; storages: {', '.join(STORAGES)}; "
                         f"plans: {', '.join(PLANS)}")
    return rows


def row_label(row: tuple[str, float | None, str, str]) -> str:
    name, cap, storage, plan = row
    return f"{name} cap={cap or 'none'} {storage} {plan}"


def variant(args) -> str:
    """What the row labels add for the A/B options (--alloc-conf, --share-copy-stream, --fast-cast,
    --prefix-resident, --serial-copies)."""
    return (f" alloc={args.alloc_conf}" if args.alloc_conf else "") + (" shared-stream" if args.share_copy_stream else "") \
        + (" fast-cast" if args.fast_cast else "") + (" prefix-resident" if args.prefix_resident else "") \
        + (" serial-copies" if args.serial_copies else "")


def run_row_isolated(row: tuple, args, timeout: float) -> dict:
    """One row in a subprocess of its own (``--one-row``): its cap, statistics and host RAM are
    its own, and a crash or hang is a result rather than the end of the run."""
    import json
    import subprocess
    import tempfile

    name, cap, storage, plan = row
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        target = Path(handle.name)
    command = [sys.executable, "-m", "bench.gpu_memory", "--e2e", "--one-row", f"{name}/{cap or 'none'}/{storage}/{plan}",
               "--steps", str(args.steps), "--reserve", str(args.reserve), "--out", args.out, "--row-out", str(target)] \
        + (["--tiny"] if args.tiny else []) + (["--memory-history"] if args.memory_history else []) \
        + (["--profile"] if args.profile else []) + (["--share-copy-stream"] if args.share_copy_stream else []) \
        + (["--fast-cast"] if args.fast_cast else []) + (["--prefix-resident"] if args.prefix_resident else []) \
        + (["--serial-copies"] if args.serial_copies else []) + ["--repeat", str(args.repeat)]
    env = {**os.environ, **({"PYTORCH_CUDA_ALLOC_CONF": args.alloc_conf} if args.alloc_conf else {})}
    try:
        done = subprocess.run(command, cwd=ROOT, timeout=timeout, capture_output=True, text=True, env=env)
        error = f"exit {done.returncode}: {(done.stderr or done.stdout)[-600:]}"
    except subprocess.TimeoutExpired:
        done, error = None, f"timed out after {timeout:.0f} s"
    finally:
        text = target.read_text() if target.is_file() else ""
        target.unlink(missing_ok=True)
    row = json.loads(text) if text else {}  # the subprocess writes its row after each stage
    if done is None or ("error" not in row and "s_per_image" not in row):
        row["error"] = error  # it hung or died: the stages it finished, and where it was
        if "stage" in row:
            row["failed_stage"] = row.pop("stage")
    return row


def e2e_switch(args, device: torch.device, report: dict | None = None, save=lambda: None) -> dict:
    """Flux-dev -> SD3.5-large -> Flux-dev under one cap in one process: each model's parts are
    one memo entry, the planner makes room by LRU before placing; the third stage reuses what
    the budget let stay (its entry, not rebuilt, not re-placed)."""
    import time

    from app.core.context import reset_current, set_current
    from app.core.memo import MemoCache
    from app.models.budget import place
    from app.models.memory import describe

    size = E2E_TINY_SIZE if args.tiny else E2E_SIZE
    built = {name: build_e2e(name, device, args.tiny, args.switch_storage) for name in ("flux-dev", "sd3.5-large")}
    budget = cap_memory(device, args.switch_cap) if device.type == "cuda" else _tiny_budget(
        built["flux-dev"], args.switch_cap, size)
    cache = MemoCache(max_bytes=1 << 50, max_device_bytes=budget)
    memory = {"vram": budget, "reserve": _reserve(args, budget), "size": (size, size), "make_room": cache.make_room}
    stages: list[dict] = []
    result = {"cap_gib": args.switch_cap, "storage": args.switch_storage, "stages": stages}
    if report is not None:  # saved after every stage: a run cut short keeps the stages it finished
        report["switch_e2e"] = result
    token = set_current(_context(memory, device))
    try:
        for step, name in enumerate(("flux-dev", "sd3.5-large", "flux-dev")):
            stage: dict = {"model": name}
            if device.type == "cuda":  # the plan stage's reserved_end_gib: after make_room's eviction
                stage["reserved_gib_before"] = torch.cuda.memory_reserved(device) / 2**30
            started = time.perf_counter()
            record = Stages(device, stage)  # per phase: seconds, GiB allocated at its end and its peak
            try:
                entry = cache.get(name)
                if entry is None:
                    with record("plan"):
                        model, encoders, vae, named = handles_e2e(built[name], device)
                        chosen = plan_e2e(named, built[name]["family"], "auto", memory, device)
                        stage["plan"] = {p.name: p.mode for p in chosen.placements}
                        stage["plan_lines"] = describe(chosen)["lines"]
                    with record("place"):
                        place(chosen, {n: v for n, (v, _) in named.items()}, {n: m for n, (_, m) in named.items()},
                              device)
                    cache.put(name, (model, encoders, vae))
                else:
                    model, encoders, vae = entry.outputs
                    stage["reused"] = True
                    stage["resident_gib_before"] = (torch.cuda.memory_allocated(device) / 2**30
                                                    if device.type == "cuda" else None)
                    with record("place"):
                        model.ensure_device()
                final, image = run_e2e(model, encoders, vae, size, args.steps, record)
                stage["finite"] = bool(torch.isfinite(final).all() and torch.isfinite(image).all())
                if device.type == "cuda":
                    phases = ("place", "encode", "sample", "decode")
                    stage["peak_gib"], stage["reserved_gib"] = record.most("peak_gib", phases), record.most(
                        "reserved_gib", phases)
                    stage["under_cap"] = stage["reserved_gib"] <= args.switch_cap
            except Exception as exc:  # an OOM is the result this test exists to catch
                stage["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                stage["failed_stage"] = stage.pop("stage", None)
                if device.type == "cuda":
                    stage["allocated_gib_at_error"] = torch.cuda.memory_allocated(device) / 2**30
            stage["s"] = time.perf_counter() - started
            stage["memo_device_gib"] = cache.device_bytes / 2**30
            stages.append(stage)
            result.update(_host_stats(device))
            print(f"switch {step}: {stage}", flush=True)
            save()
    finally:
        reset_current(token)
        if device.type == "cuda":
            cap_memory(device, None)
    return result


def main_e2e(args, device: torch.device, report: dict, save) -> None:
    rows = e2e_rows(args)
    isolate = (device.type == "cuda" or args.isolate) and not args.in_process
    result = report.setdefault("e2e", {"size": E2E_TINY_SIZE if args.tiny else E2E_SIZE, "steps": args.steps,
                                       "isolated": isolate, "rows": {}})
    for row in rows:
        label = row_label(row) + variant(args)
        if isolate:
            outcome = run_row_isolated(row, args, args.row_timeout)
        else:
            try:
                outcome = e2e_row(*row, args, device)
            except Exception as exc:  # OOM or a refusal: a result, and the others still run
                outcome = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            free(device)
        result["rows"][label] = outcome
        print(f"{label}: {outcome}", flush=True)
        save()
    if args.switch_cap:
        e2e_switch(args, device, report, save)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--caps", default="12,8", help="GiB caps besides the uncapped run, comma-separated")
    parser.add_argument("--storages", default=",".join(STORAGES))
    parser.add_argument("--plans", default=",".join(PLANS), help="--e2e grid: residency plans")
    parser.add_argument("--switch-cap", type=float, default=16.0, help="GiB for the switch test (0: skip it)")
    parser.add_argument("--switch-storage", default="bf16", help="--e2e switch test: the transformers' storage")
    parser.add_argument("--reserve", type=float, default=1.0, help="--e2e: GiB of a cap the plan leaves free "
                                                                     "(--reserve-vram; fragmentation headroom)")
    parser.add_argument("--e2e", action="store_true", help="end to end: text encoders + transformer + VAE")
    parser.add_argument("--rows", default="", help="--e2e: only these rows, model/cap/storage/plan comma-separated "
                                                     "(cap 'none'), e.g. flux-dev/12/fp8_e4m3/auto; 'none': no rows")
    parser.add_argument("--row-timeout", type=float, default=420.0, help="--e2e on a GPU: seconds per row subprocess")
    parser.add_argument("--in-process", action="store_true", help="--e2e on a GPU: rows in this process (no isolation)")
    parser.add_argument("--isolate", action="store_true", help="--e2e: rows in subprocesses on CPU too (tests)")
    parser.add_argument("--memory-history", action="store_true",
                        help="--e2e on a GPU: record the CUDA allocator's history; a failed row dumps a snapshot "
                             "(under 14 MB) beside --out and lists where its live bytes were allocated")
    parser.add_argument("--profile", action="store_true",
                        help="--e2e: after the timed image, profile sampling steps under the row's cap (profile_sampling)")
    parser.add_argument("--alloc-conf", default="",
                        help="PYTORCH_CUDA_ALLOC_CONF for the rows' subprocesses and this process (e.g. "
                             "expandable_segments:True); recorded per row, and in the row labels")
    parser.add_argument("--share-copy-stream", action="store_true",
                        help="streamed models share one copy stream (app/models/residency.py SHARE_COPY_STREAM)")
    parser.add_argument("--fast-cast", action="store_true",
                        help="fp8 weights upcast by the compiled cast, not eager .to() (app/models/storage.py FAST_CAST)")
    parser.add_argument("--prefix-resident", action="store_true",
                        help="a streamed model keeps its first blocks, not blocks spread among the streamed ones "
                             "(app/models/memory.py SPREAD_RESIDENT)")
    parser.add_argument("--one-row", default="", help=argparse.SUPPRESS)  # a row's subprocess
    parser.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1,
                        help="--e2e: images per row after the timed one's first (repeat_drifts, repeats_equal: "
                             "whether the placement gives the same bits each time)")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="--e2e: skip a model's bf16 resident uncapped row when its reference latent is already "
                             "beside --out (from a run with the same --steps)")
    parser.add_argument("--serial-copies", action="store_true",
                        help="--e2e: the device finishes all queued work before each streamed block's copy "
                             "starts (no copy overlaps compute: a race control)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (a smoke test of every path)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (28; --tiny: 2)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_memory.json"))
    args = parser.parse_args(argv)
    if args.alloc_conf:  # before CUDA starts: the allocator reads it once (in-process rows, the switch test)
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    residency.SHARE_COPY_STREAM = args.share_copy_stream
    if args.serial_copies:
        serialise_copies()
    weight_storage.FAST_CAST = args.fast_cast
    memory_planner.SPREAD_RESIDENT = not args.prefix_resident
    args.steps = args.steps or (2 if args.tiny else 28)
    args.caps = [float(c) for c in args.caps.split(",") if c.strip()]
    args.storages = [s for s in args.storages.split(",") if s]
    args.plans = [p for p in args.plans.split(",") if p]
    args.models = [n for n in args.models.split(",") if n]
    if unknown := [n for n in args.models if n not in MODELS] + [s for s in args.storages if s not in STORAGES] \
            + [p for p in args.plans if p not in PLANS] + ([args.switch_storage] if args.switch_storage not in STORAGES else []):
        parser.error(f"unknown {unknown}; models: {', '.join(MODELS)}; storages: {', '.join(STORAGES)}; "
                     f"plans: {', '.join(PLANS)}")
    # an explicit index: set_per_process_memory_fraction refuses a bare "cuda"
    device = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device(
        "cuda", torch.cuda.current_device())
    if args.one_row:  # the subprocess of one --e2e row: its result goes to --row-out
        import json

        def write(row: dict) -> None:
            Path(args.row_out).write_text(json.dumps(row))

        try:
            row = e2e_row(*parse_row(args.one_row), args, device, write)
        except Exception as exc:  # e2e_row records its own failures; anything else is still a result
            row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        write(row)
        return row
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "tiny": args.tiny, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "versions": gpu_speed.versions(), "models": {}}

    def save() -> None:
        write_result("gpu_memory", {"gpu_memory": report}, args.out)

    if args.e2e:
        main_e2e(args, device, report, save)
        return report
    for name in args.models:
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
