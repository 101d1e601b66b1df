"""int8 dynamic: int8 weights and per-token int8 activations, int8 matmuls (any CUDA GPU, CPU)."""

from __future__ import annotations

from app.models.quantizers.base import Quantizer


def _config():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig(version=2)


QUANTIZER = Quantizer("int8-dynamic", _config,
                      "int8 weights and activations (int8 matmuls); any GPU and CPU. Pair with CompileModel.")
