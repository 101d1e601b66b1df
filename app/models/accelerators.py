"""Training-free cache accelerators as block-level hooks, generic over our DiT families.

One machinery serves every method. The transformer's block stack (SD3/shapes-dit
``transformer_blocks``; Flux ``transformer_blocks`` + ``single_transformer_blocks``; PixArt and
Sana ``transformer_blocks``; Lumina 2 ``layers``) gets one diffusers :class:`ModelHook` per
block (``diffusers.hooks.HookRegistry``), installed in ``begin_run`` and removed in
``end_run``. A block's *streams* are its image tokens and, for joint blocks that return
``(encoder_hidden_states, hidden_states)``, its text tokens. Before block 0 runs, the method
*plans* the call: compute everything, or skip a contiguous range ``[a, b)`` of blocks. Skipped
blocks pass their inputs through unchanged and the last one adds the range's residual (cached or
forecast), so whatever the model does *between* blocks (ControlNet residual adds) still happens.
While computing, the machinery records the range's own residual (output - input, minus any
between-block additions), which the method stores for later calls.

Methods (REFERENCE.md, "Cache accelerators"):
  fbc        First-Block Cache: run block 0, skip the rest if its residual barely moved
  teacache   accumulate poly(rel-L1 of block 0's timestep-modulated input) < delta
  magcache   accumulated |1 - prod(gamma)| <= delta with calibrated magnitude ratios gamma
  easycache  online transformation-rate estimate k*|dx|/|y| accumulated < tau
  taylorseer full compute every N calls, Taylor forecast (order m) of the residual between
  cgtaylor   forecast block 0 and the residual; skip the rest if block 0's forecast error < gate
  deltadit   Delta-DiT: cache the rear blocks' deviation early, the front blocks' late
  fora       static: recompute every N calls, reuse the residual between

Per-run state lives in :class:`CacheRun` (created by ``begin_run``), never on the patch, so a
memoized MODEL never replays stale residuals. Calls are grouped into *slots* by their order
within a step (CFG evaluated as two calls, Heun's second evaluation), each slot with its own
history. After the run the statistics go to ``run.extras["cache"]``, to the run's event stream
(``{"type": "cache", ...}``) and to the log.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.models import families
from app.models.handles import ModelCall, ModelPatch, SamplingRun

log = logging.getLogger(__name__)

HOOK_PREFIX = "ditgraph_cache"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "layers")

# TeaCache rescaling polynomials (highest power first), fitted per model on (rel-L1 of the
# modulated input, rel-L1 of the output) pairs. Flux: the TeaCache authors' Flux-dev fit.
# shapes-dit: fitted by `python -m bench.cache calibrate-teacache` on the bundled model.
# Families without one use the identity (raw rel-L1); calibrate with the same command.
TEACACHE_COEFFICIENTS: dict[str, list[float]] = {
    "flux": [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01],
    # 12 prompts x 50 steps, cfg 2 (588 pairs, x in 0.016..0.114); the final weights
    "shapes-dit": [-1.11061087e+04, 2.48867652e+03, -1.57846179e+02, 4.43062789e+00, -2.52294575e-02],
}
# Where a fit's data ended: beyond it the polynomial is extended linearly through the origin
# (a quartic can turn negative outside its data and would then hide large changes).
TEACACHE_DOMAIN: dict[str, float] = {"shapes-dit": 0.1136}
IDENTITY_POLY = [1.0, 0.0]

# MagCache magnitude ratios per model (one calibration sample each, resampled to the step
# count by nearest neighbour). Flux-dev: the MagCache authors' (via diffusers).
MAGCACHE_RATIOS: dict[str, list[float]] = {
    # one prompt, 50 steps, cfg 2 (python -m bench.cache calibrate-magcache)
    "shapes-dit": [1.0, 1.03676, 1.04197, 1.01942, 1.01822, 0.99515, 0.99176, 0.99261, 0.99103, 1.00264, 0.99099,
                   0.99186, 0.98995, 0.99318, 0.99785, 0.99481, 0.9919, 0.99101, 1.00022, 0.98348, 1.00122,
                   0.99104, 0.99364, 0.9942, 0.99043, 0.98852, 0.99192, 0.99131, 0.9876, 0.98701, 0.98755, 0.98904,
                   0.98428, 0.98495, 0.98582, 0.97948, 0.98147, 0.981, 0.97529, 0.97567, 0.9728, 0.96861, 0.9661,
                   0.95941, 0.95277, 0.94331, 0.93048, 0.90974, 0.87617, 0.81144],
}


# ---------------------------------------------------------------------------------------------
# the block stack


def stack_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's main blocks in execution order (Flux: double then single blocks)."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        modules = getattr(transformer, name, None)
        if isinstance(modules, nn.ModuleList):
            blocks.extend(modules)
    if not blocks:
        raise ValueError(f"{type(transformer).__name__}: no transformer block list found "
                         f"(looked for {', '.join(BLOCK_LISTS)}); cache accelerators cannot hook it")
    return blocks


_PARAMS: dict[type, list[str]] = {}


def block_arg(module: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    """A block's argument by name, whether passed by keyword or by position (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    cls = type(module)
    params = _PARAMS.get(cls)
    if params is None:
        params = _PARAMS[cls] = list(inspect.signature(cls.forward).parameters)[1:]
    if name in params:
        index = params.index(name)
        if index < len(args):
            return args[index]
    return None


def modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Block 0's timestep-modulated, normalised input (TeaCache's indicator).

    adaLN-Zero blocks (SD3, Flux, Lumina 2): ``norm1(h, emb=temb)[0]``; adaLN-single blocks
    (PixArt, Sana): ``norm1(h) * (1 + scale) + shift`` from the block's scale-shift table.
    Falls back to the raw hidden states.
    """
    hidden = block_arg(block, "hidden_states", args, kwargs)
    temb = block_arg(block, "temb", args, kwargs)
    norm = getattr(block, "norm1", None) or getattr(block, "norm", None)
    if temb is not None and norm is not None:
        try:
            out = norm(hidden, emb=temb)
            return out[0] if isinstance(out, tuple) else out
        except TypeError:
            pass
    timestep = block_arg(block, "timestep", args, kwargs)
    table = getattr(block, "scale_shift_table", None)
    if timestep is not None and table is not None and norm is not None and timestep.dim() == 2:
        b = hidden.shape[0]
        shift, scale = (table[None] + timestep.reshape(b, table.shape[0], -1)).chunk(table.shape[0], dim=1)[:2]
        return norm(hidden) * (1 + scale) + shift
    return hidden


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b| (0 when b is all zeros and a equals it)."""
    num = (a - b).abs().mean()
    den = b.abs().mean()
    return float(num / den.clamp(min=1e-12))


def poly(coefficients: Sequence[float], x: float) -> float:
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def resample_nearest(values: Sequence[float], length: int) -> list[float]:
    """Nearest-neighbour resampling of a per-step list to ``length`` steps (MagCache's rule)."""
    n = len(values)
    if length <= 0 or n == 0:
        return []
    if length == 1:
        return [float(values[-1])]
    scale = (n - 1) / (length - 1)
    return [float(values[min(n - 1, round(i * scale))]) for i in range(length)]


# ---------------------------------------------------------------------------------------------
# per-run state


@dataclass
class Plan:
    """What the current call does: skip blocks [skip) adding ``residual``; record [track)."""

    skip: tuple[int, int] | None = None
    residual: tuple | None = None  # (hidden residual, encoder residual or None)
    track: tuple[int, int] | None = None
    deferred: bool = False  # decide after block 0 (FBC, CG-Taylor)
    label: str = ""


@dataclass
class Slot:
    """The history of one sequence of calls (one CFG branch / one evaluation of a step)."""

    calls: int = 0
    streak: int = 0  # consecutive skipped calls
    since_compute: int = 0
    step: int = 0
    sigma: float = 0.0
    plan: Plan = field(default_factory=Plan)
    entry: tuple | None = None
    prev_out: tuple | None = None
    extra: list | None = None
    residuals: dict = field(default_factory=dict)  # range -> (R_h, R_e)
    m: dict = field(default_factory=dict)  # the method's own values


