"""fp8 dynamic: fp8 (e4m3) weights and activations, scaled fp8 matmuls (compute capability 8.9+).
Row-wise scales are the more accurate, one scale per tensor the faster."""

from __future__ import annotations

from app.models.quantizers.base import Quantizer


def _config(granularity: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if granularity == "row" else PerTensor())


QUANTIZERS = (
    Quantizer("fp8-dynamic-row", lambda: _config("row"),
              "fp8 weights and activations, row-wise scales (Ada/Hopper/Blackwell GPUs). Pair with CompileModel.",
              fp8=True),
    Quantizer("fp8-dynamic-tensor", lambda: _config("tensor"),
              "fp8 weights and activations, one scale per tensor (Ada/Hopper/Blackwell GPUs).", fp8=True),
)
