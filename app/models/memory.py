"""The VRAM planner: how each model of a run lives on the GPU under a budget (pure functions).

Inputs are plain numbers (:class:`ModelNeed`: parameter count, bytes per parameter, block
count and size, working memory), a budget and a reserve; the output is one :class:`Placement`
per model with its estimate and the reason, shown by ``ditgraph explain`` and the UI.

Modes, from fastest to least VRAM:
  resident  weights stay on the GPU between uses
  model     weights live in RAM; the whole model moves to the GPU only while it runs
            (text encoders before sampling, the VAE after it)
  stream    as many blocks as fit stay resident, the rest are streamed one block ahead on a
            CUDA stream from pinned RAM (diffusers group offloading, ``use_stream=True``)
  blocks    every block streamed (the old ``offload=blocks``: least VRAM, slowest)

Working memory (activations) scales with the input: :func:`activation_work` from the tokens
and width of a transformer or text encoder, :func:`vae_work` from the decoded pixels. A VAE
whose untiled decode would cost residency elsewhere is planned tiled (``Placement.tiled``).

Sizes: "12GB", "12G" and "12GiB" all mean 12 × 2**30 bytes — GPUs are sold by binary
gigabytes (a "24 GB" card has 24 GiB), so that is what users mean.
"""

from __future__ import annotations

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
    """What one model needs: ``block_params`` is the total over its ``blocks`` repeated blocks."""

    name: str
    params: int
    bytes_per_param: float = 2.0
    blocks: int = 0
    block_params: int = 0
    work_bytes: int | None = None  # activations while it runs; None: :func:`default_work`
    role: str = "transformer"
    tiled_work: int | None = None  # a VAE's working memory when it decodes in tiles (None: cannot tile)

    @property
    def weight_bytes(self) -> int:
        return int(self.params * self.bytes_per_param)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (the unit streamed)."""
        return int(self.block_params / self.blocks * self.bytes_per_param) if self.blocks else 0

    @property
    def rest_bytes(self) -> int:
        """Bytes outside the blocks (embedders, norms, final layer): always on the GPU when it runs."""
        return self.weight_bytes - self.blocks * self.block_bytes

    @property
    def work(self) -> int:
        return self.work_bytes if self.work_bytes is not None else default_work(self)


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
        """Resident bytes of all models plus the largest transient need of one running model."""
        resident = sum(p.resident_bytes for p in self.placements)
        return resident + max((p.peak_bytes - p.resident_bytes for p in self.placements), default=0)

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
        return need.rest_bytes + 2 * need.block_bytes + need.work
    return need.weight_bytes + need.work


def _stream_peak(need: ModelNeed, keep: int) -> int:
    """VRAM while a model with ``keep`` blocks resident runs: those, the rest and up to two
    blocks in flight (only one when all but one are kept)."""
    return need.rest_bytes + min(need.blocks, keep + 2) * need.block_bytes + need.work


def _streamed(need: ModelNeed, free: int, later: int = 0) -> Placement | None:
    """Partial residency in ``free`` bytes: the rest + two blocks in flight while it runs, and
    as many blocks kept resident as leave ``later`` bytes for the models still to run; None
    when not even one block in flight fits."""
    if not need.blocks or min_need(need) > free:
        return None
    keep = max(0, min(need.blocks - 1, (free - max(min_need(need), later)) // max(need.block_bytes, 1)))
    mode = "stream" if keep else "blocks"
    kept = keep * need.block_bytes
    reason = (f"{human_size(need.weight_bytes)} of weights do not fit {human_size(free)} free: "
              f"{keep}/{need.blocks} blocks resident, the rest streamed")
    return Placement(need.name, mode, need.weight_bytes, kept, _stream_peak(need, keep), keep, reason)


def _forced(need: ModelNeed, mode: str, free: int) -> Placement:
    """The placement a user asked for; ``free`` only sizes partial residency."""
    if mode == "resident":
        return Placement(need.name, mode, need.weight_bytes, need.weight_bytes, need.weight_bytes + need.work, 0,
                         "resident (requested)")
    if mode == "model":
        return Placement(need.name, mode, need.weight_bytes, 0, need.weight_bytes + need.work, 0,
                         "moved to the GPU only while it runs (requested)")
    if not need.blocks:
        raise BudgetError(f"{need.name}: offload={mode} needs a model with a block list")
    keep = 0 if mode == "blocks" else max(0, min(need.blocks - 1, (free - min_need(need)) // max(need.block_bytes, 1)))
    kept = keep * need.block_bytes
    return Placement(need.name, "stream" if keep else "blocks", need.weight_bytes, kept, _stream_peak(need, keep), keep,
                     f"{mode} (requested)")


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
        plan.placements = [_sized(_forced(n, requested.get(n.name, "auto"), 0) if requested.get(n.name, "auto") != "auto"
                                  else Placement(n.name, "resident", n.weight_bytes, n.weight_bytes,
                                                 n.weight_bytes + n.work, 0, "no VRAM budget set"), n) for n in needs]
        return plan
    avail = budget - reserve
    order = sorted(needs, key=lambda n: (ROLE_PRIORITY.get(n.role, 3), -n.weight_bytes))
    placed = {n.name: _forced(n, requested[n.name], avail) for n in order if requested.get(n.name, "auto") != "auto"}
    resident = sum(p.resident_bytes for p in placed.values())
    pending = [n for n in order if n.name not in placed]
    max_work = max((n.work for n in needs), default=0)
    while pending:  # residency in strict priority: a streamed transformer is never beside a resident T5
        need, later = pending[0], max((min_need(n) for n in pending[1:]), default=0)
        if resident + need.weight_bytes + max(max_work, later) > avail:
            break
        resident += need.weight_bytes
        placed[need.name] = Placement(need.name, "resident", need.weight_bytes, need.weight_bytes,
                                      need.weight_bytes + need.work, 0,
                                      f"fits: {human_size(resident)} resident of {human_size(avail)}")
        pending.pop(0)
    for i, need in enumerate(pending):
        # what runs while this model's kept blocks stay resident: the later models and the placed ones' work
        later = max([min_need(n) for n in pending[i + 1:]]
                    + [p.peak_bytes - p.resident_bytes for p in placed.values()], default=0)
        free = avail - resident
        # The transformer runs every step: blocks kept between images, with the few streamed
        # ones overlapping compute, beat moving all of it in and out for each image.
        kept = _streamed(need, free, later) if need.role == "transformer" else None
        if kept is not None and kept.mode == "stream":
            placed[need.name] = kept
            resident += kept.resident_bytes
            continue
        if need.weight_bytes + need.work <= free:
            placed[need.name] = Placement(need.name, "model", need.weight_bytes, 0, need.weight_bytes + need.work, 0,
                                          f"fits only while it runs ({human_size(free)} free beside the residents)")
            continue
        streamed = _streamed(need, free, later)
        if streamed is None:
            raise BudgetError(_no_fit_message(need, free, plan, placed))
        placed[need.name] = streamed
        resident += streamed.resident_bytes
    plan.placements = [_sized(placed[n.name], n) for n in needs]
    return plan


def _sized(placement: Placement, need: ModelNeed) -> Placement:
    placement.blocks, placement.work_bytes = need.blocks, need.work
    return placement


def _no_fit_message(need: ModelNeed, free: int, plan: MemoryPlan, placed: dict[str, Placement]) -> str:
    residents = ", ".join(f"{p.name} {format_size(p.resident_bytes)}" for p in placed.values() if p.resident_bytes)
    smallest = need.rest_bytes + 2 * need.block_bytes + need.work if need.blocks else need.weight_bytes + need.work
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


def need_of(module, name: str, role: str = "transformer", bytes_per_param: float | None = None,
            work_bytes: int | None = None, tiled_work: int | None = None) -> ModelNeed:
    """A :class:`ModelNeed` measured from a module: its parameters, its dtype's size (or
    ``bytes_per_param`` of the storage format it will be loaded in) and the blocks block
    streaming would move (app/models/residency.py; none for a VAE, which moves whole), with
    the working memory estimated for the run's input (None: :func:`default_work`)."""
    from app.models.residency import stack_of, stream_root

    params = sum(p.numel() for p in module.parameters())
    first = next(module.parameters(), None)
    size = bytes_per_param or (first.element_size() if first is not None else 2.0)
    blocks = [] if role == "vae" else stack_of(stream_root(module))
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    return ModelNeed(name, params, size, len(blocks), block_params, work_bytes, role, tiled_work)
