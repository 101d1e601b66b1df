"""Regional compilation of a MODEL: ``torch.compile`` on each repeated transformer block.

The blocks to compile are the classes the model declares in diffusers' ``_repeated_blocks``
(what ``compile_repeated_blocks`` compiles), else the block stack the cache accelerators hook
plus the blocks they leave alone (HiDream's double-stream blocks).
Each block's *forward* is compiled rather than its ``__call__`` (``nn.Module.compile``, which
``compile_repeated_blocks`` uses): diffusers' block hooks (cache accelerators) replace
``forward`` and call the original, so their Python stays eager around the compiled block
instead of being traced into it (measured on a tiny Flux with FORA: 3 graphs instead of 11,
and ``fullgraph=True`` keeps working with cache hooks). Blocks of one class share their
compiled graph, so a 57-block Flux compiles two graphs.

A compiled MODEL is a view: a structural copy of the base transformer sharing every
parameter and buffer with it (no second copy of the weights), with compiled forwards on the
copy's blocks. The base handle and its other views stay eager. Views are cached per
(base transformer, options), so other workflows and re-runs with another prompt, seed,
step count or guidance reuse the compiled code (no recompiles while shapes stay the same).

``scope="model"`` compiles the whole transformer forward instead (embedders, RoPE and the
output layer fused too, and with a CUDA-graph mode one graph per step instead of one per block);
its first compile takes longer, and cache hooks or unfused LoRA make it run eagerly. The
CUDA-graph modes (reduce-overhead, max-autotune) replay recorded graphs whose outputs live in a
pool that the next replay overwrites: each transformer call marks a new step and returns a copy
of its output, so samplers that keep earlier velocities (multistep, Heun) stay correct.

Dynamo keeps one cache per code object: every compiled block of a class, in every view of the
process, adds its entries to the one list of that class's ``forward``, one per distinct block
structure (SD3.5-medium: dual-attention, plain, and the context_pre_only last block) and per
view (other compile options, dtype, quantization). Past ``torch._dynamo.config.recompile_limit``
(8) dynamo builds no new graph for that code for the rest of the process: the graphs it has keep
running, every other block runs eagerly, and one log line says so (with ``fullgraph=True`` it
raises instead). The H200 bench's third SD3.5-medium view, int8+compile, hit it; a CPU repro:
the tests. So
making a view raises the process-wide ``recompile_limit`` (and ``accumulated_recompile_limit``
with it) to ``RECOMPILES_PER_STRUCTURE`` times the distinct (options, structure) pairs compiled
on one code object so far: a setting of the whole process, only ever raised, never restored,
and logged when it changes. A run that still meets the limit gets a warning event.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import CodeType
from typing import Any

import torch
from torch import nn

from app.core.memo import SHARES_STORAGE_WITH
from app.models.accelerators.runtime import BLOCK_LISTS, stack_blocks
from app.models.events import emit, warn
from app.models.handles import ModelCall, ModelHandle, ModelPatch, SamplingRun, is_group_offloaded
from app.models.residency import same_device

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKENDS = ("inductor", "aot_eager", "eager")
DYNAMIC = {"auto": None, "true": True, "false": False}
SCOPES = ("blocks", "model")  # regional (each repeated block) or the whole transformer forward
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# inductor knobs on top of the mode (torch.compile's ``options``, scoped to these compiles, not
# the process): coordinate-descent tuning searches the launch configs of every generated
# kernel, which torchao turns on globally on import (~220 s for Flux's first fp8 compile on
# an H200) and the max-autotune modes include; measured on Flux-dev fp8+compile it gave
# nothing (104 ms/step with it, 103 ms without), so "off" keeps compiles short
TUNINGS: dict[str, dict[str, Any]] = {
    "inherit": {},  # the process's inductor config as it stands
    "coordinate-descent": {"coordinate_descent_tuning": True},
    "off": {"coordinate_descent_tuning": False},
}
# on a compiled view: the eager transformer it shares weights with (the memo cache counts only
# the view's own storages)
BASE_ATTR = SHARES_STORAGE_WITH


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` settings of one compiled view (part of its cache key)."""

    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str = "inductor"
    tuning: str = "off"  # a key of TUNINGS
    scope: str = "blocks"  # a member of SCOPES

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"CompileModel: unknown scope {self.scope!r}; expected one of {', '.join(SCOPES)}")

    @property
    def cudagraphs(self) -> bool:
        """Whether the compiled code replays CUDA graphs (outputs overwritten by the next replay)."""
        return self.backend == "inductor" and self.mode in CUDAGRAPH_MODES

    def kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {"fullgraph": self.fullgraph, "dynamic": self.dynamic, "backend": self.backend}
        if self.backend != "inductor":  # mode and knobs are inductor settings; other backends reject them
            return options
        knobs = TUNINGS[self.tuning]
        if knobs:  # torch.compile takes mode or options, not both: spell the mode out as options
            from torch._inductor import list_mode_options

            options["options"] = {**list_mode_options(self.mode), **knobs}
        else:
            options["mode"] = self.mode
        return options


