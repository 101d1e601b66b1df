"""The shared widget vocabulary: one spec per common widget, choices from the sampler registry."""

from __future__ import annotations

import torch

from app.core import vocabulary as vocab
from app.core.registry import Registry
from app.models import sampling


def _input(registry: Registry, node: str, name: str):
    return registry.get(node).inputs[name]


def test_nodes_share_one_spec_and_keep_their_defaults():
    registry = Registry()
    registry.load_package("nodes")
    sampler, img2img, invert = (_input(registry, n, "steps") for n in ("Sampler", "ImageToImage", "InvertLatent"))
    assert (sampler.spec.min, sampler.spec.max) == (img2img.spec.min, img2img.spec.max) == (1, 1000)
    assert (sampler.default, img2img.default) == (28, 20)  # each node's own default survives
    assert invert.spec.min == 1
    seeds = [_input(registry, n, "seed").spec for n in ("Sampler", "Seed", "FlowEdit")]
    assert all(s.seed and s.max == vocab.SEED_MAX for s in seeds)


def test_sampler_choices_follow_the_registry():
    registry = Registry()
    registry.load_package("nodes")
    spec = _input(registry, "Sampler", "sampler").spec
    assert spec.choice_list() == ["auto", *sampling.SAMPLERS]  # auto: the model's own (variant)

    @sampling.register("test_only_identity")
    def identity(x, sigmas, fn, callback, noise=None):
        return x

    try:
        assert "test_only_identity" in spec.choice_list()
        assert "test_only_identity" in _input(registry, "ImageToImage", "sampler").spec.choice_list()
        assert sampling.get_sampler("test_only_identity")(torch.ones(1), None, None, None) is not None
    finally:
        del sampling.SAMPLERS["test_only_identity"]
    assert "test_only_identity" not in spec.choice_list()
