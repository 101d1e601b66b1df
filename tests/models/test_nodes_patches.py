"""The MODEL patch protocol: views never mutate, per-run state is fresh, wrap sees every call."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from app.core.registry import Registry, node
from app.core.types import MODEL, Spec
from app.models.handles import ModelPatch
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, sample
from nodes.text import Conditioning
from tests.fixtures.tiny_models import components

LOG: list = []


class CountingPatch(ModelPatch):
    """Counts calls per run; optionally scales the transformer output."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.key = f"counting(scale={scale})"

    def begin_run(self, run):
        state = {"calls": 0, "steps": set()}
        LOG.append(("begin", id(state)))
        return state

    def wrap(self, state, call, forward):
        state["calls"] += 1
        state["steps"].add(call.run.step)
        assert "hidden_states" in call.kwargs and call.latents.dtype == torch.float32
        return forward(call) * self.scale

    def end_run(self, run, state):
        LOG.append(("end", id(state), state["calls"], sorted(state["steps"])))


@pytest.fixture(scope="module")
def handle():
    from app.models.handles import ModelHandle

    parts = components("sd3")
    return ModelHandle(parts["transformer"].eval(), "sd3", scheduler_config={"shift": 3.0})


def cond(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 7, 32, generator=g), torch.randn(batch, 32, generator=g), family="sd3")


def test_with_patch_is_a_new_view_sharing_weights(handle):
    patched = handle.with_patch(CountingPatch())
    assert patched is not handle and handle.patches == () and len(patched.patches) == 1
    assert patched.transformer is handle.transformer
    twice = patched.with_patch(CountingPatch(0.5))
    assert len(patched.patches) == 1 and len(twice.patches) == 2


def test_per_run_state_is_fresh_and_closed(handle):
    LOG.clear()
    patched = handle.with_patch(CountingPatch())
    latent = Latent(torch.zeros(1, 4, 8, 8))
    sigmas = compute_sigmas(patched, "shifted", 3)
    pos, neg = cond(seed=1), cond(seed=2)
    a = sample(patched, latent, pos, neg, sigmas, seed=5, cfg=3.0, progress=lambda *a: None)
    b = sample(patched, latent, pos, neg, sigmas, seed=5, cfg=3.0, progress=lambda *a: None)
    begins = [e for e in LOG if e[0] == "begin"]
    ends = [e for e in LOG if e[0] == "end"]
    assert len(begins) == 2 and len(ends) == 2  # one fresh state per run, always closed
    # cond+uncond are one batched call per step: 3 calls, steps 0..2, in every run
    assert ends[0][2:] == (3, [0, 1, 2]) and ends[1][2:] == (3, [0, 1, 2])
    assert torch.equal(a.samples, b.samples)
    plain = sample(handle, latent, pos, neg, sigmas, seed=5, cfg=3.0, progress=lambda *a: None)
    assert torch.allclose(plain.samples, a.samples)


def test_patch_changes_output_without_touching_the_base(handle):
    x = torch.randn(1, 4, 8, 8)
    base = handle.predict(x, 0.7, cond())
    doubled = handle.with_patch(CountingPatch(2.0)).predict(x, 0.7, cond())
    assert torch.allclose(doubled, 2 * base, atol=1e-5)
    assert torch.allclose(handle.predict(x, 0.7, cond()), base)


def test_patch_can_edit_transformer_kwargs(handle):
    class ZeroText(ModelPatch):
        key = "zero-text"

        def wrap(self, state, call, forward):
            call.kwargs["encoder_hidden_states"] = torch.zeros_like(call.kwargs["encoder_hidden_states"])
            return forward(call)

    x = torch.randn(1, 4, 8, 8)
    c = cond()
    zeroed = Conditioning(torch.zeros_like(c.embeds), c.pooled, family="sd3")
    assert torch.allclose(handle.with_patch(ZeroText()).predict(x, 0.5, c), handle.predict(x, 0.5, zeroed))


@node(category="test", outputs={"model": MODEL})
def ScaleModelForTest(model: MODEL, scale: Annotated[float, Spec(min=0.0, max=10.0)] = 1.0):
    """Test-only patch node."""
    return model.with_patch(CountingPatch(scale))


def test_patch_node_through_the_engine_leaves_cached_model_clean(tmp_path, monkeypatch):
    from tests.fixtures.shapes import txt2img
    from tests.fixtures.tiny_models import save_family

    save_family("shapes-dit", tmp_path / "models" / "checkpoints" / "tiny-shapes")
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    registry = Registry()
    registry.load_package("nodes")
    registry.add(ScaleModelForTest)
    engine = Engine(registry=registry, device="cpu", output_dir=tmp_path / "out")
    plain = txt2img()
    first = engine.run(plain, targets=["sample"]).raise_for_status().output("sample").samples
    patched = txt2img()
    patched["nodes"]["patch"] = {"type": "ScaleModelForTest", "inputs": {"model": {"from": ["ckpt", "model"]}, "scale": 0.5}}
    patched["nodes"]["sample"]["inputs"]["model"] = {"from": ["patch", "model"]}
    result = engine.run(patched, targets=["sample"]).raise_for_status()
    assert "ckpt" in result.cached and "sample" in result.executed
    assert not torch.allclose(result.output("sample").samples, first)
    engine.cache.clear()
    again = engine.run(plain, targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.equal(again, first)
