"""GPU speed benchmark: eager vs compiled vs quantized+compiled vs attention backends.

    python -m bench.gpu_speed [--quick] [--models all|flux-dev,pixart-sigma,sd3.5-medium]
                              [--variants all|eager,compile,...] [--out PATH]
    python -m bench.gpu_speed --tiny          # CPU smoke run of every code path (tiny configs)

Models: Flux-dev, PixArt-Σ, SD3.5-medium (1024², 28 steps) and the few-step Flux-schnell (4 steps,
no CFG) and Sana-Sprint 1.6B (1 step, 32×32 DC-AE latents). Random full-size weights (parameters created on the meta device, then drawn on the GPU; the
buffers are computed as usual), 1024², 28 steps, bf16, one image. Per model and variant:

- ``e2e_s``: the sampling loop through the engine (ModelHandle + sampler, CFG as the family's
  pipeline does; no text encoders, no VAE), median of ``repeats`` runs after a warm-up run
  (which is where compilation happens: ``compile_s`` = warm-up time minus a normal run);
  ``e2e_ms_per_step`` / ``e2e_matmul_fraction``: the same per step (a cross-check);
- ``ms_per_step``: one step's transformer evaluations timed directly inside one open sampling
  run, as the sampler makes them: six steps back to back, one synchronisation at the end, so the
  host prepares the next step while the GPU runs this one; ``ms_per_step_synced``: the median
  step timed between two synchronisations (five, the first dropped; what ``ms_per_step`` was
  until 2026-12-02, when every step of a run also synchronised on its conditioning's copy from
  host memory); ``host_ms_per_step``: the host's time per step in the back-to-back run (less
  than ``ms_per_step``: the host keeps ahead of the GPU); ``step_graphs_compiled`` (0: the timed
  steps ran the compiled graphs built in the warm-up); ``recompile_limit_hits`` (empty: no
  compiled region fell back to eager past dynamo's recompile limit in this variant; each hit
  is dynamo's message). Before an earlier change each timed step
  opened a sampling run of its own, whose setup (a ``Module.to`` over the compiled view: ~10 ms
  on Flux, ~35 ms on PixArt fp8) was counted as step time;
- ``matmul_fraction``: FLOPs per step / time per step / the bf16 matmul ceiling measured in
  the same process (8192³ bf16 matmul); ``peak_gib`` (max allocated, including the bf16 base
  model kept for the drift reference) and ``weights_gib`` (the variant's transformer);
- ``drift``: relative L2 of the final latent vs eager bf16, same seed;
- ``profile`` (``--profile``): three steps back to back under torch.profiler: device ms per
  step by kernel family (attention, gemm, inductor's fused kernels, copies, eager elementwise,
  other), the busiest kernels, ``idle_ms`` (``ms_per_step`` minus device busy time: launch/host
  overhead, syncs; ``idle_synced_ms`` the same for ``ms_per_step_synced``), ``timeline`` (where
  the GPU idled: before the first kernel, in kernel switches, the largest gaps and what was
  around them) and ``host_syncs`` (host calls that waited for the GPU, per step, by op).

Variants, in order (a time budget cuts the last): eager, compile (CompileModel's defaults, which
--fast uses), fp8+compile, fp8-tensor+compile, the CUDA-graph and scope variants below,
compile-fused-qkv and fp8+compile-fused-qkv (diffusers'
``fuse_qkv_projections`` on a copy sharing the other weights; refused where the processors
ignore it), compile-fullgraph, compile-max-autotune (max-autotune-no-cudagraphs, without
coordinate descent), int8+compile, fp8+cudnn+compile-fused-qkv (all of the
above that helped, at once), one per attention backend (AttentionBackend's patch on the
eager model), compile-coordinate-descent. The CUDA-graph and scope variants:
compile-cudagraphs and fp8+compile-cudagraphs (reduce-overhead per block),
fp8+compile-max-autotune (inductor's fp8 GEMM templates), fp8+compile-model (the whole
transformer forward as one compiled region) and fp8+compile-model-cudagraphs (one CUDA graph per
step). A refused variant (fp8 before Ada, flex on SD3's
processors) is recorded with its reason. ``--quick`` (one 10-minute call per model on an
H200): 3 timed runs per variant instead of 5, attention backends with one run, no
flex/math/efficient, and no variant started after ``QUICK_BUDGET_S`` seconds. Results go to
bench/results/gpu_speed.json after every variant, so a time-out keeps what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cache import GPU_CONFIGS  # noqa: E402
from bench.common import RESULTS, write_result  # noqa: E402

SEED = 20261202
# --quick, per model: no variant starts after this, so a Flux-dev call (14 s build, the slowest
# variant ~1-2 min) ends inside one 10-minute device call
QUICK_BUDGET_S = 420.0
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SANA_SPRINT_1600M = dict(attention_bias=False, attention_head_dim=32, caption_channels=2304, cross_attention_dim=2240,
                         cross_attention_head_dim=112, guidance_embeds=True, guidance_embeds_scale=0.1, in_channels=32,
                         interpolation_scale=None, mlp_ratio=2.5, norm_elementwise_affine=False, norm_eps=1e-6,
                         num_attention_heads=70, num_cross_attention_heads=20, num_layers=20, out_channels=32,
                         patch_size=1, qk_norm="rms_norm_across_heads", sample_size=32, timestep_scale=1.0)
# name -> (family, diffusers class, config, text tokens, pooled width, cfg, scheduler config)
MODELS = {
    "flux-dev": ("flux", "FluxTransformer2DModel", GPU_CONFIGS["flux"], 512, 768, 1.0,
                 {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}),
    "pixart-sigma": ("pixart", "PixArtTransformer2DModel", GPU_CONFIGS["pixart"], 300, None, 4.5, {}),
    "sd3.5-medium": ("sd3", "SD3Transformer2DModel", SD35_MEDIUM, 333, 2048, 4.5, {"shift": 3.0}),
    # few-step (issue 20): schnell has no guidance embedding, shift 1.0, 4 steps, no CFG
    "flux-schnell": ("flux", "FluxTransformer2DModel", {**GPU_CONFIGS["flux"], "guidance_embeds": False}, 256, 768,
                     1.0, {"use_dynamic_shifting": False, "shift": 1.0}),
    # Sana-Sprint 1.6B 1024px: embedded guidance (scale 0.1), sCM/TrigFlow, 1 step, 32x32 DC-AE latents
    "sana-sprint": ("sana", "SanaTransformer2DModel", SANA_SPRINT_1600M, 300, None, 1.0, {}),
}
# per model: sampling steps (default --steps) and latent side at 1024² (default 128: an 8x VAE)
STEPS = {"flux-schnell": 4, "sana-sprint": 1}
LATENT_SIDE = {"sana-sprint": 32}
TINY = {  # the same classes at CPU-test size
    "flux-dev": dict(num_layers=1, num_single_layers=1, in_channels=16, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
    "pixart-sigma": dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
                         cross_attention_dim=16, sample_size=8),
    "sd3.5-medium": dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                         dual_attention_layers=(0,)),
    "flux-schnell": dict(num_layers=1, num_single_layers=1, in_channels=16, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
    "sana-sprint": dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                        num_cross_attention_heads=2, cross_attention_head_dim=8, caption_channels=32, in_channels=4,
                        out_channels=4, sample_size=8),
}


# ---------------------------------------------------------------------------------------------
# building a random full-size model


@contextlib.contextmanager
def parameters_on_meta():
    """Create parameters on the meta device (no memory, no init); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def random_transformer(class_name: str, config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with random weights drawn on ``device`` (Linear: std 1/sqrt(fan_in))."""
    import diffusers

    with parameters_on_meta():
        model = getattr(diffusers, class_name)(**config)
    model = model.to(dtype).eval()
    buffers = {name: b.to(device) for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.02, generator=generator)
            elif name.endswith("weight"):  # norm scales
                p.fill_(1.0)
            else:
                p.zero_()
    return model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    started = time.perf_counter()
    out = function()
    sync(device)
    return time.perf_counter() - started, out


def matmul_tflops(device: torch.device, tiny: bool) -> float:
    """The bf16 matmul ceiling of this device (fp32 512³ on CPU for --tiny)."""
    n, dtype = (512, torch.float32) if tiny else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device)[0] for _ in range(10)]
    return 2 * n**3 / statistics.median(times) / 1e12


def step_flops(run_step: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_step()
    return counter.get_total_flops()


def weights_gib(model) -> float:
    from app.core.memo import measure
    from app.models.compile import eager_base

    return sum(measure(eager_base(model.transformer)).values()) / 2**30


class Setup:
    """One model at benchmark size: the eager handle, its inputs, the eager reference."""

    def __init__(self, name: str, device: torch.device, tiny: bool, steps: int):
        from app.models.handles import ModelHandle
        from app.models.latents import Latent
        from app.models.sampling import compute_sigmas
        from nodes.text import Conditioning

        family, class_name, config, text_len, pooled, self.cfg, scheduler = MODELS[name]
        config = {**config, **(TINY[name] if tiny else {})}
        dtype = torch.float32 if tiny else torch.bfloat16
        self.build_s, transformer = timed(lambda: random_transformer(class_name, config, device, dtype), device)
        self.handle = ModelHandle(transformer, family, device, dtype, scheduler_config=scheduler)
        self.device, self.family = device, family
        size, text_len = (8, 7) if tiny else (LATENT_SIDE.get(name, 128), text_len)
        steps = STEPS.get(name, steps)
        width = config.get("joint_attention_dim", config.get("caption_channels"))
        pooled = config.get("pooled_projection_dim") if pooled else None
        g = torch.Generator().manual_seed(1)

        def cond() -> Conditioning:
            embeds = torch.randn(1, text_len, width, generator=g)
            mask = None if pooled else torch.ones(1, text_len, dtype=torch.long)
            return Conditioning(embeds, torch.randn(1, pooled, generator=g) if pooled else None, mask, family)

        self.pos = cond()
        self.neg = cond() if self.cfg > 1 else None
        self.latent = Latent(torch.zeros(1, self.handle.latent_channels, size, size))
        self.sigmas = compute_sigmas(self.handle, "auto", steps, latent_hw=(size, size))
        self.reference: torch.Tensor | None = None

    def sample(self, model, sigmas: torch.Tensor | None = None) -> torch.Tensor:
        from app.models.sampling import sample

        sigmas = self.sigmas if sigmas is None else sigmas
        return sample(model, self.latent, self.pos, self.neg, sigmas, SEED, self.cfg, progress=lambda *a: None,
                      preview=False).samples

    def step(self, model) -> Callable[[], object]:
        """One step's transformer evaluations (CFG: both branches, batched as the sampler does),
        in a sampling run of its own (for counting FLOPs)."""
        evaluate = self.evaluations(model)

        def run():
            with model.sampling_run(self.sigmas[:2]):
                return evaluate()

        return run

    def evaluations(self, model) -> Callable[[], object]:
        """One step's transformer evaluations inside an open sampling run (as the sampler makes
        them: on latents already on the device, whose copy in would synchronise every step)."""
        latents = torch.randn(self.latent.samples.shape, generator=torch.Generator().manual_seed(2)).to(self.device)
        conds = [self.pos] if self.neg is None else [self.neg, self.pos]
        sigma = float(self.sigmas[len(self.sigmas) // 2])
        return lambda: model.predict_many(latents, sigma, conds)

    def step_times(self, model, count: int = 6) -> dict:
        """Steps in one sampling run (the sampler opens one run for all its steps, so per-run setup
        is not a step's cost): ``synced`` seconds of ``count`` steps each between two
        synchronisations (the first dropped), ``back_to_back`` mean seconds of ``count`` steps
        run as the sampler runs them (one synchronisation at the end: the host prepares the next
        step while the GPU runs this one), ``host`` the host's seconds per step in that run (before
        the final synchronisation; below ``back_to_back``: the host keeps ahead of the GPU), and
        ``graphs`` compiled meanwhile (0 when the timed steps run the compiled path built already)."""
        from app.models.compile import graphs_compiled

        evaluate = self.evaluations(model)
        with model.sampling_run(self.sigmas):
            graphs = graphs_compiled()
            synced = [timed(evaluate, self.device)[0] for _ in range(count)]
            sync(self.device)
            started = time.perf_counter()
            for _ in range(count):
                evaluate()
            host = time.perf_counter() - started
            sync(self.device)
            back_to_back = time.perf_counter() - started
            return {"synced": synced[1:], "back_to_back": back_to_back / count, "host": host / count,
                    "graphs": graphs_compiled() - graphs}


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, patterns in KERNEL_KINDS if any(p in lowered for p in patterns)), "other")


PROFILED_STEPS = 3  # back to back, as the sampler runs them


def profile_step(setup: Setup, model, wall_ms: float, synced_ms: float | None = None) -> dict:
    """Where a step's time goes, from :data:`PROFILED_STEPS` steps profiled back to back: device
    time per step by kernel family (:data:`KERNEL_KINDS`; on CPU the aten ops' own time), the
    busiest kernels, ``idle_ms`` = the unprofiled step time ``wall_ms`` minus the device's busy
    time, i.e. what launch overhead, host work and syncs leave the GPU waiting (0 when the GPU is
    the bottleneck; ``idle_synced_ms`` the same for a step between two synchronisations), and on
    a GPU where that idle time lies (:func:`timeline`) and which host calls waited for the GPU
    (:func:`host_syncs`)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    evaluate = setup.evaluations(model)
    cuda = setup.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with model.sampling_run(setup.sigmas):
        evaluate()  # outside the profile: a CUDA-graph mode records here
        sync(setup.device)
        with profile(activities=activities) as prof:
            with record_function(STEPS_LABEL):
                for _ in range(PROFILED_STEPS):
                    evaluate()
            sync(setup.device)
    events = list(prof.events())
    device = device_events(events)
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in device if cuda else events:
        if cuda:
            us = event.device_time_total
        else:  # CPU: each aten op's own time, so nested ops are not counted twice
            if not event.name.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        ms = us / 1000 / PROFILED_STEPS
        kinds[kernel_kind(event.name)] = kinds.get(kernel_kind(event.name), 0.0) + ms
        kernels[event.name] = kernels.get(event.name, 0.0) + ms
    busy = sum(kinds.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    row = {"busy_ms": busy, "idle_ms": max(0.0, wall_ms - busy) if cuda else None,
           "ms_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
           "top_kernels": {name[:90]: ms for name, ms in top}}
    if cuda:
        if synced_ms is not None:
            row["idle_synced_ms"] = max(0.0, synced_ms - busy)
        try:  # the breakdown must not lose the row's measurements
            steps = next(e for e in events if e.name == STEPS_LABEL and e.device_type == torch.autograd.DeviceType.CPU)
            row["timeline"] = timeline([(e.time_range.start, e.time_range.end, e.name) for e in device],
                                       steps.time_range.start, PROFILED_STEPS)
            row["host_syncs"] = host_syncs(events, steps.time_range.start, steps.time_range.end, PROFILED_STEPS)
        except Exception as exc:
            row["timeline_error"] = f"{type(exc).__name__}: {exc}"
    return row


STEPS_LABEL = "ditgraph.profiled_steps"
LAUNCH_GAP_US = 20.0  # a gap between two kernels below this: the GPU switching kernels, not waiting for the host


def device_events(events: list) -> list:
    """The device's activities (kernels, copies, memsets), without the GPU-side copies of
    ``record_function`` ranges (which span whole stretches of the timeline)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name != STEPS_LABEL
            and not getattr(e, "is_user_annotation", False)]


def timeline(intervals: list[tuple[float, float, str]], started_us: float, steps: int) -> dict:
    """Where the GPU idles in a profiled window. ``intervals``: (start µs, end µs, name) of each
    device activity; ``started_us``: when the host started the steps. ``lead_ms``: from then to
    the first activity (the host preparing the first call with nothing queued); per step:
    ``gap_ms`` all gaps between activities after that, ``launch_gap_ms`` the part in gaps under
    :data:`LAUNCH_GAP_US` (kernel switches: fewer kernels or CUDA graphs shrink it); and the
    ``largest_gaps`` with the activities around them: waits for the host, such as a
    synchronisation or a stretch the host launches more slowly than the GPU runs it."""
    spans = sorted(intervals)
    if not spans:
        return {"lead_ms": None, "gap_ms": 0.0, "launch_gap_ms": 0.0, "gaps_per_step": 0.0, "largest_gaps": []}
    gaps = []
    end, previous = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, previous, name))
        if stop >= end:
            end, previous = stop, name
    largest = sorted(gaps, key=lambda g: -g[0])[:5]
    return {"lead_ms": max(0.0, spans[0][0] - started_us) / 1000,
            "gap_ms": sum(g[0] for g in gaps) / 1000 / steps,
            "launch_gap_ms": sum(g[0] for g in gaps if g[0] < LAUNCH_GAP_US) / 1000 / steps,
            "gaps_per_step": len(gaps) / steps,
            "largest_gaps": [{"ms": us / 1000, "previous": a[:60], "next": b[:60]} for us, a, b in largest]}


def host_syncs(events: list, started_us: float, ended_us: float, steps: int) -> dict:
    """Host calls that waited for the GPU between ``started_us`` and ``ended_us`` (CUDA runtime
    ``*Synchronize`` calls: a copy in from pageable host memory, ``.item()``, ``.cpu()``, an
    explicit sync): per step, and by the ops that made them, "outermost > innermost aten op"
    (``aten::to > aten::copy_``: a copy; ``aten::item > aten::_local_scalar_dense``: a value read)."""
    found: dict[str, int] = {}
    for event in events:
        if "Synchronize" not in event.name or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if not started_us <= event.time_range.start <= ended_us:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and parent.name != STEPS_LABEL:
            chain.append(parent.name)
            parent = parent.cpu_parent
        inner = next((name for name in chain if name.startswith("aten::")), event.name)
        outer = chain[-1] if chain else event.name
        key = outer if outer == inner else f"{outer} > {inner}"
        found[key] = found.get(key, 0) + 1
    return {"per_step": sum(found.values()) / steps, "by_op": found}


def fused_qkv(handle):
    """``handle`` with diffusers' fused QKV projections, on a copy sharing every other weight
    (the base stays unfused). The copy's separate q/k/v projections are removed, so processors
    that would ignore the fused ones fail (recorded as the variant's error) instead of
    measuring the unfused path."""
    from dataclasses import replace

    from app.models.compile import eager_base, shared_copy

    transformer = shared_copy(eager_base(handle.transformer))
    transformer.fuse_qkv_projections()
    fused = [m for m in transformer.modules() if getattr(m, "fused_projections", False) and hasattr(m, "to_qkv")]
    if not fused:
        raise ValueError(f"fused QKV: no attention module of {type(transformer).__name__} fused its projections")
    for module in fused:
        for name in ("to_q", "to_k", "to_v"):
            setattr(module, name, None)
    return replace(handle, transformer=transformer, _active=[], _cache={})


# compile settings compared (the first is CompileModel's default and --fast's)
COMPILES = {
    "compile": {},
    "compile-fullgraph": {"fullgraph": True},
    "compile-max-autotune": {"mode": "max-autotune-no-cudagraphs"},  # GEMM template search, no cd tuning
    "compile-coordinate-descent": {"tuning": "coordinate-descent"},
    # CUDA graphs: per block (57 recordings on Flux, one per block's weights) and one per step
    "compile-cudagraphs": {"mode": "reduce-overhead"},
    "compile-model": {"scope": "model"},
    "compile-model-cudagraphs": {"scope": "model", "mode": "reduce-overhead"},
}
# GPU time of a profiled step by kernel family: the first pattern a kernel's (lower-cased) name
# contains decides (attention before GEMM: cuDNN's and flash's kernels name both)
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax")),
    # inductor's fused pointwise/reduction kernels: norms, RoPE, gelu, fp8 activation scaling
    ("inductor", ("triton_poi", "triton_red", "triton_per")),
    # cuBLAS (nvjet/xmma/gemm), CUTLASS (torch's fp8 row-wise), inductor GEMM templates, int8 mm
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "f8f8", "matmul", "triton_tem", "linear", "mm")),
    ("copy", ("copy", "memcpy", "memset", "cat", "contiguous")),
    ("eager-elementwise", ("elementwise", "reduce", "vectorized")),
)


def variants(quick: bool, tiny: bool) -> list[tuple[str, Callable, int]]:
    """(name, make(handle) -> MODEL, timed e2e runs); ``make`` may raise a refusal. Ordered by
    what the lead needs first, so a time budget cuts the least useful ones."""
    from app.models import attention, quantizers
    from app.models.compile import CompileOptions, compile_model

    repeats = 2 if tiny else (3 if quick else 5)

    def compiled(prepare: Callable = lambda h: h, **settings) -> Callable:
        # tiny: dynamo traces, no codegen (CPU seconds); mode and tuning still go through kwargs()
        options = CompileOptions(**settings, **({"backend": "eager"} if tiny else {}))
        return lambda handle: compile_model(prepare(handle), options)

    def quantized(method: str, fuse: bool = False, backend: str = "", **settings) -> Callable:
        def quantize(handle):
            handle = fused_qkv(handle) if fuse else handle
            if backend:
                handle = attention.with_attention_backend(handle, backend)[0]
            return quantizers.quantize_model(handle, method, quantizers.SKIP_IO)

        return compiled(quantize, **settings)

    def attend(backend: str) -> Callable:
        def make(handle):
            model = attention.with_attention_backend(handle, backend)[0]
            # flex is fused only under torch.compile (eager flex materialises the score matrix)
            return compiled()(model) if backend == "flex" else model

        return make

    chosen = [("eager", lambda h: h, repeats), ("compile", compiled(), repeats),
              ("fp8+compile", quantized("fp8-dynamic-row"), repeats),
              # one scale per tensor: cuBLAS's fp8 GEMM instead of the row-wise CUTLASS one
              ("fp8-tensor+compile", quantized("fp8-dynamic-tensor"), repeats),
              ("compile-cudagraphs", compiled(**COMPILES["compile-cudagraphs"]), repeats),
              ("fp8+compile-cudagraphs", quantized("fp8-dynamic-row", **COMPILES["compile-cudagraphs"]), repeats),
              ("fp8+compile-max-autotune", quantized("fp8-dynamic-row", **COMPILES["compile-max-autotune"]), repeats),
              ("fp8+compile-model", quantized("fp8-dynamic-row", **COMPILES["compile-model"]), repeats),
              ("fp8+compile-model-cudagraphs", quantized("fp8-dynamic-row", **COMPILES["compile-model-cudagraphs"]),
               repeats),
              ("compile-fused-qkv", compiled(fused_qkv), repeats),
              ("fp8+compile-fused-qkv", quantized("fp8-dynamic-row", fuse=True), repeats),
              *((name, compiled(**COMPILES[name]), repeats) for name in ("compile-fullgraph", "compile-max-autotune")),
              ("int8+compile", quantized("int8-dynamic"), repeats),
              # everything that measured faster at once: fp8 + fused QKV + cuDNN attention + compile
              ("fp8+cudnn+compile-fused-qkv", quantized("fp8-dynamic-row", fuse=True, backend="cudnn"), repeats)]
    for backend in attention.BACKENDS:
        if backend in attention.CHOICES and not (quick and backend in ("flex", "math", "efficient")):
            chosen.append((f"attention-{backend}", attend(backend), 1 if quick else repeats))
    # last: its compile alone may take minutes (coordinate descent over every generated kernel)
    chosen.append(("compile-coordinate-descent", compiled(**COMPILES["compile-coordinate-descent"]), repeats))
    return chosen


def measure_variant(setup: Setup, make: Callable, repeats: int, ceiling: float, flops: int,
                    profiled: bool = False) -> dict:
    device = setup.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    from app.models.compile import LIMIT_HITS, first_lines

    hits = len(LIMIT_HITS.messages)
    model = make(setup.handle)
    warmup_s, _ = timed(lambda: setup.sample(model), device)  # compiles here
    runs = [timed(lambda: setup.sample(model), device) for _ in range(repeats)]
    e2e = statistics.median(t for t, _ in runs)
    steps = setup.step_times(model)
    ms, synced_ms = 1000 * steps["back_to_back"], 1000 * statistics.median(steps["synced"])
    e2e_ms = 1000 * e2e / (len(setup.sigmas) - 1)
    final = runs[0][1]
    row = {"e2e_s": e2e, "e2e_runs": len(runs), "warmup_s": warmup_s, "compile_s": max(0.0, warmup_s - e2e),
           "ms_per_step": ms, "ms_per_step_synced": synced_ms, "host_ms_per_step": 1000 * steps["host"],
           "tflops": flops / (ms / 1000) / 1e12,
           "matmul_fraction": flops / (ms / 1000) / 1e12 / ceiling,
           # the sampler's own per-step time (with its few ms of per-step bookkeeping): a cross-check
           "e2e_ms_per_step": e2e_ms, "e2e_matmul_fraction": flops / (e2e_ms / 1000) / 1e12 / ceiling,
           "step_graphs_compiled": steps["graphs"],
           "recompile_limit_hits": [first_lines(m) for m in LIMIT_HITS.messages[hits:]],
           "weights_gib": weights_gib(model), "key": repr(model)}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if profiled:
        try:  # a profiler failure must not lose the timings above
            row["profile"] = profile_step(setup, model, ms, synced_ms)
        except Exception as exc:
            row["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    if setup.reference is None:
        setup.reference = final
    row["drift"] = float((final.float() - setup.reference.float()).norm() / setup.reference.float().norm())
    row["finite"] = bool(torch.isfinite(final).all())
    return row


def bench_model(name: str, args, device: torch.device, ceiling: float, result: dict,
                save: Callable[[], None]) -> None:
    """Fill ``result`` variant by variant, saving the report after each."""
    setup = Setup(name, device, args.tiny, args.steps)
    result.update(build_s=setup.build_s, family=setup.family, steps=len(setup.sigmas) - 1, cfg=setup.cfg,
                  size=setup.latent.samples.shape[-1] * 8, variants={})
    result["flops_per_step"] = flops = step_flops(setup.step(setup.handle))
    started = time.perf_counter()
    for variant, make, repeats in variants(args.quick, args.tiny):
        if args.variants and variant not in args.variants:
            continue
        if args.max_seconds and time.perf_counter() - started > args.max_seconds:
            result["variants"][variant] = {"skipped": f"time budget of {args.max_seconds} s spent"}
            continue
        try:
            row = measure_variant(setup, make, repeats, ceiling, flops, args.profile)
        except Exception as exc:  # a refusal or a failure is a result, and must not lose the others
            row = {"error": f"{type(exc).__name__}: {exc}"}
        eager = result["variants"].get("eager", {}).get("e2e_s")
        if eager and "e2e_s" in row:
            row["speedup"] = eager / row["e2e_s"]
        result["variants"][variant] = row
        print(f"{name} {variant}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in row.items() if k not in ("key", "profile")), flush=True)
        if "profile" in row:
            print(f"{name} {variant} profile: {row['profile']}", flush=True)
        save()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="comma-separated, or all: " + ", ".join(MODELS))
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or all")
    parser.add_argument("--quick", action="store_true", help="fewer runs; fits one 10-minute call for flux-dev")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (a smoke test of every path)")
    parser.add_argument("--profile", action="store_true",
                        help="per variant, one profiled step: device time by kernel family and the GPU's idle time")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (28; --tiny: 3)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help=f"per model: start no variant after this (--quick: {QUICK_BUDGET_S} s)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_speed.json"))
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 28)
    if args.quick and args.max_seconds is None and not args.tiny:
        args.max_seconds = QUICK_BUDGET_S
    args.variants = None if args.variants == "all" else {v.strip() for v in args.variants.split(",") if v.strip()}
    names = list(MODELS) if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; expected {', '.join(MODELS)}")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "quick": args.quick, "tiny": args.tiny, "versions": versions(), "models": {}}
    report["matmul_tflops"] = ceiling = matmul_tflops(device, args.tiny)
    print(f"matmul ceiling: {ceiling:.1f} TFLOP/s", flush=True)

    def save() -> None:
        write_result("gpu_speed", {"gpu_speed": report}, args.out)

    for name in names:
        result = report["models"][name] = {}
        try:
            bench_model(name, args, device, ceiling, result, save)
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def versions() -> dict:
    import importlib.metadata

    found = {"torch": torch.__version__}
    for package in ("diffusers", "torchao", "sageattention"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


if __name__ == "__main__":
    main()