class CacheRun:
    """Per-run state of one cache patch: hooks, slots, statistics."""

    def __init__(self, method: CacheMethod, run: SamplingRun):
        self.method = method
        self.run = run
        self.blocks = stack_blocks(run.transformer)
        self.n = len(self.blocks)
        self.pairs: dict[int, bool] = {}  # block index -> returns (encoder, hidden)
        self.enc_none: dict[int, bool] = {}  # block index -> its encoder output is None (SD3 last)
        self.slots: dict[Any, Slot] = {}
        self.slot: Slot | None = None
        self._last_step: int | None = None
        self._call_in_step = 0
        self.hook_name = f"{HOOK_PREFIX}_{method.name}_{id(self):x}"
        # block cost ~ its parameter count (same tokens per block): Flux's double blocks weigh
        # ~2.4x its single blocks, which a block count alone would hide
        self.weights = [sum(p.numel() for p in block.parameters()) or 1 for block in self.blocks]
        self.stats = {"calls": 0, "skipped_calls": 0, "blocks": 0, "blocks_skipped": 0, "work": 0, "work_skipped": 0}
        self.skipped_steps: set[int] = set()
        self.records: list[dict] = []  # calibration data (per computed call)

    # -- hooks ---------------------------------------------------------------------------------
    def install(self) -> None:
        from diffusers.hooks import HookRegistry

        for block in self.blocks:
            existing = getattr(block, "_diffusers_hook", None)
            if existing is not None and any(name.startswith(HOOK_PREFIX) for name in existing.hooks):
                raise ValueError("this model already carries a cache accelerator in the running sampler; "
                                 "chain at most one cache node per MODEL")
        installed = []
        try:
            for index, block in enumerate(self.blocks):
                registry = HookRegistry.check_if_exists_or_initialize(block)
                registry.register_hook(BlockCacheHook(self, index), self.hook_name)
                installed.append(block)
        except Exception:
            self._remove(installed)
            raise

    def remove(self) -> None:
        self._remove(self.blocks)

    def _remove(self, blocks: list[nn.Module]) -> None:
        for block in blocks:
            registry = getattr(block, "_diffusers_hook", None)
            if registry is not None and self.hook_name in registry.hooks:
                registry.remove_hook(self.hook_name, recurse=False)

    # -- calls ---------------------------------------------------------------------------------
    def begin_call(self, call: ModelCall) -> None:
        step = call.run.step
        if step != self._last_step:
            self._last_step, self._call_in_step = step, 0
        key = (self._call_in_step, tuple(call.latents.shape))
        self._call_in_step += 1
        slot = self.slots.setdefault(key, Slot())
        slot.step = step
        slot.sigma = self._sigma(call, step)
        slot.plan = Plan()
        self.slot = slot

    def _sigma(self, call: ModelCall, step: int) -> float:
        # reading a CUDA tensor would sync every call and stall the kernel queue; the
        # schedule on the CPU gives the step's sigma (Heun's second evaluation, a slot of its
        # own, then uses its step's first sigma: a close stand-in for the Taylor variable)
        if call.sigma.device.type != "cpu" and self.run.sigmas is not None and 0 <= step < len(self.run.sigmas):
            return float(self.run.sigmas[step])
        return float(call.sigma.flatten()[0])

    def end_call(self) -> None:
        slot = self.slot
        self.slot = None
        if slot is None:
            return
        skipped = 0
        if slot.plan.skip is not None:
            a, b = slot.plan.skip
            skipped = b - a
        self.stats["calls"] += 1
        self.stats["blocks"] += self.n
        self.stats["blocks_skipped"] += skipped
        self.stats["work"] += sum(self.weights)
        if skipped:
            a, b = slot.plan.skip
            self.stats["work_skipped"] += sum(self.weights[a:b])
        if skipped:
            slot.streak += 1
            slot.since_compute += 1
            if skipped >= self.n - 1:
                self.stats["skipped_calls"] += 1
            self.skipped_steps.add(slot.step)
        else:
            slot.streak = 0
            slot.since_compute = 0
        slot.calls += 1
        slot.entry = slot.prev_out = slot.extra = None

    # -- gating shared by every method ---------------------------------------------------------
    def step_fraction(self, slot: Slot) -> float | None:
        total = self.run.total_steps
        return None if total <= 0 else slot.step / total

    def may_skip(self, slot: Slot) -> bool:
        """Inside [start, end) of the schedule, under the consecutive-skip limit, with history."""
        m = self.method
        frac = self.step_fraction(slot)
        if frac is None or slot.calls == 0:
            return False
        if frac < m.start - 1e-9 or frac >= m.end - 1e-9:
            return False
        return not (m.max_skips > 0 and slot.streak >= m.max_skips)

    # -- the block hook body -------------------------------------------------------------------
    def block(self, index: int, module: nn.Module, args: tuple, kwargs: dict, forward: Callable) -> Any:
        slot = self.slot
        if slot is None:
            return forward(*args, **kwargs)
        h_in = block_arg(module, "hidden_states", args, kwargs)
        pair = self.pairs.get(index)
        e_in = block_arg(module, "encoder_hidden_states", args, kwargs) if pair else None
        if index == 0:
            slot.plan = self.method.plan(self, slot, module, args, kwargs) or Plan(track=(0, self.n))
        plan = slot.plan
        if plan.skip is not None and plan.skip[0] <= index < plan.skip[1]:
            if index < plan.skip[1] - 1:
                return self._format(index, h_in, e_in)
            r_h, r_e = plan.residual
            h_out = h_in + r_h
            e_out = None if self.enc_none.get(index) else (e_in + r_e if (r_e is not None and e_in is not None) else e_in)
            return self._format(index, h_out, e_out)

        out = forward(*args, **kwargs)
        if pair is None:
            pair = self.pairs[index] = isinstance(out, tuple)
            if pair:
                e_in = block_arg(module, "encoder_hidden_states", args, kwargs)
        if pair:
            e_out, h_out = out[0], out[1]
            self.enc_none[index] = e_out is None
        else:
            e_out, h_out = None, out
        track = plan.track
        if track is not None and track[0] <= index < track[1]:
            self._track(slot, index, track, (h_in, e_in), (h_out, e_out))
        if index == 0 and plan.deferred:
            self.method.after_head(self, slot, h_in, h_out)
        return out

    def _format(self, index: int, h: torch.Tensor, e: torch.Tensor | None) -> Any:
        return (e, h) if self.pairs.get(index) else h

    def _track(self, slot: Slot, index: int, track: tuple[int, int], inp: tuple, out: tuple) -> None:
        if index == track[0]:
            slot.entry = inp
            slot.extra = [None, None]
        elif slot.prev_out is not None:
            # additions between blocks (ControlNet residuals) are not the blocks' own work
            for k in (0, 1):
                prev, cur = slot.prev_out[k], inp[k]
                if prev is not None and cur is not None and cur is not prev:
                    delta = cur - prev
                    slot.extra[k] = delta if slot.extra[k] is None else slot.extra[k] + delta
        slot.prev_out = out
        if index == track[1] - 1:
            residual = []
            for k in (0, 1):
                start, end = slot.entry[k], out[k]
                if start is None or end is None:
                    residual.append(None)
                    continue
                r = end - start
                if slot.extra[k] is not None:
                    r = r - slot.extra[k]
                residual.append(r)
            self.method.store(self, slot, track, (residual[0], residual[1]), slot.entry[0], out[0])
            slot.entry = slot.prev_out = slot.extra = None

    # -- results -------------------------------------------------------------------------------
    def summary(self) -> dict:
        s = self.stats
        computed = s["work"] - s["work_skipped"]
        return {
            "method": self.method.name,
            "settings": self.method.settings(),
            "steps": self.run.total_steps,
            "calls": s["calls"],
            "skipped_calls": s["skipped_calls"],
            "blocks": s["blocks"],
            "blocks_skipped": s["blocks_skipped"],
            "skipped_steps": sorted(self.skipped_steps),
            "work_skipped": (s["work_skipped"] / s["work"]) if s["work"] else 0.0,
            # of the block stack alone: embeddings, final layer and sampler are not counted
            "predicted_speedup": (s["work"] / computed) if computed else float("inf"),
        }


