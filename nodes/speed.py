"""Speed: compile, quantize and pick the attention kernel of a MODEL (each returns a new MODEL).

CompileModel compiles the repeated transformer blocks (a view sharing the weights, cached per
base model and options: app/models/compile.py); QuantizeModel makes a quantized copy with
torchao (app/models/quantizers/); AttentionBackend runs the model under one attention kernel
(app/models/attention.py). Order them loader -> QuantizeModel -> LoRA/cache/... -> CompileModel;
the other model patches keep working on the result.
"""

from __future__ import annotations

import logging
from typing import Annotated

from app.core.registry import NodeResult, node
from app.core.types import MODEL, Spec
from app.models import attention, quantizers
from app.models.compile import BACKENDS, DYNAMIC, MODES, SCOPES, TUNINGS, CompileOptions, compile_model
from app.models.handles import ModelHandle
from app.models.patches.lora import LoraPatch

log = logging.getLogger(__name__)

CATEGORY = "model_patches/speed"


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="Compile Model")
def CompileModel(
    model: MODEL,
    mode: Annotated[str, Spec(choices=MODES, tooltip="torch.compile mode (inductor): max-autotune searches "
                                                     "kernels longer for a little more speed.")] = "default",
    fullgraph: Annotated[bool, Spec(tooltip="Compile each block as one graph (an error instead of a silent "
                                            "graph break).")] = False,
    dynamic: Annotated[str, Spec(choices=tuple(DYNAMIC), tooltip="Shape-generic kernels: 'auto' recompiles "
                                 "once for a second resolution, then goes dynamic.")] = "auto",
    backend: Annotated[str, Spec(choices=BACKENDS, tooltip="inductor generates kernels (the speed-up); "
                                 "aot_eager/eager only trace (debugging).")] = "inductor",
    tuning: Annotated[str, Spec(choices=tuple(TUNINGS), tooltip="inductor's coordinate-descent tuning: "
                                "'inherit' keeps the process setting (torchao turns it on), 'off' keeps "
                                "compiles short, 'coordinate-descent' searches kernel launch configs "
                                "(minutes longer).")] = "off",
    scope: Annotated[str, Spec(choices=SCOPES, tooltip="blocks: each repeated block (fast to compile, works "
                               "with cache accelerators); model: the whole transformer forward (longer first "
                               "compile; with reduce-overhead one CUDA graph per step).")] = "blocks",
) -> ModelHandle:
    """Compile the repeated transformer blocks with torch.compile (regional compilation: one
    graph per block type, seconds to a few minutes on the first run, shown as a 'compiling'
    phase). Reused across runs and workflows: changing prompt, seed, steps or guidance does
    not recompile. Raises torch._dynamo's process-wide recompile limit to what the compiled
    block structures need (never lowers it) and warns if a run still runs blocks eagerly past it
    (with fullgraph, dynamo raises instead)."""
    return compile_model(model, CompileOptions(mode, fullgraph, DYNAMIC[dynamic], backend, tuning, scope))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="Quantize Model")
def QuantizeModel(
    model: MODEL,
    method: Annotated[str, Spec(choices=tuple(quantizers.QUANTIZERS), tooltip="; ".join(
        f"{q.name}: {q.tooltip}" for q in quantizers.QUANTIZERS.values()))] = "int8-weight-only",
    skip: Annotated[str, Spec(choices=quantizers.SKIPS, tooltip="Layers kept in full precision: the "
                              "embedders, adaLN norms and final layer are small and the most sensitive; "
                              "the first and last blocks next.")] = quantizers.SKIP_IO,
) -> NodeResult:
    """Quantize the transformer's linear layers with torchao into a new MODEL (a copy: the
    input MODEL is unchanged). fp8 methods need an Ada/Hopper/Blackwell GPU and are refused
    elsewhere; int8 runs everywhere. Follow with CompileModel for the speed-up."""
    if any(isinstance(p, LoraPatch) and p.fuse for p in model.patches):
        raise quantizers.QuantizeError("a fused LoRA cannot merge into quantized weights: set the LoRA's "
                                       "fuse off (unfused, it runs as a side branch beside the quantized layers)")
    quantized = quantizers.quantize_model(model, method, skip)
    return NodeResult((quantized,), {"text": [f"quantized: {quantized.quantization}"]})


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="Attention Backend")
def AttentionBackend(
    model: MODEL,
    backend: Annotated[str, Spec(choices=attention.CHOICES, tooltip=(
        "auto: cuDNN first (then flash, efficient) on Hopper and newer, else native (torch SDPA picks). "
        "flash/efficient/cudnn/math: torch's SDPA kernels; flex and sage only on models whose processors "
        "use diffusers' dispatcher."))] = "auto",
) -> NodeResult:
    """Run the model's attention on one backend. Shows where it applies; a backend the model's
    attention processors would ignore is an error, not a silent no-op."""
    patched, report = attention.with_attention_backend(model, backend)
    log.info("%s", report)
    return NodeResult((patched,), {"text": [report]})
