"""The VRAM planner: how each model of a run lives on the GPU under a budget (pure functions).

Inputs are plain numbers (:class:`ModelNeed`: parameter count, bytes per parameter, block
count and size, working memory), a budget and a reserve; the output is one :class:`Placement`
per model with its estimate and the reason, shown by ``ditgraph explain`` and the UI.

Modes, from fastest to least VRAM:
  resident  weights stay on the GPU between uses
  model     weights live in RAM; the whole model moves to the GPU only while it runs
            (text encoders before sampling, the VAE after it)
  stream    as many blocks as fit stay resident, the rest are streamed one block ahead on a
            CUDA stream from pinned RAM (diffusers group offloading, ``use_stream=True``);
            the streamed ones spread through the run (:func:`kept_blocks`)
  blocks    every block streamed (the old ``offload=blocks``: least VRAM, slowest)

Working memory (activations) scales with the input: :func:`activation_work` from the tokens
and width of a transformer or text encoder, :func:`vae_work` from the decoded pixels. A VAE
whose untiled decode would cost residency elsewhere is planned tiled (``Placement.tiled``).

Sizes: "12GB", "12G" and "12GiB" all mean 12 × 2**30 bytes — GPUs are sold by binary
gigabytes (a "24 GB" card has 24 GiB), so that is what users mean.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

GIB = 1 << 30
MODES = ("resident", "model", "stream", "blocks")
OFFLOAD_CHOICES = ("auto", *MODES)
# Bytes per stored parameter of each weight storage format (GGUF is measured from the file).
STORAGE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0,
                 "int8": 1.0, "float8": 1.0, "nf4": 0.5625}  # nf4: 4 bits + a bf16 absmax per 64
# Which models keep the GPU first when not all fit: the transformer runs every step, the
# VAE once and is small, text encoders once and are the first to go (T5-XXL is 9.5 GB).
ROLE_PRIORITY = {"transformer": 0, "vae": 1, "text_encoder": 2}
WORK_FLOOR = GIB // 4  # allocator slack and small temporaries, whatever the input size
# Live (batch, tokens, width) tensors at a block's peak: q/k/v, normed and rotated copies, the
# 4x MLP hidden and its activation, residuals. Calibrated on Flux-dev at 1024² (4608 tokens of
# 3072 wide), measured ~1 GiB reserved above its weights (issue 17).
ACTIVATION_COPIES = 24
VAE_TILE = 512  # pixels per side of a tiled decode (diffusers' AutoencoderKL tile_sample_min_size)
# A text encoder loaded on its own (TextEncoderLoader) stays resident only below this share of
# the budget: it runs once per prompt, and the transformer loaded beside it needs the VRAM.
ENCODER_SHARE = 0.25
# Where a streamed model's kept blocks sit: spread (streamed blocks between kept ones) or the
# first ones (a prefix, as before). Off is the control of the GPU A/B (bench/gpu_memory.py
# --prefix-resident; H200, session 10, Flux-dev fp8 under 12 GiB: 6.45 s spread, 6.64 s prefix).
SPREAD_RESIDENT = True
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class BudgetError(ValueError):
    """The models of a run cannot fit the VRAM budget in any mode; names budget and models."""


def parse_size(text: str | int | float) -> int:
    """Bytes from "12GB", "12G", "12GiB", "800MB", "0" or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read size {text!r}: expected e.g. 12GB, 12G, 800MB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * (1 << (10 * " kmgt".index(unit or " "))))