COMPILED_LISTS = ("double_stream_blocks", *BLOCK_LISTS)  # the cache stack and HiDream's double-stream blocks
_VIEWS: weakref.WeakKeyDictionary[nn.Module, dict[CompileOptions, nn.Module]] = weakref.WeakKeyDictionary()


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The blocks to compile: instances of the classes in ``_repeated_blocks``, else the block stack."""
    names = set(getattr(type(transformer), "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names] if names else []
    return blocks or stack_blocks(transformer, COMPILED_LISTS)


def compiled_regions(transformer: nn.Module, scope: str) -> list[nn.Module]:
    """The modules whose forward a view compiles: the whole transformer or each repeated block."""
    return [transformer] if scope == "model" else repeated_blocks(transformer)


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose parameters and buffers are the original tensors."""
    memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def eager_base(transformer: nn.Module) -> nn.Module:
    """The eager transformer behind a compiled view (the transformer itself otherwise)."""
    ref = getattr(transformer, BASE_ATTR, None)
    return (ref() if ref is not None else None) or transformer


def compiled_transformer(transformer: nn.Module, options: CompileOptions) -> nn.Module:
    """The cached compiled view of ``transformer`` (made on first use; compiles lazily)."""
    base = eager_base(transformer)
    if is_group_offloaded(base):
        raise ValueError("CompileModel: this model streams its blocks from RAM (offload=blocks); "
                         "load it resident (offload=none) to compile it")
    views = _VIEWS.setdefault(base, {})
    view = views.get(options)
    if view is None:
        view = shared_copy(base)
        regions = compiled_regions(view, options.scope)
        allow_recompiles(regions, options)  # before anything compiles: a limit once hit stays hit
        for region in regions:
            region.forward = torch.compile(region.forward, **options.kwargs())
        # a weak reference (the cache holds the view, the view must not keep the base alive) and
        # set past nn.Module.__setattr__, so the base is not registered as a submodule
        object.__setattr__(view, BASE_ATTR, weakref.ref(base))
        views[options] = view
    return view


def compile_model(model: ModelHandle, options: CompileOptions) -> ModelHandle:
    """A MODEL view running compiled blocks; the input MODEL is unchanged. Patches carry over
    (they act on ``run.transformer``, which is the view)."""
    view = compiled_transformer(model.transformer, options)
    patches = tuple(p for p in model.patches if not isinstance(p, CompileReport))
    return replace(model, transformer=view, patches=(*patches, CompileReport(options)), _active=[], _cache={})


# ---------------------------------------------------------------------------------------------
# dynamo's recompile limit (see the module docstring)

# each distinct structure gets the allowance dynamo's default gives one function (its first
# graph, then new resolutions, batch sizes, attention patches)
RECOMPILES_PER_STRUCTURE = 8
# per compiled code object: the distinct (options, structure) compiled in this process
_COMPILED: dict[CodeType, set[tuple]] = {}
_COMPILED_LOCK = threading.Lock()


def structure(module: nn.Module) -> tuple:
    """What dynamo's guards tell apart between modules of one class: the submodule tree and each
    tensor's kind (torchao's quantized tensors are subclasses), dtype, device and shape."""
    tensors = (*module.named_parameters(), *module.named_buffers())
    return (tuple((name, type(m)) for name, m in module.named_modules()),
            tuple((name, type(t), t.dtype, t.device.type, tuple(t.shape)) for name, t in tensors))


def region_code(region: nn.Module) -> CodeType:
    """The code object dynamo caches a compiled region's graphs on (its class's forward)."""
    return type(region).forward.__code__


def allow_recompiles(regions: list[nn.Module], options: CompileOptions) -> None:
    """Raise dynamo's process-wide recompile limits to what the views compiled so far need."""
    from torch._dynamo import config

    with _COMPILED_LOCK:  # views may be made from several threads (the server's workers)
        for region in regions:
            _COMPILED.setdefault(region_code(region), set()).add((options, structure(region)))
        wanted = RECOMPILES_PER_STRUCTURE * max(len(compiled) for compiled in _COMPILED.values())
    if config.recompile_limit < wanted:
        log.info("torch._dynamo.config.recompile_limit %d -> %d for the process (%d distinct compiled "
                 "regions share one code object)", config.recompile_limit, wanted, wanted // RECOMPILES_PER_STRUCTURE)
        config.recompile_limit = wanted
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, config.recompile_limit)


class RecompileLimitHits(logging.Handler):
    """Keeps dynamo's "hit config.recompile_limit" warnings: past the limit it compiles no new
    graph for that code for the rest of the process, and this log line is all it says."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.messages.append(message)

    def about(self, codes: set[CodeType]) -> str:
        """The first message about one of ``codes`` (they name the function by file:line), or ""."""
        # dynamo names the function as "(file:line)"; the ")" keeps line 12 from matching 123
        places = [f"{code.co_filename}:{code.co_firstlineno})" for code in codes]
        return next((m for m in self.messages if any(place in m for place in places)), "")


def first_lines(message: str) -> str:
    """Dynamo's limit message up to the line naming the function (file:line)."""
    return " ".join(line.strip() for line in message.splitlines()[:2])


