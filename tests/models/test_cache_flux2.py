"""Cache accelerators, compile and int8 quantization on Flux.2 ([dev]; [klein] shares the
transformer): the methods it supports are exact at "never skip" and skip at aggressive settings;
the others are refused by the cache node, naming the ones that work."""

from __future__ import annotations

import pytest
import torch

from app.models import accelerators as hooks
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, sample
from nodes.text import Conditioning
from tests.fixtures.cache_models import METHODS, no_cache_hooks, skipped
from tests.fixtures.flux2_models import TEXT_HIDDEN, tiny_flux2_transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
_RUN: list = []


def _setup() -> tuple:
    if not _RUN:
        handle = ModelHandle(tiny_flux2_transformer(True, layers=3), "flux2")
        g = torch.Generator().manual_seed(1)
        cond = Conditioning(torch.randn(1, 7, 3 * TEXT_HIDDEN, generator=g), family="flux2")
        latent, sigmas = Latent(torch.zeros(1, handle.latent_channels, 4, 4)), compute_sigmas(handle, "auto", 6, 0.0, (4, 4))
        _RUN.extend([handle, cond, latent, sigmas, _sample(handle, cond, latent, sigmas)])
    return tuple(_RUN)


def _sample(model, cond, latent, sigmas) -> torch.Tensor:
    return sample(model, latent, cond, None, sigmas, 3, 1.0, sampler_name="euler", progress=lambda *a: None).samples


def cache_nodes():
    import sys

    from app.core.registry import default_registry

    default_registry()
    return sys.modules["nodes.cache"]


@pytest.mark.parametrize("method", list(METHODS))
def test_cache_methods_on_flux2(method, request):
    found = request.getfixturevalue("summaries")
    handle, cond, latent, sigmas, reference = _setup()
    if method in handle.info.cache_refused:
        with pytest.raises(ValueError, match="does not support"):
            getattr(cache_nodes(), hooks.METHODS[method].node_name)(handle)
        return
    never, aggressive = METHODS[method]
    assert torch.equal(_sample(handle.with_patch(hooks.CachePatch(never)), cond, latent, sigmas), reference)
    assert skipped(found[-1]) == 0
    model = handle.with_patch(hooks.CachePatch(aggressive))
    first, second = (_sample(model, cond, latent, sigmas) for _ in range(2))
    assert skipped(found[-2]) > 0, f"{method} skipped nothing on flux2"
    assert torch.isfinite(first).all() and torch.equal(first, second) and not torch.equal(first, reference)
    assert no_cache_hooks(handle) and handle.patches == ()


def test_compile_and_int8_quantize_work():
    from app.models import quantizers
    from app.models.compile import compile_model
    from tests.fixtures.speed import EAGER, needs_torchao, rel

    handle, cond, latent, sigmas, reference = _setup()
    compiled = compile_model(handle, EAGER)
    assert compiled.transformer is not handle.transformer
    assert torch.allclose(_sample(compiled, cond, latent, sigmas), reference, atol=1e-5)
    if needs_torchao.args[0]:  # torchao missing: quantization is covered where it is installed
        return
    quantized = quantizers.quantize_model(handle, "int8-weight-only", quantizers.SKIP_NONE)
    assert 0 < rel(_sample(quantized, cond, latent, sigmas), reference) < 0.1
    assert torch.equal(_sample(handle, cond, latent, sigmas), reference)  # the base is untouched
