"""Weight storage formats: how a loaded transformer keeps its weights (compute stays bf16/fp32).

  auto       as the file stores them: a bf16 file in the chosen dtype, an fp8 file in fp8,
             a GGUF file quantized
  fp8_e4m3 / fp8_e5m2   fp8 storage, upcast per layer while it runs (:func:`cast_inline`)
  int8 / float8         torchao weight-only quantization (app/models/quantizers; float8 needs Ada+)
  nf4        bitsandbytes 4-bit (optional: ``pip install bitsandbytes``)

Pre-quantized single files: ComfyUI fp8 safetensors (float8 tensors), "scaled fp8" ones (a
``scaled_fp8`` marker and a per-tensor ``<layer>.scale_weight``, or comfy-kitchen's layout as in
Comfy-Org's "fp8mixed" files: ``<layer>.weight_scale`` and a ``<layer>.comfy_quant`` JSON marker
per quantized layer, the other layers bf16): real weight = fp8 × scale;
the fp8 tensor is kept and the scale applied when the layer runs, through a torch
parametrization) and GGUF files (diffusers ``GGUFQuantizationConfig``; the ``gguf`` package).
Every file is read with safetensors or gguf's reader (no pickles) and checked before use:
a truncated file or a tensor whose claimed type does not match its bytes is refused with
:class:`WeightFileError` naming the file and tensor.

fp8 storage stores the layers diffusers' ``enable_layerwise_casting`` would (same layer types,
skip patterns, biases too), but casts inline: the layer's forward runs on
``weight.to(compute_dtype)`` and the stored fp8 tensor is never replaced. diffusers' hook instead
calls ``Module.to(compute)`` before and ``Module.to(storage)`` after every call of every layer
(Python per layer, two casts per weight, a new fp8 tensor after each call). Measured on an H200,
1024², 28 steps, the sampling stage of an end-to-end run under a 12 GiB cap: SD3.5-large fp8
(32/38 blocks kept) 10.56 s and Flux-dev fp8 (26/57 kept) 7.89 s with the hook, against 5.06 s and
4.84 s bf16 resident; cast inline, before the compiled upcast below, 10.03 s and 7.86 s (Flux-dev
27/57 kept) against 5.13 s and 4.94 s. Most of the difference was the upcast itself (eager's fp8
conversion kernel: :data:`FAST_CAST`); on CUDA it now runs as an inductor kernel (:func:`upcast`).
Measured (H200, session 9; off by default since, see :data:`FAST_CAST`): the cast kernels' time per step fell (Flux-dev under 12 GiB:
"copy" 88.5 -> 62.2 ms) but the sampling stage did not (7.80 s Flux-dev, 10.50 s SD3.5-large
under 12 GiB; 5.28 s Flux-dev fp8 resident against 4.85 s bf16): under the cap the step waits on
the streamed blocks' copies (app/models/memory.py kept_blocks), not on the cast. On a CPU (a
full-depth tiny Flux, 426 cast layers, one thread) a forward took 1.8-1.9x the bf16 one with the
hook and 1.2-1.3x cast inline, outputs bit-identical. ComfyUI's "manual cast" layers do the same.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

STORAGES = ("auto", "fp8_e4m3", "fp8_e5m2", "int8", "float8", "nf4")
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = frozenset(FP8.values())
TORCHAO = {"int8": "int8-weight-only", "float8": "fp8-weight-only"}
SCALED_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale")
WEIGHT_SCALES = (".scale_weight", ".weight_scale")  # older scaled fp8, comfy-kitchen
QUANT_MARKER = ".comfy_quant"  # comfy-kitchen: the layer's format as UTF-8 JSON bytes
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")

log = logging.getLogger(__name__)


class WeightFileError(ValueError):
    """A weight file that is damaged or claims what it does not hold; names file and tensor."""


def bytes_per_param(storage: str, dtype: torch.dtype) -> float:
    """Bytes each parameter takes in ``storage`` (for the VRAM planner)."""
    if storage in FP8 or storage in TORCHAO:
        return 1.0
    if storage == "nf4":
        return 0.5625
    return torch.empty((), dtype=dtype).element_size()


# Upcasting fp8 weights on CUDA through an inductor (Triton) kernel instead of ``.to()``: eager's
# conversion kernel for float8 types is a non-vectorized elementwise one converting in software.
# Measured on an H200 (Flux-dev, 1024², eager, per sampling step): 'copy' kernels took 88.5 ms in
# fp8 under a 12 GiB cap against 24.0 ms bf16 resident (SD3.5-large: 154.8 against 27.1), the
# extra ~64 ms being the upcast of ~8.7 GB of fp8 weights: ~0.4 TB/s of traffic where the device
# copies at 4.2 TB/s. Compiled with dynamic shapes on flattened tensors: one graph per (fp8 dtype, compute
# dtype), whatever the layer shapes. A compiled model (torch.compile) casts inside its own graphs.
# Off by default since its GPU A/B (H200, session 9): it did not make a capped run faster (8.81 ->
# 8.71 s Flux-dev under 12 GiB) and SD3.5-large's drift from bf16 rose from 0.043 to 0.423. Session
# 10 cleared the kernel: :func:`fast_cast_mismatches` found it bit-identical to ``.to()`` on the
# H200 for every fp8 bit pattern, and the drift was a streaming race that moved with the eager cast
# too (app/models/residency.py ``_anchored``). Still off until a capped run after that fix says it
# is faster (``bench.gpu_memory --fast-cast``).
FAST_CAST = False  # off: always ``.to()``; turned off for the process if compiling it fails
FAST_CAST_DEVICES = ("cuda",)  # device types the compiled cast runs on (tests add "cpu")
# Smaller tensors (biases, norms, small layers) keep ``.to()``: a compiled call costs tens of µs of
# host time (guards, wrapper) while the GPU time it saves grows with size (~7 ps an element at the
# rates above: ~7 µs a million), so only large weights repay it (Flux-dev's are 9.4M-37.7M elements,
# SD3.5-large's attention 5.9M); at least 2 also because dynamo specializes sizes 0 and 1.
FAST_CAST_MIN_NUMEL = 1 << 20


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype)


def _cast_scaled(tensor: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    return tensor.to(dtype) * scale  # a code object of its own: dynamo's recompile limit is per code


@functools.cache
def compiled_cast(cast):
    """``cast`` compiled by inductor, once per process (the scale stays a graph input, not a constant)."""
    return torch.compile(cast, dynamic=True)


def _takes_fast_cast(tensor: torch.Tensor) -> bool:
    """Whether :func:`upcast` gives ``tensor`` to the compiled cast: fp8 on a device of
    :data:`FAST_CAST_DEVICES`, outside a compile, passed as a detached flat view (no gradient
    wanted; a view's base would add a graph per rank), contiguous and of at least
    :data:`FAST_CAST_MIN_NUMEL` elements. The compile check comes first: dynamo guards on the
    globals it reads, and a flag read while tracing would recompile every graph when it flips."""
    return (not torch.compiler.is_compiling() and FAST_CAST and tensor.dtype in FP8_DTYPES
            and tensor.device.type in FAST_CAST_DEVICES and tensor.numel() >= max(FAST_CAST_MIN_NUMEL, 2)
            and tensor.is_contiguous() and not (tensor.requires_grad and torch.is_grad_enabled()))


def upcast(tensor: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """``tensor.to(dtype)``, times ``scale`` if given; fp8 on CUDA through the compiled kernel
    (:data:`FAST_CAST`): the same values (a NaN stays a NaN of its sign, its payload may differ)."""
    global FAST_CAST
    cast, args = (_cast, (dtype,)) if scale is None else (_cast_scaled, (dtype, scale))
    if _takes_fast_cast(tensor):
        try:
            with torch.no_grad():  # one graph whatever the grad mode (no gradient is wanted)
                return compiled_cast(cast)(tensor.view(-1).detach(), *args).view(tensor.shape)
        except torch.OutOfMemoryError:
            raise  # the kernel's output did not fit: .to() would not either
        except Exception as exc:  # never fail a run for a faster cast
            FAST_CAST = False
            log.warning("the compiled fp8 upcast failed (compiling or running it); fp8 weights upcast with .to() for the rest of the "
                        "process: %s", exc)
    return cast(tensor, *args)


def fast_cast_mismatches(device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Per fp8 dtype, how many of its 256 bit patterns the compiled cast on ``device`` turns into
    other bits than ``.to(dtype)`` (a NaN need only stay a NaN of its sign): all zeros when it is
    exact there. The GPU check that :data:`FAST_CAST` waits for (bench/gpu_memory.py records it)."""
    result, bits = {}, {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    for fp8 in sorted(FP8_DTYPES, key=str):
        patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).to(device)
        want = patterns.to(dtype)
        with torch.no_grad():
            got = compiled_cast(_cast)(patterns, dtype)
        nan = want.isnan()
        wrong = torch.where(nan, ~got.isnan() | (got.signbit() != want.signbit()), got.view(bits) != want.view(bits))
        result[str(fp8).removeprefix("torch.")] = int(wrong.sum())
    return result


class ScaledFP8(nn.Module):
    """A parametrization: the fp8 weight stays stored; each use sees ``weight × scale`` in the compute dtype."""

    def __init__(self, scale: float, compute_dtype: torch.dtype):
        super().__init__()
        self.scale, self.compute_dtype = float(scale), compute_dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return upcast(weight, self.compute_dtype, self.scale)


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(tensors without the scaled-fp8 marker and scale keys, scale of each scaled weight key)."""
    from safetensors.torch import load_file

    try:
        raw = load_file(str(file))
    except Exception as exc:
        raise WeightFileError(f"{file}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    scaled = raw.pop(SCALED_MARKER, None) is not None
    for key in [k for k in raw if k.endswith(QUANT_MARKER)]:
        _check_quant_format(file, key, raw.pop(key))
        scaled = True
    scales: dict[str, float] = {}
    for key in [k for k in raw if k.endswith(SCALE_SUFFIXES)]:
        value = raw.pop(key)
        if not key.endswith(WEIGHT_SCALES):
            continue  # only fp8 × fp8 matmuls use input scales; compute here is bf16
        weight_key = key.rsplit(".", 1)[0] + ".weight"
        if weight_key not in raw:
            raise WeightFileError(f"{file}: {key} scales a tensor that is not in the file ({weight_key})")
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise WeightFileError(f"{file}: {key} must be one float (a per-tensor scale), got {value.dtype} "
                                  f"of shape {tuple(value.shape)}")
        if raw[weight_key].dtype not in FP8_DTYPES:
            raise WeightFileError(f"{file}: {weight_key} has a scale but is {raw[weight_key].dtype}, not fp8: "
                                  "the file claims a scaled-fp8 layout it does not hold")
        scales[weight_key] = float(value.float())
    if scaled and not scales:
        raise WeightFileError(f"{file}: marked as scaled fp8 ({SCALED_MARKER!r} or {QUANT_MARKER!r}) but holds no "
                              ".scale_weight / .weight_scale tensors")
    return raw, scales


def _check_quant_format(file: Path, key: str, blob: torch.Tensor) -> None:
    """A comfy-kitchen layer marker must name an fp8 format (per-tensor scale): others are refused."""
    try:
        fmt = json.loads(bytes(blob.flatten().to(torch.uint8).tolist())).get("format")
    except (ValueError, AttributeError, RuntimeError):
        raise WeightFileError(f"{file}: {key} is not a comfy_quant JSON marker") from None
    if fmt not in FP8_FORMATS:
        raise WeightFileError(f"{file}: {key} quantizes its layer as {fmt!r}; ditgraph reads fp8 layers "
                              f"({', '.join(FP8_FORMATS)}) with one scale each, not {fmt!r} (use a bf16 or fp8 file)")


def stored_dtype(tensor: torch.Tensor, dtype: torch.dtype, scale: float | None, keep_fp8: bool = True) -> torch.Tensor:
    """A file tensor in the load dtype; with ``keep_fp8`` fp8 matrices stay fp8 (upcast and
    scaled when used: :func:`keep_fp8`)."""
    if keep_fp8 and tensor.dtype in FP8_DTYPES and tensor.dim() == 2:
        return tensor
    if scale is not None:
        return (tensor.float() * scale).to(dtype)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def keep_fp8(model: nn.Module, scales: dict[str, float], dtype: torch.dtype) -> int:
    """Give every fp8 Linear weight of ``model`` its upcast (and scale) parametrization; returns
    how many were kept in fp8. ``scales`` is keyed by the model's state-dict names."""
    count = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dtype in FP8_DTYPES:
            parametrize.register_parametrization(module, "weight", ScaledFP8(scales.get(f"{name}.weight", 1.0), dtype),
                                                 unsafe=True)
            count += 1
    for name, param in model.named_parameters():  # fp8 tensors outside Linear layers (rare): upcast at load
        if param.dtype in FP8_DTYPES and ".parametrizations." not in f".{name}":
            param.data = param.data.to(dtype)
    return count


def dequantized(raw: dict[str, torch.Tensor], scales: dict[str, float], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors in ``dtype`` with scales applied (for diffusers' key conversion of original files)."""
    return {k: (v.float() * scales[k]).to(dtype) if k in scales else v.to(dtype) if v.is_floating_point() else v
            for k, v in raw.items()}


def check_gguf(file: Path) -> None:
    """Refuse a truncated GGUF or one whose tensors overlap or use unsupported types, before diffusers reads it."""
    try:
        import gguf
    except ImportError:
        raise WeightFileError(f"{file}: GGUF files need the gguf package (pip install 'gguf>=0.10')") from None
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    size = file.stat().st_size
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:
        raise WeightFileError(f"{file}: not a readable GGUF file, truncated or damaged "
                              f"({type(exc).__name__}: {exc})") from None
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    spans = sorted((t.data_offset, t.n_bytes, t.name) for t in reader.tensors)
    for (start, length, name), following in zip(spans, [*spans[1:], (size, 0, "")], strict=True):
        if start + length > following[0]:
            raise WeightFileError(f"{file}: tensor {name} claims {length} bytes at {start} but only "
                                  f"{following[0] - start} are there (truncated file or wrong type claim)")
    for tensor in reader.tensors:
        if tensor.tensor_type not in plain and tensor.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
            raise WeightFileError(f"{file}: tensor {tensor.name} uses {tensor.tensor_type.name}, which diffusers "
                                  "cannot dequantize")


def load_gguf(cls, file: Path, config_dir: Path, subfolder: str | None, dtype: torch.dtype) -> nn.Module:
    """A diffusers model from a GGUF file: weights stay quantized, dequantized per layer into ``dtype``."""
    from diffusers import GGUFQuantizationConfig

    check_gguf(file)
    try:
        return cls.from_single_file(str(file), config=str(config_dir), subfolder=subfolder, torch_dtype=dtype,
                                    quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                    local_files_only=True)
    except Exception as exc:
        raise WeightFileError(f"{file}: GGUF tensors do not fit {cls.__name__} from {config_dir}: "
                              f"{type(exc).__name__}: {exc}") from None


def apply_storage(model: nn.Module, storage: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Store ``model``'s weights in ``storage`` (in place); "auto" leaves them as loaded."""
    if storage == "auto":
        return model
    if storage in FP8:
        cast_inline(model, FP8[storage], dtype)
        return model
    if storage in TORCHAO:
        from torchao.quantization import quantize_

        from app.models.quantizers import QUANTIZERS
        from app.models.quantizers.base import SKIP_IO, check_runnable, layer_filter

        quantizer = QUANTIZERS[TORCHAO[storage]]
        check_runnable(quantizer, device)
        quantize_(model, quantizer.config(), filter_fn=layer_filter(model, SKIP_IO))
        return model
    if storage == "nf4":
        raise WeightFileError("nf4 storage needs bitsandbytes and a CUDA GPU (pip install bitsandbytes); "
                              "use int8, fp8_e4m3 or a GGUF Q4 file instead")
    raise WeightFileError(f"unknown storage {storage!r}; expected one of {', '.join(STORAGES)}")


# -- fp8 storage: layers that upcast their own weights -----------------------------------------


class _Upcast:
    """Mixin of the layers :func:`cast_inline` swaps in: parameters stay stored as they are
    (fp8); each forward computes with copies in ``compute_dtype``."""

    compute_dtype: torch.dtype  # peft reads it too: adapters added later are kept in it, not in fp8

    def _up(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else upcast(tensor, self.compute_dtype)


class CastLinear(_Upcast, nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self._up(self.weight), self._up(self.bias))


class _CastConv(_Upcast):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self._up(self.weight), self._up(self.bias))


class CastConv1d(_CastConv, nn.Conv1d):
    pass


class CastConv2d(_CastConv, nn.Conv2d):
    pass


class CastConv3d(_CastConv, nn.Conv3d):
    pass


class CastEmbedding(_Upcast, nn.Embedding):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self._up(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


CAST_LAYERS = {nn.Linear: CastLinear, nn.Conv1d: CastConv1d, nn.Conv2d: CastConv2d, nn.Conv3d: CastConv3d,
               nn.Embedding: CastEmbedding}


def layerwise_layers(model: nn.Module) -> list[nn.Module]:
    """The layers diffusers' ``enable_layerwise_casting`` would store narrow: its layer types,
    skipping modules whose dotted name matches its default patterns, the model's
    ``_keep_in_fp32_modules`` and ``_skip_layerwise_casting_patterns`` or peft's adapter names
    (a skipped module's whole subtree; ``re.search`` on the name, as diffusers does)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from diffusers.utils import is_peft_available

    skip = [*DEFAULT_SKIP_MODULES_PATTERN, *(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_skip_layerwise_casting_patterns", None) or ())]
    if is_peft_available():
        from peft.tuners.loha.layer import LoHaLayer
        from peft.tuners.lokr.layer import LoKrLayer
        from peft.tuners.lora.layer import LoraLayer

        skip += [name for layer in (LoHaLayer, LoKrLayer, LoraLayer) for name in layer.adapter_layer_names]

    def walk(module: nn.Module, name: str) -> list[nn.Module]:
        if any(re.search(pattern, name) for pattern in skip):
            return []
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            return [module]
        return [layer for child_name, child in module.named_children()
                for layer in walk(child, f"{name}.{child_name}" if name else child_name)]

    return list({id(layer): layer for layer in walk(model, "")}.values())  # a shared layer once


def cast_inline(model: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Store :func:`layerwise_layers` in ``storage_dtype`` (weights and biases), each swapped to
    its ``Cast*`` class (same parameters and state-dict keys) to compute in ``compute_dtype``;
    returns how many. A layer type without a ``Cast*`` class (ConvTranspose, a subclass with its
    own forward, an Embedding with ``max_norm``, which renorms its weight in place) keeps
    diffusers' hook: none in the transformers ditgraph loads."""
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    layers = [layer for layer in layerwise_layers(model) if not isinstance(layer, _Upcast)]  # stored once
    for layer in layers:
        if type(layer) in CAST_LAYERS and getattr(layer, "max_norm", None) is None:
            layer.to(dtype=storage_dtype)
            layer.__class__ = CAST_LAYERS[type(layer)]
            layer.compute_dtype = compute_dtype
        else:
            apply_layerwise_casting_hook(layer, storage_dtype, compute_dtype, non_blocking=False)
    return len(layers)
