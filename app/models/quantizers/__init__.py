"""Weight quantization of a MODEL with torchao (``quantize_``), one module per method.

:func:`quantize_model` returns a new MODEL whose transformer is a quantized deep copy of the
input's: the input MODEL (and every workflow sharing its weights) stays untouched. The copy is
memoized like any node output, so it lives as long as the memo cache keeps it.

  int8-weight-only    int8 weights, compute in the model dtype (CPU and any GPU)
  int8-dynamic        int8 weights and activations (CPU and any GPU)
  fp8-dynamic-row     fp8 weights and activations, row-wise scales (compute capability 8.9+)
  fp8-dynamic-tensor  the same with one scale per tensor
  fp8-weight-only     fp8 weights, bf16 compute (compute capability 8.9+)

fp8 on a CPU or a pre-Ada GPU is refused with a message (:class:`QuantizeError`) rather than
run emulated and slowly. A skip list keeps the most sensitive layers in full precision
(:data:`SKIPS`). LoRA on a quantized MODEL uses the LoRA patch's unfused side branch (a
forward hook adding ``B(A(x))`` to the quantized layer's output, in the model dtype); a fused
LoRA would have to merge into quantized weights, so it is refused (see ``nodes/speed.py``).

Adding a method: a module here defining ``QUANTIZER = Quantizer(name, config, tooltip, fp8=...)``
(or a tuple ``QUANTIZERS``), where ``config()`` returns a torchao ``quantize_`` config; add it
to the parametrized tests in ``tests/models/test_speed.py``.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from dataclasses import dataclass

from app.models.compile import eager_base
from app.models.handles import ModelHandle
from app.models.quantizers.base import (
    SKIP_EDGES,
    SKIP_IO,
    SKIP_NONE,
    SKIPS,
    QuantizeError,
    Quantizer,
    check_runnable,
    fp8_supported,
    layer_filter,
)

QUANTIZERS: dict[str, Quantizer] = {}


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = getattr(module, "QUANTIZERS", None) or (getattr(module, "QUANTIZER"),)
        for quantizer in found:
            QUANTIZERS[quantizer.name] = quantizer


_discover()


@dataclass(eq=False, repr=False)
class QuantizedHandle(ModelHandle):
    """A MODEL whose transformer holds torchao tensor subclasses (the memo cache measures them
    by their inner tensors; a compiled view of it only by what it does not share)."""

    quantization: str = ""


def quantize_model(model: ModelHandle, method: str, skip: str = SKIP_IO) -> QuantizedHandle:
    """A new MODEL with a quantized copy of ``model``'s transformer (``model`` is not changed)."""
    quantizer = QUANTIZERS.get(method)
    if quantizer is None:
        raise QuantizeError(f"unknown quantization {method!r}; expected one of {', '.join(QUANTIZERS)}")
    if eager_base(model.transformer) is not model.transformer:
        raise QuantizeError("this MODEL is already compiled: put QuantizeModel before CompileModel")
    if isinstance(model, QuantizedHandle):
        raise QuantizeError(f"this MODEL is already quantized ({model.quantization})")
    check_runnable(quantizer, model.device)
    layers = layer_filter(model.transformer, skip)  # validates the skip list before the copy
    from torchao.quantization import quantize_

    model.ensure_device()
    transformer = copy.deepcopy(model.transformer)
    quantize_(transformer, quantizer.config(), filter_fn=layers)
    fields = {f: getattr(model, f) for f in model.__dataclass_fields__ if f not in ("_active", "_cache")}
    fields.update(transformer=transformer, quantization=f"{method} (skip {skip})")
    return QuantizedHandle(**fields)


__all__ = ["QUANTIZERS", "SKIPS", "SKIP_EDGES", "SKIP_IO", "SKIP_NONE", "QuantizeError", "QuantizedHandle",
           "Quantizer", "fp8_supported", "quantize_model"]