LIMIT_HITS = RecompileLimitHits()
logging.getLogger("torch._dynamo.convert_frame").addHandler(LIMIT_HITS)


# ---------------------------------------------------------------------------------------------
# reporting compile time as its own phase


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _signature(call: ModelCall) -> tuple:
    """What a recompile depends on for us: the shapes and dtypes of the transformer's tensors."""
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in call.kwargs.items() if isinstance(v, torch.Tensor)))


def has_module_hooks(blocks: list[nn.Module]) -> bool:
    """Forward (pre-)hooks inside the blocks, such as an unfused LoRA's. Dynamo does not guard
    on hooks added after a block was compiled (``skip_nnmodule_hook_guards``): the compiled
    graph would silently run without them."""
    return any(m._forward_hooks or m._forward_pre_hooks for b in blocks for m in b.modules())


class CompileReport(ModelPatch):
    """Announces a call that compiles (``{"type": "phase", "phase": "compiling"}``) and reports
    its duration (``"compiled"``, seconds, graphs) to the run's events and ``run.extras``.
    Runs the blocks eagerly for a run whose blocks carry module hooks (an unfused LoRA):
    correct output at eager speed, with a warning (fused LoRA stays compiled). Warns, once a
    run, when dynamo's recompile limit was hit for the compiled regions' code."""

    def __init__(self, options: CompileOptions):
        self.options = options
        tuning = "" if options.tuning == "inherit" else f", tuning={options.tuning}"
        scope = "" if options.scope == "blocks" else f", scope={options.scope}"  # blocks: keys as before
        self.key = (f"compile({options.mode}, fullgraph={options.fullgraph}, dynamic={options.dynamic}, "
                    f"{options.backend}{tuning}{scope})")

    def begin_run(self, run: SamplingRun) -> dict:
        # after an offload and reload through another handle, tensors the view does not share
        # may sit on another device. Move only then: Module.to on every run costs ~0.5 ms per
        # torchao layer (it rebuilds each quantized weight) and ~10 ms per Flux step on an H200
        devices = {t.device for t in (*run.transformer.parameters(), *run.transformer.buffers())}
        if any(not same_device(d, run.handle.device) for d in devices):
            run.transformer.to(run.handle.device)
        return {"eager": None, "limit_warned": False}

    def wrap(self, state: dict, call: ModelCall, forward: Callable[[ModelCall], torch.Tensor]) -> torch.Tensor:
        if state["eager"] is None:  # decided at the first call: every patch has begun by then
            state["codes"] = {region_code(r) for r in compiled_regions(call.run.transformer, self.options.scope)}
            blocks = repeated_blocks(call.run.transformer)
            state["eager"] = has_module_hooks(blocks)
            if state["eager"]:
                warn("the blocks carry forward hooks (an unfused LoRA?); running them eagerly for this run. "
                     "Fuse the LoRA to keep the compiled speed.", self.key)
            elif self.options.scope == "model" and has_block_hooks(blocks):
                # a whole-model graph would trace the hooks' per-step Python state (recompiles)
                state["eager"] = True
                warn("scope=model with a cache accelerator on the blocks: running eagerly for this run; "
                     "use scope=blocks to combine compile and caching.", self.key)
        if state["eager"]:
            with torch.compiler.set_stance("force_eager"):
                return forward(call)
        seen = call.run.transformer.__dict__.setdefault("_ditgraph_compiled_inputs", set())
        signature = _signature(call)
        if signature in seen:
            out = self._call(call, forward)
        else:
            emit({"type": "phase", "phase": "compiling"})
            graphs, started = graphs_compiled(), time.perf_counter()
            out = self._call(call, forward)
            seconds, new_graphs = time.perf_counter() - started, graphs_compiled() - graphs
            seen.add(signature)
            call.run.extras.setdefault("compile", []).append({"seconds": seconds, "graphs": new_graphs})
            log.info("compiled %d graph(s) in %.1f s (%s)", new_graphs, seconds, self.key)
            emit({"type": "phase", "phase": "compiled", "seconds": seconds, "graphs": new_graphs})
        if LIMIT_HITS.messages and not state["limit_warned"]:
            self._warn_on_limit(state)
        return out

    def _warn_on_limit(self, state: dict) -> None:
        hit = LIMIT_HITS.about(state["codes"])
        if hit:
            state["limit_warned"] = True
            warn(f"torch.compile hit dynamo's recompile limit for these blocks: those it had not compiled "
                 f"before run eagerly (slower) until the process restarts. Dynamo said: {first_lines(hit)}",
                 self.key)

    def _call(self, call: ModelCall, forward: Callable[[ModelCall], torch.Tensor]) -> torch.Tensor:
        if not self.options.cudagraphs:
            return forward(call)
        # a new step for the CUDA-graph trees (else a replay may be refused or overwrite outputs
        # still in use), and a copy of the output, which lives in the graphs' pool
        torch.compiler.cudagraph_mark_step_begin()
        return forward(call).clone()


def has_block_hooks(blocks: list[nn.Module]) -> bool:
    """diffusers hooks (cache accelerators) on the blocks (a registry emptied by their removal
    stays behind: count only hooks)."""
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for b in blocks for m in b.modules())
