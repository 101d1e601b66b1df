"""Cache accelerators on the issue-24 families (Chroma, AuraFlow, Qwen-Image): "never skip"
settings give the uncached latents exactly; aggressive settings skip blocks, stay finite and
repeat exactly when the same MODEL is sampled again."""

from __future__ import annotations

import pytest
import torch

from app.models import accelerators as hooks
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, sample
from nodes.text import Conditioning
from tests.fixtures.cache_models import METHODS, no_cache_hooks, skipped
from tests.fixtures.new_families import FAMILIES, tiny_components

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
_RUNS: dict[str, tuple] = {}


def _setup(family: str) -> tuple:
    if family not in _RUNS:
        handle = ModelHandle(tiny_components(family, layers=3)["transformer"].eval(), family, scheduler_config={"shift": 3.0})
        g = torch.Generator().manual_seed(1)
        pos, neg = (Conditioning(torch.randn(1, 7, 32, generator=g), None, torch.ones(1, 7, dtype=torch.long),
                                 family=family) for _ in range(2))
        shape = (1, handle.latent_channels) + ((1,) if handle.info.video else ()) + (8, 8)
        latent, sigmas = Latent(torch.zeros(shape)), compute_sigmas(handle, "auto", 6)
        _RUNS[family] = (handle, pos, neg, latent, sigmas, _sample(handle, pos, neg, latent, sigmas))
    return _RUNS[family]


def cache_nodes():
    """nodes/cache.py through the registry (nothing imports a node module directly)."""
    import sys

    from app.core.registry import default_registry

    default_registry()
    return sys.modules["nodes.cache"]


def _sample(model, pos, neg, latent, sigmas) -> torch.Tensor:
    return sample(model, latent, pos, neg, sigmas, 3, 4.0, sampler_name="euler", progress=lambda *a: None).samples


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_never_skip_is_exact_and_aggressive_skips(family, method, summaries):
    handle, pos, neg, latent, sigmas, reference = _setup(family)
    if method in handle.info.cache_refused:  # the node refuses it, naming the ones that work
        with pytest.raises(ValueError, match="does not support"):
            getattr(cache_nodes(), hooks.METHODS[method].node_name)(handle)
        return
    never, aggressive = METHODS[method]
    assert torch.equal(_sample(handle.with_patch(hooks.CachePatch(never)), pos, neg, latent, sigmas), reference)
    assert skipped(summaries[-1]) == 0
    model = handle.with_patch(hooks.CachePatch(aggressive))
    first, second = (_sample(model, pos, neg, latent, sigmas) for _ in range(2))
    assert skipped(summaries[-2]) > 0, f"{method} skipped nothing on {family}"
    assert torch.isfinite(first).all() and torch.equal(first, second) and not torch.equal(first, reference)
    assert no_cache_hooks(handle) and handle.patches == ()


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_and_int8_quantize_work(family):
    from app.models import quantizers
    from app.models.compile import compile_model
    from tests.fixtures.speed import EAGER, needs_torchao, rel

    handle, pos, neg, latent, sigmas, reference = _setup(family)
    compiled = compile_model(handle, EAGER)
    assert compiled.transformer is not handle.transformer
    assert torch.allclose(_sample(compiled, pos, neg, latent, sigmas), reference, atol=1e-5)
    if needs_torchao.args[0]:  # torchao missing: quantization is covered where it is installed
        return
    quantized = quantizers.quantize_model(handle, "int8-weight-only", quantizers.SKIP_NONE)
    assert 0 < rel(_sample(quantized, pos, neg, latent, sigmas), reference) < 0.1
    assert torch.equal(_sample(handle, pos, neg, latent, sigmas), reference)  # the base is untouched