def BlockCacheHook(rt: CacheRun, index: int) -> Any:  # noqa: N802 (a class made on first use)
    """The diffusers ModelHook on one block; all logic lives in the run's :class:`CacheRun`.
    The class is built on first use so importing this module does not import diffusers."""
    global _HOOK_CLASS
    if _HOOK_CLASS is None:
        from diffusers.hooks import ModelHook

        class _BlockCacheHook(ModelHook):
            _is_stateful = False

            def __init__(self, rt: CacheRun, index: int):
                super().__init__()
                self.rt, self.index = rt, index

            def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                return self.rt.block(self.index, module, args, kwargs, self.fn_ref.original_forward)

        _HOOK_CLASS = _BlockCacheHook
    return _HOOK_CLASS(rt, index)


_HOOK_CLASS: type | None = None


# ---------------------------------------------------------------------------------------------
# methods: immutable settings + decisions that keep their values in the Slot


@dataclass(frozen=True)
class CacheMethod:
    """Settings common to every method. Subclasses implement :meth:`plan` (and maybe
    :meth:`after_head`); :meth:`store` keeps a computed range's residual."""

    start: float = 0.0  # no skipping before this fraction of the steps
    end: float = 1.0  # nor from this fraction on
    max_skips: int = 0  # most consecutive skipped calls per slot (0: no limit)
    name = "cache"

    def settings(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def plan(self, rt: CacheRun, slot: Slot, block0: nn.Module, args: tuple, kwargs: dict) -> Plan:
        return Plan(track=(0, rt.n))

    def after_head(self, rt: CacheRun, slot: Slot, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        return None

    def store(self, rt: CacheRun, slot: Slot, rng: tuple[int, int], residual: tuple,
              h_entry: torch.Tensor, h_exit: torch.Tensor) -> None:
        slot.residuals[rng] = residual

    def skip(self, rng: tuple[int, int], residual: tuple, label: str = "") -> Plan:
        return Plan(skip=rng, residual=residual, label=label)


@dataclass(frozen=True)
class FirstBlockCache(CacheMethod):
    threshold: float = 0.08
    name = "fbc"

    def plan(self, rt, slot, block0, args, kwargs):
        return Plan(track=(1, rt.n), deferred=True)

    def after_head(self, rt, slot, h_in, h_out):
        r0 = h_out - h_in
        prev = slot.m.get("r0")
        rng = (1, rt.n)
        if prev is not None and rng in slot.residuals and rt.n > 1 and rt.may_skip(slot):
            diff = rel_l1(r0, prev)
            if diff < self.threshold:
                slot.plan = self.skip(rng, slot.residuals[rng])
                return
        slot.m["r0"] = r0  # compared against the last *computed* call's head residual


@dataclass(frozen=True)
class TeaCache(CacheMethod):
    threshold: float = 0.4
    coefficients: tuple = ()
    domain: float = 0.0  # the fit's largest input (0: trust the polynomial everywhere)
    name = "teacache"

    def rescale(self, x: float) -> float:
        coefficients = self.coefficients or IDENTITY_POLY
        if self.domain > 0 and x > self.domain:
            return max(0.0, poly(coefficients, self.domain)) * x / self.domain
        # a fitted polynomial can dip below zero near its ends: never let it pay back
        return max(0.0, poly(coefficients, x))

    def plan(self, rt, slot, block0, args, kwargs):
        modulated = modulated_input(block0, args, kwargs)
        prev = slot.m.get("mod")
        slot.m["mod"] = modulated
        full = (0, rt.n)
        if prev is None or full not in slot.residuals:
            slot.m["acc"] = 0.0
            return Plan(track=full)
        slot.m["acc"] = slot.m.get("acc", 0.0) + self.rescale(rel_l1(modulated, prev))
        if rt.may_skip(slot) and slot.m["acc"] < self.threshold:
            return self.skip(full, slot.residuals[full])
        slot.m["acc"] = 0.0
        return Plan(track=full)


@dataclass(frozen=True)
class MagCache(CacheMethod):
    threshold: float = 0.06
    ratios: tuple = ()
    start: float = 0.2  # retention ratio
    max_skips: int = 3  # K
    name = "magcache"

    def _gamma(self, rt: CacheRun, step: int) -> float:
        total = rt.run.total_steps
        table = _RESAMPLED.get((self.ratios, total))
        if table is None:
            table = _RESAMPLED[(self.ratios, total)] = resample_nearest(self.ratios, total)
        return table[step] if step < len(table) else 1.0

    def plan(self, rt, slot, block0, args, kwargs):
        full = (0, rt.n)
        if not self.ratios or full not in slot.residuals or not rt.may_skip(slot):
            slot.m.update(ratio=1.0, err=0.0, count=0)
            return Plan(track=full)
        ratio = slot.m.get("ratio", 1.0) * self._gamma(rt, slot.step)
        err = slot.m.get("err", 0.0) + abs(1.0 - ratio)
        count = slot.m.get("count", 0) + 1
        if err < self.threshold and (self.max_skips <= 0 or count <= self.max_skips):
            slot.m.update(ratio=ratio, err=err, count=count)
            return self.skip(full, slot.residuals[full])
        slot.m.update(ratio=1.0, err=0.0, count=0)
        return Plan(track=full)


_RESAMPLED: dict = {}


@dataclass(frozen=True)
class MagCacheCalibration(CacheMethod):
    """Never skips; records the residual magnitude of every computed call (one sample)."""

    name = "magcache-calibration"

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        norm = float(residual[0].float().norm(dim=-1).mean())
        rt.records.append({"slot": id(slot), "step": slot.step, "norm": norm})
        slot.residuals[rng] = residual


@dataclass(frozen=True)
class EasyCache(CacheMethod):
    threshold: float = 0.05
    start: float = 0.1  # warm-up
    name = "easycache"

    def plan(self, rt, slot, block0, args, kwargs):
        x = block_arg(block0, "hidden_states", args, kwargs)
        full = (0, rt.n)
        m = slot.m
        prev_x = m.get("x")
        m["x"] = x
        k = m.get("k")
        if prev_x is None or k is None or full not in slot.residuals or not rt.may_skip(slot):
            m["acc"] = 0.0
            return Plan(track=full)
        out_norm = m["y_norm"]
        m["acc"] = m.get("acc", 0.0) + k * float((x - prev_x).norm()) / max(out_norm, 1e-12)
        if m["acc"] < self.threshold:
            # the estimate of this call's output norm stays the last computed one
            return self.skip(full, slot.residuals[full])
        m["acc"] = 0.0
        return Plan(track=full)

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        m = slot.m
        last = m.get("last")  # (input, output) of the previous computed call
        if last is not None:
            dx = float((h_entry - last[0]).norm())
            dy = float((h_exit - last[1]).norm())
            m["k"] = dy / max(dx, 1e-12)
        m["last"] = (h_entry, h_exit)
        m["y_norm"] = float(h_exit.norm())
        slot.residuals[rng] = residual


def _taylor_update(history: dict, value: tuple, x: float, order: int) -> None:
    """Recursive finite differences: D0 = value, D(k+1) = (Dk - Dk_prev) / (x - x_prev)."""
    prev, prev_x = history.get("d"), history.get("x")
    # differences of bf16 tensors divided by small sigma steps lose most of their digits: keep
    # the series in float32 and cast the forecast back
    history["dtypes"] = tuple(None if v is None else v.dtype for v in value)
    derivs = [tuple(None if v is None else v.float() for v in value)]
    if prev is not None and prev_x is not None and abs(x - prev_x) > 1e-12:
        dx = x - prev_x
        for k in range(min(order, len(prev))):
            cur, old = derivs[k], prev[k]
            derivs.append(tuple(None if (c is None or o is None) else (c - o) / dx for c, o in zip(cur, old, strict=True)))
    history["d"], history["x"] = derivs, x


def _taylor_forecast(history: dict, x: float) -> tuple:
    derivs, x0 = history["d"], history["x"]
    dx = x - x0
    out = list(derivs[0])
    for k in range(1, len(derivs)):
        factor = dx**k / math.factorial(k)
        out = [None if (o is None or d is None) else o + factor * d for o, d in zip(out, derivs[k], strict=True)]
    return tuple(None if o is None else o.to(t) for o, t in zip(out, history["dtypes"], strict=True))


@dataclass(frozen=True)
class TaylorSeer(CacheMethod):
    interval: int = 4
    order: int = 1
    name = "taylorseer"

    def plan(self, rt, slot, block0, args, kwargs):
        full = (0, rt.n)
        hist = slot.m.get("taylor")
        if (self.interval <= 1 or hist is None or not rt.may_skip(slot)
                or slot.since_compute + 1 >= self.interval):
            return Plan(track=full)
        return self.skip(full, _taylor_forecast(hist, slot.sigma))

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        _taylor_update(slot.m.setdefault("taylor", {}), residual, slot.sigma, self.order)
        slot.residuals[rng] = residual


@dataclass(frozen=True)
class CGTaylor(CacheMethod):
    """Confidence-gated TaylorSeer: forecast block 0 and the rest; when block 0's forecast was
    within ``gate`` (relative L1) of the real thing, trust the rest's forecast too."""

    gate: float = 0.13
    order: int = 1
    name = "cgtaylor"

    def plan(self, rt, slot, block0, args, kwargs):
        return Plan(track=(1, rt.n), deferred=True)

    def after_head(self, rt, slot, h_in, h_out):
        head, rest = slot.m.get("head"), slot.m.get("rest")
        r0 = h_out - h_in
        slot.m["r0"] = r0
        if head is None or rest is None or rt.n < 2 or not rt.may_skip(slot) or len(head["d"]) < min(2, self.order + 1):
            return
        forecast = _taylor_forecast(head, slot.sigma)[0]
        if rel_l1(r0, forecast) < self.gate:
            slot.plan = self.skip((1, rt.n), _taylor_forecast(rest, slot.sigma))

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        _taylor_update(slot.m.setdefault("rest", {}), residual, slot.sigma, self.order)
        _taylor_update(slot.m.setdefault("head", {}), (slot.m["r0"], None), slot.sigma, self.order)
        slot.residuals[rng] = residual


@dataclass(frozen=True)
class DeltaDiT(CacheMethod):
    """Δ-DiT: before ``boundary`` (fraction of steps) reuse the rear blocks' deviation, after it
    the front blocks'; a cached range is recomputed every ``interval`` calls."""

    interval: int = 2
    cached_blocks: float = 0.5  # fraction of the stack in the cached range
    boundary: float = 0.5
    name = "deltadit"

    def plan(self, rt, slot, block0, args, kwargs):
        k = max(1, min(rt.n, round(self.cached_blocks * rt.n)))
        frac = rt.step_fraction(slot)
        rear = frac is not None and frac < self.boundary
        rng = (rt.n - k, rt.n) if rear else (0, k)
        if slot.m.get("phase") != rear:
            slot.m["phase"] = rear
            slot.m["count"] = 0
        count = slot.m["count"]
        slot.m["count"] = count + 1
        if self.interval <= 1 or rng not in slot.residuals or not rt.may_skip(slot) or count % self.interval == 0:
            return Plan(track=rng)
        return self.skip(rng, slot.residuals[rng], "rear" if rear else "front")


@dataclass(frozen=True)
class FORA(CacheMethod):
    """Static interval cache: recompute the stack every ``interval`` calls, reuse its residual between."""

    interval: int = 3
    name = "fora"

    def plan(self, rt, slot, block0, args, kwargs):
        full = (0, rt.n)
        if self.interval <= 1 or full not in slot.residuals or not rt.may_skip(slot) \
                or slot.since_compute + 1 >= self.interval:
            return Plan(track=full)
        return self.skip(full, slot.residuals[full])


METHODS = {cls.name: cls for cls in (FirstBlockCache, TeaCache, MagCache, EasyCache, TaylorSeer, CGTaylor,
                                     DeltaDiT, FORA)}


# ---------------------------------------------------------------------------------------------
# the MODEL patch


class CachePatch(ModelPatch):
    """A MODEL patch running ``method``; all run state is made fresh in :meth:`begin_run`."""

    def __init__(self, method: CacheMethod, sink: Callable[[dict, list], None] | None = None):
        self.method = method
        self.sink = sink  # calibration nodes: receives (summary, records) after each run
        args = ", ".join(f"{k}={v}" for k, v in method.settings().items() if k not in ("ratios", "coefficients"))
        self.key = f"{method.name}({args})"

    def begin_run(self, run: SamplingRun) -> CacheRun:
        rt = CacheRun(self.method, run)
        rt.install()
        return rt

    def wrap(self, state: CacheRun, call: ModelCall, forward: Callable[[ModelCall], torch.Tensor]) -> torch.Tensor:
        state.begin_call(call)
        try:
            return forward(call)
        finally:
            state.end_call()

    def end_run(self, run: SamplingRun, state: CacheRun) -> None:
        state.remove()
        summary = state.summary()
        run.extras.setdefault("cache", []).append(summary)
        if state.records:
            run.extras.setdefault("cache_records", []).extend(state.records)
        log.info("cache %s: skipped %d/%d calls, %d/%d blocks (x%.2f predicted)", summary["method"],
                 summary["skipped_calls"], summary["calls"], summary["blocks_skipped"], summary["blocks"],
                 summary["predicted_speedup"])
        try:
            from app.core.context import current

            ctx = current()
            ctx.emit({"type": "cache", "run_id": ctx.run_id, "node": ctx.node_id, **summary})
        except Exception as exc:  # reporting must never fail a run
            log.debug("cache event not sent: %s", exc)
        _notify(summary)
        if self.sink is not None:
            self.sink(summary, state.records)


# Listeners (benchmarks, tests) that want every finished run's summary.
_LISTENERS: list[Callable[[dict], None]] = []


def add_listener(fn: Callable[[dict], None]) -> Callable[[], None]:
    """Call ``fn(summary)`` after every cached sampling run; returns a function removing it."""
    _LISTENERS.append(fn)
    return lambda: _LISTENERS.remove(fn) if fn in _LISTENERS else None


def _notify(summary: dict) -> None:
    for fn in list(_LISTENERS):
        try:
            fn(summary)
        except Exception as exc:
            log.debug("cache listener failed: %s", exc)


def teacache_coefficients(family: str, text: str = "auto") -> tuple:
    """"auto" -> the family's fitted polynomial (identity when none); else comma-separated numbers."""
    text = (text or "auto").strip()
    if text.lower() == "auto":
        return tuple(TEACACHE_COEFFICIENTS.get(family, IDENTITY_POLY))
    return _numbers(text, "coefficients")


def teacache_domain(family: str, text: str = "auto") -> float:
    """The fitted range's end for the family's own polynomial (0 for user-given ones)."""
    return TEACACHE_DOMAIN.get(family, 0.0) if (text or "auto").strip().lower() == "auto" else 0.0


def magcache_ratios(family: str, text: str = "auto") -> tuple:
    """"auto" -> the family's calibrated ratios (shapes-dit's curve when the family has none)."""
    text = (text or "auto").strip()
    if text.lower() == "auto":
        ratios = MAGCACHE_RATIOS.get(family)
        if ratios is None and families.FAMILIES.get(family) is not None:
            ratios = families.get(family).magcache_ratios()
        if ratios is None:
            log.warning("MagCache: no calibrated ratios for family %r; using shapes-dit's curve "
                        "(connect MagCache Calibrate for this model's own)", family)
            ratios = MAGCACHE_RATIOS.get("shapes-dit")
        return tuple(ratios or ())
    return _numbers(text, "ratios")


def _numbers(text: str, what: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.replace("[", "").replace("]", "").replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: expected finite numbers separated by commas, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------
# calibration


def magcache_ratios_from_records(records: list[dict]) -> list[float]:
    """Per-step magnitude ratios |r_t| / |r_{t-1}| from a calibration run (first = 1), averaged
    over the run's slots (CFG branches)."""
    by_slot: dict[int, list[tuple[int, float]]] = {}
    for r in records:
        by_slot.setdefault(r["slot"], []).append((r["step"], r["norm"]))
    per_step: dict[int, list[float]] = {}
    for seq in by_slot.values():
        seq.sort()
        for (s0, n0), (s1, n1) in zip(seq, seq[1:], strict=False):
            if s1 == s0 + 1:
                per_step.setdefault(s1, []).append(n1 / max(n0, 1e-12))
    steps = max((r["step"] for r in records), default=-1) + 1
    return [1.0] + [sum(per_step.get(s, [1.0])) / len(per_step.get(s, [1.0])) for s in range(1, steps)]


@dataclass(frozen=True)
class TeaCacheCalibration(CacheMethod):
    """Never skips; records TeaCache's (input rel-L1, output rel-L1) pair for every call."""

    name = "teacache-calibration"

    def plan(self, rt, slot, block0, args, kwargs):
        modulated = modulated_input(block0, args, kwargs)
        prev = slot.m.get("mod")
        slot.m["mod"] = modulated
        slot.m["x"] = None if prev is None else rel_l1(modulated, prev)
        return Plan(track=(0, rt.n))

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        prev = slot.m.get("out")
        slot.m["out"] = h_exit
        if prev is not None and slot.m.get("x") is not None:
            rt.records.append({"step": slot.step, "x": slot.m["x"], "y": rel_l1(h_exit, prev)})
        slot.residuals[rng] = residual


def fit_teacache(records: list[dict], degree: int = 4) -> list[float]:
    """Least-squares polynomial y = P(x) (highest power first) through calibration pairs."""
    import numpy as np

    x = np.array([r["x"] for r in records], dtype=np.float64)
    y = np.array([r["y"] for r in records], dtype=np.float64)
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} calibration pairs, got {len(x)} (sample more steps or prompts)")
    return [float(c) for c in np.polyfit(x, y, degree)]
