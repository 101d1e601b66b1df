"""fp8 weight-only: weights stored in fp8 (e4m3), upcast for bf16 matmuls (compute capability 8.9+)."""

from __future__ import annotations

from app.models.quantizers.base import Quantizer


def _config():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


QUANTIZER = Quantizer("fp8-weight-only", _config,
                      "fp8 weights, bf16 compute: half the weight memory (Ada/Hopper/Blackwell GPUs).", fp8=True)
