"""The shared runtime of every cache method: block discovery, per-run state, the block hook,
the MODEL patch and the run listeners.

The transformer's block stack (SD3/shapes-dit ``transformer_blocks``; Flux
``transformer_blocks`` + ``single_transformer_blocks``; PixArt, Sana and LTX-Video
``transformer_blocks``; Lumina 2 ``layers``; HunyuanDiT and Wan ``blocks``; HiDream
``single_stream_blocks`` only: its double-stream blocks return (image, text) and are fed a new text
sequence each, so they always run) gets one diffusers :class:`ModelHook` per block
(``diffusers.hooks.HookRegistry``), installed in ``begin_run`` and removed in ``end_run``. A model
with two experts (Wan 2.2) has both stacks hooked; each expert's calls get slots of their own, so
one expert never reuses the other's residuals. Methods that act inside blocks (attention
broadcast) also hook the blocks' attention modules (:meth:`CacheMethod.attention`).

A block's *streams* are its image tokens and, for joint blocks that return
``(encoder_hidden_states, hidden_states)``, its text tokens.
Before block 0 runs, the method *plans* the call: compute everything, or skip a contiguous range
``[a, b)`` of blocks. Skipped blocks pass their inputs through unchanged and the last one adds
the range's residual (cached or forecast), so whatever the model does *between* blocks
(ControlNet residual adds) still happens. While computing, the runtime records the range's own
residual (output - input, minus any between-block additions), which the method stores.

Per-run state lives in :class:`CacheRun` (created by ``begin_run``), never on the patch, so a
memoized MODEL never replays stale residuals. Calls are grouped into *slots* by their order
within a step (CFG evaluated as two calls, Heun's second evaluation), each slot with its own
history. After the run the statistics go to ``run.extras["cache"]``, to the run's event stream
(``{"type": "cache", ...}``), to the listeners and to the log.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.models.handles import ModelCall, ModelPatch, SamplingRun

if TYPE_CHECKING:
    from app.models.accelerators.method import CacheMethod

log = logging.getLogger(__name__)

HOOK_PREFIX = "ditgraph_cache"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "layers", "single_stream_blocks", "blocks")
IDENTITY_POLY = [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# the block stack


def stack_blocks(transformer: nn.Module, lists: Sequence[str] = BLOCK_LISTS) -> list[nn.Module]:
    """The transformer's main blocks in execution order (Flux: double then single blocks)."""
    blocks: list[nn.Module] = []
    for name in lists:
        modules = getattr(transformer, name, None)
        if isinstance(modules, nn.ModuleList):
            blocks.extend(modules)
    if not blocks:
        raise ValueError(f"{type(transformer).__name__}: no transformer block list found "
                         f"(looked for {', '.join(lists)}); cache accelerators cannot hook it")
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

    adaLN-Zero blocks (SD3, Flux, Lumina 2): ``norm1(h, emb=temb)[0]``; blocks with a
    scale-shift table (PixArt, Sana: ``timestep`` (B, K*D); LTX-Video: ``temb`` (B, 1 or N, K*D);
    Wan: ``temb`` (B, K, D) or per token (B, N, K, D)): ``norm1(h) * (1 + scale) + shift``.
    Falls back to the raw hidden states.
    """
    hidden = block_arg(block, "hidden_states", args, kwargs)
    temb = block_arg(block, "temb", args, kwargs)
    norm = getattr(block, "norm1", None) or getattr(block, "norm", None)
    table = getattr(block, "scale_shift_table", None)
    if temb is not None and norm is not None and table is None:
        try:
            out = norm(hidden, emb=temb)
            return out[0] if isinstance(out, tuple) else out
        except TypeError:
            pass
    modulation = block_arg(block, "timestep", args, kwargs) if temb is None else temb
    if modulation is not None and table is not None and norm is not None:
        k, d = table.shape[-2], table.shape[-1]
        b = hidden.shape[0]
        if modulation.numel() % (b * k * d) == 0:
            # (B, tokens or 1, K, D) + the table; rows 0 and 1 are the first shift and scale
            values = table.reshape(1, 1, k, d).to(modulation.dtype) + modulation.reshape(b, -1, k, d)
            shift, scale = values[:, :, 0], values[:, :, 1]
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
        self.experts = experts(run)
        self.stacks = [stack_blocks(expert) for expert in self.experts]
        self.blocks = self.stacks[0]
        self.n = len(self.blocks)
        if any(len(stack) != self.n for stack in self.stacks):
            raise ValueError(f"the model's experts have different block counts ({[len(s) for s in self.stacks]}); "
                             "cache accelerators need the same stack in each")
        self.pairs: dict[int, bool] = {}  # block index -> returns (encoder, hidden)
        self.enc_none: dict[int, bool] = {}  # block index -> its encoder output is None (SD3 last)
        self.slots: dict[Any, Slot] = {}
        self.slot: Slot | None = None
        self._last_step: int | None = None
        self._call_in_step = 0
        self._hooked: list[nn.Module] = []
        self.hook_name = f"{HOOK_PREFIX}_{method.name}_{id(self):x}"
        # block cost ~ its parameter count (same tokens per block): Flux's double blocks weigh
        # ~2.4x its single blocks, which a block count alone would hide
        self.weights = [sum(p.numel() for p in block.parameters()) or 1 for block in self.blocks]
        self.stats = {"calls": 0, "skipped_calls": 0, "blocks": 0, "blocks_skipped": 0, "work": 0, "work_skipped": 0,
                      "attention_calls": 0, "attention_skipped": 0}
        self.skipped_steps: set[int] = set()
        self.records: list[dict] = []  # calibration data (per computed call)

    # -- hooks ---------------------------------------------------------------------------------
    def install(self) -> None:
        from diffusers.hooks import HookRegistry

        for block in (b for stack in self.stacks for b in stack):
            existing = getattr(block, "_diffusers_hook", None)
            if existing is not None and any(name.startswith(HOOK_PREFIX) for name in existing.hooks):
                raise ValueError("this model already carries a cache accelerator in the running sampler; "
                                 "chain at most one cache node per MODEL")
        targets: list[tuple[nn.Module, Any]] = []
        for stack in self.stacks:
            for index, block in enumerate(stack):
                targets.append((block, BlockCacheHook(self, index)))
                if self.method.hooks_attention:
                    targets += [(module, AttentionCacheHook(self, (index, name)))
                                for name, module in attention_modules(block)]
        try:
            for module, hook in targets:
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, self.hook_name)
                self._hooked.append(module)
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        for module in self._hooked:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and self.hook_name in registry.hooks:
                registry.remove_hook(self.hook_name, recurse=False)
        self._hooked = []

    # -- calls ---------------------------------------------------------------------------------
    def begin_call(self, call: ModelCall) -> None:
        step = call.run.step
        if step != self._last_step:
            self._last_step, self._call_in_step = step, 0
        # a call's slot: its expert (Wan 2.2), its place in the step (CFG branch), its shape
        expert = 0 if len(self.experts) == 1 else self._expert(call)
        key = (expert, self._call_in_step, tuple(call.latents.shape))
        self._call_in_step += 1
        slot = self.slots.setdefault(key, Slot())
        slot.step = step
        slot.sigma = self._sigma(call, step)
        slot.plan = Plan()
        self.slot = slot

    def _expert(self, call: ModelCall) -> int:
        handle = self.run.handle
        chosen = handle.info.pick_transformer(handle, call.sigma_host if call.sigma_host is not None else call.sigma.cpu())
        return next((i for i, expert in enumerate(self.experts) if expert is chosen), 0)

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
        if slot.m.pop(ATTENTION_SKIPPED, False):
            self.skipped_steps.add(slot.step)
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

    def in_window(self, slot: Slot) -> bool:
        """Inside [start, end) of the schedule."""
        frac = self.step_fraction(slot)
        return frac is not None and self.method.start - 1e-9 <= frac < self.method.end - 1e-9

    def may_skip(self, slot: Slot) -> bool:
        """Inside [start, end) of the schedule, under the consecutive-skip limit, with history."""
        if slot.calls == 0 or not self.in_window(slot):
            return False
        m = self.method
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

    def attention(self, key: tuple, module: nn.Module, args: tuple, kwargs: dict, forward: Callable) -> Any:
        """An attention module's call inside a hooked block: the method computes or reuses it."""
        slot = self.slot
        if slot is None:
            return forward(*args, **kwargs)
        out, skipped = self.method.attention(self, slot, key, module, args, kwargs, forward)
        self.stats["attention_calls"] += 1
        if skipped:
            self.stats["attention_skipped"] += 1
            slot.m[ATTENTION_SKIPPED] = True
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
            "attention_calls": s["attention_calls"],
            "attention_skipped": s["attention_skipped"],
            "work_skipped": (s["work_skipped"] / s["work"]) if s["work"] else 0.0,
            # of the block stack alone: embeddings, final layer and sampler are not counted
            "predicted_speedup": (s["work"] / computed) if computed else float("inf"),
        }


