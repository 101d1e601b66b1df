"""Cache accelerators on the video transformers (Wan 2.1, Wan 2.2's two experts, LTX-Video),
through the cache nodes: "never skip" settings give the uncached latents exactly; aggressive
settings skip blocks (or reuse attention), stay close and repeat exactly. PAB and FasterCache
match diffusers' own hooks where those apply (one call per step)."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from app.models import accelerators as hooks
from app.models.accelerators.method import SPEC
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, sample
from nodes.text import Conditioning
from tests.fixtures.cache_models import METHODS, no_cache_hooks, skipped
from tests.fixtures.tiny_video import components

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
FAMILIES = ["wan", "wan22", "ltx"]
STEPS = 6
_RUNS: dict[str, tuple] = {}


def _setup(family: str) -> tuple:
    """(handle, positive, negative, latent, sigmas, uncached latents) of a 3-block tiny model."""
    if family not in _RUNS:
        parts, extra = components(family, layers=3)
        name = "ltx" if family == "ltx" else "wan"
        handle = ModelHandle(parts["transformer"].eval(), name, scheduler_config={"shift": 3.0},
                             transformer_2=parts.get("transformer_2"), boundary_ratio=extra.get("boundary_ratio"))
        g = torch.Generator().manual_seed(1)
        mask = name == "ltx"  # LTX's T5 text comes with its attention mask; Wan's is zero-padded
        pos, neg = (Conditioning(torch.randn(1, 7, 32, generator=g), None,
                                 torch.ones(1, 7, dtype=torch.long) if mask else None, family=name) for _ in range(2))
        latent = Latent(torch.zeros(1, handle.latent_channels, 3, 4, 4))
        sigmas = compute_sigmas(handle, "auto", STEPS)
        _RUNS[family] = (handle, pos, neg, latent, sigmas, _sample(handle, pos, neg, latent, sigmas))
    return _RUNS[family]


def _sample(model, pos, neg, latent, sigmas, cfg: float = 4.0) -> torch.Tensor:
    return sample(model, latent, pos, neg, sigmas, 3, cfg, sampler_name="euler", progress=lambda *a: None).samples


def cache_node(method: hooks.CacheMethod):
    """The node of ``method`` (through the registry: nothing imports a node module directly) and
    the method's settings as that node's widget values."""
    import sys

    from app.core.registry import default_registry

    default_registry()
    widgets = {}
    for f in fields(method):
        if SPEC in f.metadata:
            value = getattr(method, f.name)
            widgets[f.name] = ", ".join(str(v) for v in value) if isinstance(value, tuple) else value
    return getattr(sys.modules["nodes.cache"], type(method).node_name), widgets


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_nodes_on_video_transformers(family, method, summaries):
    handle, pos, neg, latent, sigmas, reference = _setup(family)
    never, aggressive = METHODS[method]
    make, widgets = cache_node(never)
    assert torch.equal(_sample(make(handle, **widgets), pos, neg, latent, sigmas), reference)
    assert skipped(summaries[-1]) == 0
    make, widgets = cache_node(aggressive)
    model = make(handle, **widgets)  # one MODEL value, sampled twice
    first, second = (_sample(model, pos, neg, latent, sigmas) for _ in range(2))
    assert skipped(summaries[-2]) > 0, f"{method} skipped nothing on {family}"
    assert torch.equal(first, second) and skipped(summaries[-2]) == skipped(summaries[-1])
    # aggressive settings on 6 steps of random weights: 0.3% (FasterCache) to 11% (CG-Taylor on LTX)
    assert 0 < rel(first, reference) < 0.2, f"{method} on {family}: {rel(first, reference):.3f}"
    assert no_cache_hooks(handle) and handle.patches == ()


def test_wan22_low_noise_expert_is_cached_too(summaries):
    handle, pos, neg, latent, sigmas, reference = _setup("wan22")
    computed = {"high": 0, "low": 0}
    probes = [handle.transformer.blocks[1].attn1.register_forward_hook(lambda *a: computed.__setitem__("high", computed["high"] + 1)),
              handle.transformer_2.blocks[1].attn1.register_forward_hook(lambda *a: computed.__setitem__("low", computed["low"] + 1))]
    try:
        _sample(handle, pos, neg, latent, sigmas)
        uncached = dict(computed)
        computed.update(high=0, low=0)
        _sample(handle.with_patch(hooks.CachePatch(hooks.FORA(interval=2))), pos, neg, latent, sigmas)
    finally:
        for probe in probes:
            probe.remove()
    assert uncached["high"] > 0 and uncached["low"] > 0  # both experts take part in this schedule
    assert computed["low"] < uncached["low"]  # the second expert's blocks were skipped as well
    # each expert keeps its own history: its first call always computes
    assert computed["high"] >= 2 and computed["low"] >= 2
    assert no_cache_hooks(handle)
    assert not any(name.startswith(hooks.HOOK_PREFIX) for block in handle.transformer_2.blocks
                   for name in getattr(getattr(block, "_diffusers_hook", None), "hooks", {}))


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_teacache_indicator_is_the_modulated_input(family):
    handle, pos, *_ = _setup(family)
    block0 = hooks.stack_blocks(handle.transformer)[0]
    seen = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    probe = block0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        handle.predict(torch.randn(1, handle.latent_channels, 3, 4, 4), 0.7, pos)
    finally:
        probe.remove()
    hidden = hooks.block_arg(block0, "hidden_states", seen["args"], seen["kwargs"])
    modulated = hooks.modulated_input(block0, seen["args"], seen["kwargs"])
    assert modulated.shape == hidden.shape and not torch.allclose(modulated, hidden)
    normed = block0.norm1(hidden.float())
    assert not torch.allclose(modulated.float(), normed)  # the timestep's shift and scale are applied


def _timestep_probe(transformer):
    """A callback reading the timestep of the transformer's current call (what diffusers' hooks need)."""
    current = {}
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: current.__setitem__("t", float(kwargs["timestep"].flatten()[0])), with_kwargs=True)
    return (lambda: current["t"]), handle


@pytest.mark.parametrize("method", ["pab", "fastercache"])
def test_attention_reuse_matches_diffusers_hooks(method, summaries):
    """One call per step (cfg 1): our per-slot PAB / FasterCache give exactly what diffusers'
    hooks give on the same transformer."""
    from diffusers.hooks import (
        FasterCacheConfig,
        HookRegistry,
        PyramidAttentionBroadcastConfig,
        apply_faster_cache,
        apply_pyramid_attention_broadcast,
    )

    parts, _ = components("wan", layers=3)
    handle = ModelHandle(parts["transformer"].eval(), "wan", scheduler_config={"shift": 3.0})
    _, pos, neg, latent, _, _ = _setup("wan")
    sigmas = compute_sigmas(handle, "auto", STEPS)
    if method == "pab":
        ours = hooks.PyramidAttentionBroadcast(self_interval=2, cross_interval=3, start=0.0, end=1.0)
    else:  # diffusers' FasterCache cannot start reusing at its first call: keep step 0 out of the window
        ours = hooks.FasterCache(interval=2, weight=0.5, start=1 / STEPS)
    mine = _sample(handle.with_patch(hooks.CachePatch(ours)), pos, neg, latent, sigmas, cfg=1.0)
    assert summaries[-1]["attention_skipped"] > 0
    callback, probe = _timestep_probe(handle.transformer)
    try:
        if method == "pab":
            apply_pyramid_attention_broadcast(handle.transformer, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3,
                spatial_attention_timestep_skip_range=(-1, 2000), cross_attention_timestep_skip_range=(-1, 2000),
                current_timestep_callback=callback))
        else:
            first_t = float(sigmas[0]) * 1000
            apply_faster_cache(handle.transformer, FasterCacheConfig(
                spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, first_t - 1),
                attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True, tensor_format="BCFHW",
                current_timestep_callback=callback))
        theirs = _sample(handle, pos, neg, latent, sigmas, cfg=1.0)
    finally:
        probe.remove()
        HookRegistry.check_if_exists_or_initialize(handle.transformer).remove_hook(
            "pyramid_attention_broadcast" if method == "pab" else "faster_cache_denoiser", recurse=True)
        if method == "fastercache":
            HookRegistry.check_if_exists_or_initialize(handle.transformer).remove_hook("faster_cache_block", recurse=True)
    assert torch.equal(mine, theirs)
    assert not torch.equal(mine, _sample(handle, pos, neg, latent, sigmas, cfg=1.0))  # the hooks are gone


def test_attention_reuse_keeps_cfg_branches_apart(summaries):
    """With CFG as two calls (Wan), each branch reuses only attention outputs it computed itself
    (one state per module, as diffusers' hook keeps, would hand the positive prompt's cross
    attention to the negative branch)."""
    handle, pos, neg, latent, sigmas, reference = _setup("wan")
    model = handle.with_patch(hooks.CachePatch(hooks.PyramidAttentionBroadcast(self_interval=1, cross_interval=2,
                                                                               start=0.0, end=1.0)))
    computed: dict[int, list] = {}  # slot -> outputs it computed (kept alive, so identity is meaningful)
    foreign = []
    original = hooks.PyramidAttentionBroadcast.attention

    def spy(self, rt, slot, key, module, args, kwargs, forward):
        out, reused = original(self, rt, slot, key, module, args, kwargs, forward)
        if not reused:
            computed.setdefault(id(slot), []).append(out)
        elif not any(out is mine for mine in computed.get(id(slot), [])):
            foreign.append(key)
        return out, reused

    hooks.PyramidAttentionBroadcast.attention = spy
    try:
        _sample(model, pos, neg, latent, sigmas)
    finally:
        hooks.PyramidAttentionBroadcast.attention = original
    assert len(computed) == 2 and summaries[-1]["attention_skipped"] == 2 * 3 * (STEPS // 2)  # branches x blocks x steps
    assert foreign == []