def format_size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def human_size(nbytes: float) -> str:
    """GiB with two decimals, MiB below one GiB (a small model is not "0.01 GiB")."""
    return format_size(nbytes) if abs(nbytes) >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class ModelNeed:
    """What one model needs: ``block_params`` is the total over its ``blocks`` repeated blocks.

    :func:`need_of` measures a loaded module: ``stored_bytes`` (all its weights as stored: fp8
    layers, the layers a storage keeps in bf16, quantized tensors' inner data) and
    ``block_sizes`` (each block's bytes, in run order: Flux's 19 double blocks are 2.7x its 38
    single ones). Without them the sizes are ``params × bytes_per_param``, blocks equal."""

    name: str
    params: int
    bytes_per_param: float = 2.0
    blocks: int = 0
    block_params: int = 0
    work_bytes: int | None = None  # activations while it runs; None: :func:`default_work`
    role: str = "transformer"
    tiled_work: int | None = None  # a VAE's working memory when it decodes in tiles (None: cannot tile)
    block_sizes: tuple[int, ...] = ()  # bytes of each block in run order (empty: equal shares)
    stored_bytes: int | None = None  # measured bytes of all weights (None: params × bytes_per_param)
    cast_bytes: int = 0  # one narrow-stored layer upcast while it runs (fp8, quantized): added to work

    @property
    def weight_bytes(self) -> int:
        return self.stored_bytes if self.stored_bytes is not None else int(self.params * self.bytes_per_param)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Bytes of each block (the unit streamed), in the order they run."""
        if self.block_sizes:
            return self.block_sizes
        return (int(self.block_params / self.blocks * self.bytes_per_param),) * self.blocks if self.blocks else ()

    @property
    def block_bytes(self) -> int:
        """Bytes of the largest block."""
        return max(self.sizes, default=0)

    @property
    def rest_bytes(self) -> int:
        """Bytes outside the blocks (embedders, norms, final layer; T5's embedding): a streamed
        model keeps them on the GPU with its kept blocks."""
        return self.weight_bytes - sum(self.sizes)

    @property
    def work(self) -> int:
        return (self.work_bytes if self.work_bytes is not None else default_work(self)) + self.cast_bytes


def default_work(need: ModelNeed) -> int:
    """Working memory when the input size is unknown: a rough 10% of its bf16 weights, 256 MiB
    to 3 GiB (the loaders pass :func:`activation_work` / :func:`vae_work` instead)."""
    return int(min(3 * GIB, max(WORK_FLOOR, need.params * 2 * 0.1)))


def activation_work(tokens: int, width: int, batch: int = 1, element_size: int = 2) -> int:
    """Working memory of a transformer or text encoder running ``batch`` × ``tokens`` of
    ``width`` features: the floor plus :data:`ACTIVATION_COPIES` live activations (Flux-dev at
    1024², 4096 image + 512 text tokens of 3072: 0.9 GiB; at 2048²: 2.9 GiB)."""
    return WORK_FLOOR + int(batch * tokens * width * element_size * ACTIVATION_COPIES)


def vae_work(height: int, width: int, frames: int = 1, element_size: int = 2, tiled: bool = False,
             channels: int = 128) -> int:
    """Working memory of a VAE decode of ``height`` × ``width`` (× ``frames``) pixels, whole
    or one :data:`VAE_TILE` tile at a time."""
    if tiled:
        height, width = min(height, VAE_TILE), min(width, VAE_TILE)
    return WORK_FLOOR + vae_decode_bytes(height, width, frames, element_size, channels)


def model_width(module) -> int:
    """The hidden width of a diffusers or transformers model, from its config (0: unknown)."""
    config = getattr(module, "config", None)
    for key in ("d_model", "hidden_size", "inner_dim"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    text = getattr(config, "text_config", None)  # CLIP-style composite configs
    return int(getattr(text, "hidden_size", 0) or 0)


@dataclass
class Placement:
    """The plan for one model: ``peak`` is the VRAM it needs while running (beyond what is resident)."""

    name: str
    mode: str
    weight_bytes: int
    resident_bytes: int  # held between uses
    peak_bytes: int  # held while it runs (includes resident_bytes)
    resident_blocks: int = 0
    reason: str = ""
    blocks: int = 0  # of the model's block list (the unit streamed)
    work_bytes: int = 0  # the working memory counted in peak_bytes
    tiled: bool = False  # a VAE planned to decode in tiles
    role: str = "transformer"  # text encoders run together (one stage), every other model alone

    @property
    def held_bytes(self) -> int:
        """Weights on the GPU while it runs beyond what stays resident (streamed blocks, a moved model)."""
        return self.peak_bytes - self.resident_bytes - self.work_bytes

    def as_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "weights": format_size(self.weight_bytes),
                "resident": format_size(self.resident_bytes), "peak": format_size(self.peak_bytes),
                "resident_blocks": self.resident_blocks, "blocks": self.blocks, "reason": self.reason,
                "peak_bytes": self.peak_bytes, "weight_bytes": self.weight_bytes, "work_bytes": self.work_bytes,
                "tiled": self.tiled}


@dataclass
class MemoryPlan:
    budget: int
    reserve: int
    placements: list[Placement] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.budget - self.reserve

    @property
    def peak(self) -> int:
        """Resident bytes of all models plus the largest transient need of one stage of the run
        (the text encoders of a prompt together, every other model alone)."""
        resident = sum(p.resident_bytes for p in self.placements)
        return resident + _demand([_entry(p) for p in self.placements])

    def by_name(self) -> dict[str, Placement]:
        return {p.name: p for p in self.placements}

    def as_dict(self) -> dict:
        return {"budget": format_size(self.budget), "reserve": format_size(self.reserve),
                "peak": format_size(self.peak), "models": [p.as_dict() for p in self.placements]}


MODE_WORDS = {"resident": "resident", "model": "offload between uses", "stream": "stream blocks",
              "blocks": "stream blocks"}


def describe(plan: MemoryPlan) -> dict:
    """A plan as data (:meth:`MemoryPlan.as_dict`) plus ``lines`` saying per model its mode and
    estimate (what ``ditgraph explain`` prints and the editor shows)."""
    if plan.budget > 0:
        lines = [f"VRAM budget {human_size(plan.budget)}, reserve {human_size(plan.reserve)}: "
                 f"{human_size(plan.available)} for models; estimated peak {human_size(plan.peak)}"]
    else:
        lines = ["no VRAM budget (no --vram, and no CUDA device to measure): models resident unless offload says otherwise"]
    for p in plan.placements:
        mode = MODE_WORDS.get(p.mode, p.mode)
        if p.mode in ("stream", "blocks"):
            mode += f", {p.resident_blocks}/{p.blocks} resident"
        if p.tiled:
            mode += ", decoded in tiles"
        on_gpu = p.peak_bytes - p.work_bytes
        weights = (human_size(p.weight_bytes) if on_gpu == p.weight_bytes
                   else f"{human_size(on_gpu)} of its {human_size(p.weight_bytes)}") + " weights"
        lines.append(f"{p.name}: {mode}: {human_size(p.peak_bytes)} while it runs ({weights} + "
                     f"{human_size(p.work_bytes)} working), {human_size(p.resident_bytes) if p.resident_bytes else 'nothing'} "
                     f"kept between uses" + (f"; {p.reason}" if plan.budget > 0 or "requested" in p.reason else ""))
    return {**plan.as_dict(), "lines": lines}


def min_need(need: ModelNeed) -> int:
    """The least VRAM a model can run in: streamed one block ahead, or whole when it has no blocks."""
    if need.blocks:
        return need.rest_bytes + _in_flight(need.sizes, 0) + need.work
    return need.weight_bytes + need.work


def kept_blocks(count: int, keep: int) -> tuple[int, ...]:
    """Which ``keep`` of ``count`` blocks (indices in run order) stay on the GPU: the streamed
    ones spread evenly through the run, the last block among them (:data:`SPREAD_RESIDENT`;
    off: the first ``keep``). diffusers prefetches one streamed block ahead, so behind a kept
    prefix the streamed blocks run back to back and each copy hides under one block's compute:
    Flux-dev fp8 under 12 GiB streamed its last 30 single blocks at 3.4 ms a copy against ~2 ms
    of compute each and the GPU sat idle 61 ms a step (H200, issue 17). Spread, each copy also
    overlaps the kept blocks run before it, and the copy engine works through the whole step."""
    streamed = count - keep
    if not SPREAD_RESIDENT or streamed <= 0 or keep <= 0:
        return tuple(range(min(keep, count)))
    # ceil((j + 1) * count / streamed) - 1 rises by at least 1 a step (count >= streamed): distinct
    out = {math.ceil((j + 1) * count / streamed) - 1 for j in range(streamed)}
    return tuple(i for i in range(count) if i not in out)


def _kept_bytes(sizes: tuple[int, ...], keep: int) -> int:
    return sum(sizes[i] for i in kept_blocks(len(sizes), keep))


def _in_flight(sizes: tuple[int, ...], keep: int) -> int:
    """Streamed block bytes on the GPU at once when ``keep`` blocks stay (:func:`kept_blocks`):
    the streamed block running and the next streamed one, prefetched on the copy stream
    (diffusers group offloading with ``use_stream``), at the largest such pair; one when a
    single block streams."""
    kept = set(kept_blocks(len(sizes), keep))
    streamed = [size for i, size in enumerate(sizes) if i not in kept]
    if len(streamed) < 2:
        return sum(streamed)
    return max(streamed[i] + streamed[i + 1] for i in range(len(streamed) - 1))


def _stream_peak(need: ModelNeed, keep: int) -> int:
    """VRAM while a model with ``keep`` blocks resident runs: those, the rest and the streamed
    blocks in flight."""
    return need.rest_bytes + _kept_bytes(need.sizes, keep) + _in_flight(need.sizes, keep) + need.work


def _keep(need: ModelNeed, free: int, later: int = 0) -> int:
    """How many blocks (never all: then it is resident) stay on the GPU: the count that keeps the
    most bytes (the least streamed a step; spread, a larger count can keep smaller blocks) such
    that the model runs in ``free`` bytes and what stays between uses (the rest and the kept
    blocks) leaves ``later`` bytes for the models still to run; 0 when none can stay."""
    fits = [k for k in range(1, need.blocks)
            if _stream_peak(need, k) <= free and need.rest_bytes + _kept_bytes(need.sizes, k) + later <= free]
    return max(fits, key=lambda k: (_kept_bytes(need.sizes, k), k), default=0)


def _stream_placement(need: ModelNeed, keep: int, reason: str) -> Placement:
    kept = need.rest_bytes + _kept_bytes(need.sizes, keep)
    return _sized(Placement(need.name, "stream" if keep else "blocks", need.weight_bytes, kept,
                            _stream_peak(need, keep), keep, reason), need)


def _streamed(need: ModelNeed, free: int, later: int = 0) -> Placement | None:
    """Partial residency in ``free`` bytes (:func:`_keep`); None when not even one block in
    flight fits."""
    if not need.blocks or min_need(need) > free:
        return None
    keep = _keep(need, free, later)
    reason = (f"{human_size(need.weight_bytes)} of weights do not fit {human_size(free)} free: "
              f"{keep}/{need.blocks} blocks resident, the rest streamed")
    return _stream_placement(need, keep, reason)


def _forced(need: ModelNeed, mode: str, free: int) -> Placement:
    """The placement a user asked for; ``free`` only sizes partial residency."""
    if mode == "resident":
        return _sized(Placement(need.name, mode, need.weight_bytes, need.weight_bytes, need.weight_bytes + need.work,
                                0, "resident (requested)"), need)
    if mode == "model":
        return _sized(Placement(need.name, mode, need.weight_bytes, 0, need.weight_bytes + need.work, 0,
                                "moved to the GPU only while it runs (requested)"), need)
    if not need.blocks:
        raise BudgetError(f"{need.name}: offload={mode} needs a model with a block list")
    return _stream_placement(need, 0 if mode == "blocks" else _keep(need, free), f"{mode} (requested)")


def _stage(role: str, name: str) -> str:
    """Models that run together: a prompt's text encoders (each stays on the GPU until all have
    encoded: they are one value), every other model alone."""
    return "encode" if role == "text_encoder" else name


def _entry(p: Placement) -> tuple[str, int, int]:
    return _stage(p.role, p.name), p.held_bytes, p.work_bytes


def _least(n: ModelNeed) -> tuple[str, int, int]:
    """A model not placed yet at its least: streamed (its rest resident: :func:`_resident_least`) or moved whole."""
    return _stage(n.role, n.name), min_need(n) - n.work - _resident_least(n), n.work


def _resident_least(n: ModelNeed) -> int:
    """What a model not placed yet keeps on the GPU at least: a streamed model its rest."""
    return n.rest_bytes if n.blocks else 0


def _demand(entries: list[tuple[str, int, int]]) -> int:
    """The most VRAM beyond the residents that one stage needs while it runs: its models' held
    weights together plus the largest working memory among them (they run one after another)."""
    held: dict[str, int] = {}
    work: dict[str, int] = {}
    for stage, weights, working in entries:
        held[stage] = held.get(stage, 0) + weights
        work[stage] = max(work.get(stage, 0), working)
    return max((held[s] + work[s] for s in held), default=0)


def plan_memory(needs: list[ModelNeed], budget: int, reserve: int = 0,
                requested: dict[str, str] | None = None) -> MemoryPlan:
    """Place every model of a run under ``budget - reserve`` bytes.

    Models are considered by role priority (transformer, VAE, text encoders) then size: each
    stays resident while the resident total plus the largest working memory fits; the others
    move whole between uses when they fit beside the residents, else stream blocks. A VAE that
    can tile is planned tiled when its untiled decode would keep other weights off the GPU (or
    fit nowhere). Raises :class:`BudgetError` when some model fits in no mode. ``budget`` 0
    means no GPU limit.
    """
    tileable = {n.name for n in needs if n.tiled_work is not None and n.tiled_work < n.work}
    if budget <= 0 or not tileable:
        return _plan(needs, budget, reserve, requested)
    try:
        whole = _plan(needs, budget, reserve, requested)
    except BudgetError:
        whole = None
    tiled_needs = [replace(n, work_bytes=n.tiled_work) if n.name in tileable else n for n in needs]
    try:
        tiled = _plan(tiled_needs, budget, reserve, requested)
    except BudgetError:
        if whole is None:
            raise
        return whole
    kept = lambda plan: sum(p.resident_bytes for p in plan.placements if p.name not in tileable)  # noqa: E731
    if whole is not None and kept(whole) >= kept(tiled):
        return whole
    for p in tiled.placements:
        if p.name in tileable:
            p.tiled = True
            p.reason += (f"; decoded in tiles ({human_size(p.work_bytes)} working instead of "
                         f"{human_size(next(n.work for n in needs if n.name == p.name))})")
    return tiled


def plan_alone(need: ModelNeed, budget: int, reserve: int = 0, requested: str = "auto") -> MemoryPlan:
    """Plan a model loaded on its own (TextEncoderLoader, VAELoader), not knowing what runs
    beside it: a text encoder above :data:`ENCODER_SHARE` of the budget moves whole between
    uses (T5-XXL is off the GPU before sampling), anything else as :func:`plan_memory` says."""
    if requested == "auto" and budget > 0 and need.role == "text_encoder" \
            and need.weight_bytes > ENCODER_SHARE * (budget - reserve):
        if need.weight_bytes + need.work <= budget - reserve:
            plan = plan_memory([need], budget, reserve, {need.name: "model"})
            plan.placements[0].reason = (f"{human_size(need.weight_bytes)} is over {ENCODER_SHARE:.0%} of the budget: "
                                         "on the GPU only while it encodes, so sampling has the VRAM")
            return plan
        return plan_memory([need], budget, reserve, {need.name: "stream"})
    return plan_memory([need], budget, reserve, {} if requested == "auto" else {need.name: requested})


def _plan(needs: list[ModelNeed], budget: int, reserve: int = 0,
          requested: dict[str, str] | None = None) -> MemoryPlan:
    requested = requested or {}
    plan = MemoryPlan(budget, reserve)
    if budget <= 0:
        plan.placements = [_forced(n, requested.get(n.name, "auto"), 0) if requested.get(n.name, "auto") != "auto"
                           else _sized(Placement(n.name, "resident", n.weight_bytes, n.weight_bytes,
                                                 n.weight_bytes + n.work, 0, "no VRAM budget set"), n) for n in needs]
        return plan
    avail = budget - reserve
    order = sorted(needs, key=lambda n: (ROLE_PRIORITY.get(n.role, 3), -n.weight_bytes))
    placed = {n.name: _forced(n, requested[n.name], avail) for n in order if requested.get(n.name, "auto") != "auto"}
    resident = sum(p.resident_bytes for p in placed.values())
    pending = [n for n in order if n.name not in placed]
    while pending:  # residency in strict priority: a streamed transformer is never beside a resident T5
        need = pending[0]
        # while any stage runs: the others at their least (their embeddings resident) and this one's work
        later = _demand([_entry(p) for p in placed.values()] + [_least(n) for n in pending[1:]]
                        + [(_stage(need.role, need.name), 0, need.work)])
        if resident + need.weight_bytes + sum(_resident_least(n) for n in pending[1:]) + later > avail:
            break
        resident += need.weight_bytes
        placed[need.name] = _sized(Placement(need.name, "resident", need.weight_bytes, need.weight_bytes,
                                             need.weight_bytes + need.work, 0,
                                             f"fits: {human_size(resident)} resident of {human_size(avail)}"), need)
        pending.pop(0)
    for i, need in enumerate(pending):
        stage = _stage(need.role, need.name)
        others = [_entry(p) for p in placed.values()] + [_least(n) for n in pending[i + 1:]]
        peers = [(held, work) for s, held, work in others if s == stage]  # run beside it (the other text encoders)
        # bytes the models after it keep resident at least, and what its stage's peers hold while it runs
        free = (avail - resident - sum(_resident_least(n) for n in pending[i + 1:]) - sum(h for h, _ in peers)
                - max([0] + [w - need.work for _, w in peers]))
        later = _demand([e for e in others if e[0] != stage])  # what runs while its kept blocks stay
        # The transformer runs every step: blocks kept between images, with the few streamed
        # ones overlapping compute, beat moving all of it in and out for each image.
        kept = _streamed(need, free, later) if need.role == "transformer" else None
        if kept is not None and kept.mode == "stream":
            placed[need.name] = kept
            resident += kept.resident_bytes
            continue
        if need.weight_bytes + need.work <= free:
            placed[need.name] = _sized(Placement(need.name, "model", need.weight_bytes, 0,
                                                 need.weight_bytes + need.work, 0,
                                                 f"fits only while it runs ({human_size(free)} free beside the "
                                                 "residents)"), need)
            continue
        streamed = _streamed(need, free, later)
        if streamed is None:
            raise BudgetError(_no_fit_message(need, free, plan, placed))
        placed[need.name] = streamed
        resident += streamed.resident_bytes
    _with_peers(placed.values())
    plan.placements = [placed[n.name] for n in needs]
    return plan


def _with_peers(placements) -> None:
    """Text encoders are one value (budget.place): when one of them moves whole, all of them
    leave the GPU after each use; their plan says so (nothing kept between uses)."""
    encoders = [p for p in placements if p.role == "text_encoder"]
    if not any(p.mode == "model" for p in encoders):
        return
    for p in encoders:
        if p.resident_bytes:
            p.mode = "model" if p.mode == "resident" else p.mode
            p.resident_bytes = 0
            p.reason += "; off the GPU between uses with the other text encoders"


def _sized(placement: Placement, need: ModelNeed) -> Placement:
    placement.blocks, placement.work_bytes, placement.role = need.blocks, need.work, need.role
    return placement


def _no_fit_message(need: ModelNeed, free: int, plan: MemoryPlan, placed: dict[str, Placement]) -> str:
    residents = ", ".join(f"{p.name} {format_size(p.resident_bytes)}" for p in placed.values() if p.resident_bytes)
    smallest = min_need(need)
    return (f"{need.name} needs at least {format_size(smallest)} of VRAM but only {format_size(free)} is free under "
            f"the budget of {format_size(plan.budget)} (reserve {format_size(plan.reserve)}"
            + (f"; resident: {residents}" if residents else "")
            + "): raise --vram, lower --reserve-vram, or pick a smaller storage format (fp8, int8, GGUF)")


def evict_for(incoming: int, loaded: list[tuple[str, int]], budget: int, reserve: int = 0) -> list[str]:
    """Which loaded models (``(name, device bytes)``, least recently used first) to move off
    the GPU so that ``incoming`` more bytes fit; raises :class:`BudgetError` when even
    evicting all of them is not enough."""
    if budget <= 0:
        return []
    avail = budget - reserve
    used = sum(size for _, size in loaded)
    evicted: list[str] = []
    for name, size in loaded:
        if used + incoming <= avail:
            break
        evicted.append(name)
        used -= size
    if used + incoming > avail:
        names = ", ".join(f"{n} {format_size(s)}" for n, s in loaded) or "none"
        raise BudgetError(f"cannot fit {format_size(incoming)} under the VRAM budget of {format_size(budget)} "
                          f"(reserve {format_size(reserve)}; loaded: {names})")
    return evicted


def vae_decode_bytes(height: int, width: int, frames: int = 1, element_size: int = 2, channels: int = 128) -> int:
    """Peak bytes of an untiled VAE decode: its full-resolution feature maps of ``channels``
    (the decoder's last block, 128 for SD/Flux-style VAEs) with their intermediates (~12 values
    per channel and output pixel; ~3 GiB at 1024² in bf16)."""
    return int(height * width * frames * 12 * channels * element_size)


def should_tile_vae(height: int, width: int, free: int, frames: int = 1, element_size: int = 2) -> bool:
    """Tile the VAE decode when its untiled peak would not fit ``free`` bytes (0: no budget)."""
    return free > 0 and vae_decode_bytes(height, width, frames, element_size) > free


def tensor_bytes(tensor) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass (torchao) by its inner tensors
    (its own ``element_size`` is the dtype it computes in), any other by numel × element size
    (fp8; a GGUF parameter is stored as its bytes)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module) -> int:
    """Bytes of a module's parameters as stored (tied weights once; buffers, position ids and
    the like, are small and not counted)."""
    return sum(tensor_bytes(t) for t in module.parameters())


def cast_bytes(module, compute_bytes: int = 2) -> int:
    """The transient of a module whose layers are stored narrower than they compute (fp8 cast
    inline, torchao, GGUF): the largest such layer's upcast copy in the compute dtype, beside
    its stored weight (app/models/storage.py cast_inline). One layer at a time is an assumption
    about those forwards, not a measurement; 0 when none. A layer left on diffusers' hook
    (ConvTranspose; none in the transformers ditgraph loads) also re-stores a narrow copy after
    each call, which this does not count."""
    import torch

    largest = 0
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or any(True for _ in layer.children()):
            continue
        logical = layer.in_features * layer.out_features if isinstance(layer, torch.nn.Linear) else weight.numel()
        stored = tensor_bytes(weight)
        if stored < logical * compute_bytes:
            largest = max(largest, logical * compute_bytes)
    return largest


def need_of(module, name: str, role: str = "transformer", bytes_per_param: float | None = None,
            work_bytes: int | None = None, tiled_work: int | None = None, compute_bytes: int = 2) -> ModelNeed:
    """A :class:`ModelNeed` measured from a module: its parameters, their bytes as stored, each
    block's bytes (the blocks block streaming would move: app/models/residency.py; none for a
    VAE, which moves whole), the upcast of a narrow-stored layer (:func:`cast_bytes`) and the
    working memory estimated for the run's input (None: :func:`default_work`). ``bytes_per_param``: a storage format not applied to the module yet
    (planning from configs): every parameter at that size, an underestimate where the storage
    keeps some layers wider (fp8 storage keeps Flux's AdaLN layers in bf16)."""
    from app.models.residency import stack_of, stream_root

    params = sum(p.numel() for p in module.parameters())
    measure = (lambda m: int(sum(p.numel() for p in m.parameters()) * bytes_per_param)) if bytes_per_param \
        else module_bytes
    root = stream_root(module)
    blocks = [] if role == "vae" else stack_of(root)
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    stored = measure(module)
    return ModelNeed(name, params, stored / max(params, 1), len(blocks), block_params, work_bytes, role, tiled_work,
                     tuple(measure(b) for b in blocks), stored, cast_bytes(module, compute_bytes))
