"""int8 weight-only: weights stored in int8 (per-channel scales), matmuls in the model's dtype.
Half the memory of bf16; runs everywhere, CPU included."""

from __future__ import annotations

from app.models.quantizers.base import Quantizer


def _config():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(version=2)


QUANTIZER = Quantizer("int8-weight-only", _config,
                      "int8 weights, bf16 compute: half the weight memory, runs on any device (CPU too).")