def _cache_hook(route: Callable[[nn.Module, tuple, dict, Callable], Any]) -> Any:
    """A diffusers ModelHook whose forward is ``route(module, args, kwargs, original_forward)``;
    all logic lives in the run's :class:`CacheRun`. The class is built on first use so importing
    this module does not import diffusers."""
    global _HOOK_CLASS
    if _HOOK_CLASS is None:
        from diffusers.hooks import ModelHook

        class _CacheHook(ModelHook):
            _is_stateful = False

            def __init__(self, route: Callable):
                super().__init__()
                self.route = route

            def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                return self.route(module, args, kwargs, self.fn_ref.original_forward)

        _HOOK_CLASS = _CacheHook
    return _HOOK_CLASS(route)


_HOOK_CLASS: type | None = None


def BlockCacheHook(rt: CacheRun, index: int) -> Any:  # noqa: N802 (named as the hook it makes)
    """The hook on one block."""
    return _cache_hook(lambda module, args, kwargs, forward: rt.block(index, module, args, kwargs, forward))


def AttentionCacheHook(rt: CacheRun, key: tuple) -> Any:  # noqa: N802
    """The hook on one attention module (key: block index, name in the block)."""
    return _cache_hook(lambda module, args, kwargs, forward: rt.attention(key, module, args, kwargs, forward))


ATTENTION_SKIPPED = "_attention_skipped"  # Slot.m key: this call reused an attention output


def experts(run: SamplingRun) -> list[nn.Module]:
    """The transformers a run may call: the model, and Wan 2.2's low-noise expert."""
    second = getattr(run.handle, "transformer_2", None)
    return [run.transformer] + ([second] if second is not None else [])


def attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The diffusers attention modules of a block (outermost only), by their name in the block."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    found: list[tuple[str, nn.Module]] = []
    for name, module in block.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found


def is_cross_attention(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether an attention call attends to text: diffusers' ``is_cross_attention`` where the module
    has it, else whether it was given ``encoder_hidden_states`` (LTX-Video's attention)."""
    flag = getattr(module, "is_cross_attention", None)
    if flag is not None:
        return bool(flag)
    return block_arg(module, "encoder_hidden_states", args, kwargs) is not None



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


def parse_numbers(text: str, what: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.replace("[", "").replace("]", "").replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: expected finite numbers separated by commas, got {text!r}")
    return values
