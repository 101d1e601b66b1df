"""Cache accelerators (nodes/cache.py, app/models/accelerators/) on tiny random models of every family.

For each family x method: "never skip" settings give bit-identical latents to the uncached
model; aggressive settings skip blocks and stay finite; one patched MODEL sampled twice skips
the same blocks and gives the same latents both times (per-run state, nothing stale).
"""

from __future__ import annotations

import pytest
import torch

from app.models import accelerators as hooks
from app.models.handles import ModelPatch
from tests.fixtures.cache_models import FAMILIES, METHODS, STEPS, no_cache_hooks, skipped, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_never_skip_is_exact_and_aggressive_skips_the_same_every_run(family, method, summaries):
    t = tiny(family)
    never, aggressive = METHODS[method]
    exact = t.sample(t.handle.with_patch(hooks.CachePatch(never)))
    assert torch.equal(exact, t.reference), f"{method} at never-skip settings changed the output"
    assert skipped(summaries[-1]) == 0
    model = t.handle.with_patch(hooks.CachePatch(aggressive))  # one MODEL value, sampled twice
    first = t.sample(model)
    second = t.sample(model)
    a, b = summaries[-2], summaries[-1]
    assert skipped(a) > 0, f"{method} skipped nothing at aggressive settings"
    assert torch.isfinite(first).all()
    assert (skipped(a), a["skipped_steps"]) == (skipped(b), b["skipped_steps"])
    assert torch.equal(first, second)
    assert not torch.equal(first, t.reference)
    assert no_cache_hooks(t.handle) and t.handle.patches == ()


def test_first_block_cache_handles_sd3_last_block_without_context(summaries):
    # SD3's last joint block is context_pre_only: it returns None text states (diffusers' FBC crashes)
    t = tiny("sd3")
    assert t.handle.transformer.transformer_blocks[-1].context_pre_only
    out = t.sample(t.handle.with_patch(hooks.CachePatch(hooks.FirstBlockCache(threshold=10.0))))
    assert torch.isfinite(out).all() and summaries[-1]["skipped_calls"] > 0


def test_window_and_consecutive_limit(summaries):
    t = tiny("sd3")
    t.sample(t.handle.with_patch(hooks.CachePatch(hooks.FORA(interval=100, start=0.5, end=1.0, max_skips=1))))
    s = summaries[-1]
    # no skips before half of the steps; never two skipped steps in a row
    assert s["skipped_steps"] and min(s["skipped_steps"]) >= STEPS // 2
    assert all(b - a > 1 for a, b in zip(s["skipped_steps"], s["skipped_steps"][1:], strict=False))


def test_cfg_as_separate_calls_keeps_one_history_per_branch(summaries):
    # Lumina 2 evaluates cond and uncond as two calls per step: each gets its own slot
    t = tiny("lumina2")
    t.sample(t.handle.with_patch(hooks.CachePatch(hooks.FORA(interval=2))))
    s = summaries[-1]
    assert s["calls"] == 2 * STEPS and s["skipped_calls"] == 2 * (STEPS // 2)


def test_two_evaluations_per_step_heun(summaries):
    t = tiny("sd3")
    out = t.sample(t.handle.with_patch(hooks.CachePatch(hooks.TaylorSeer(interval=2, order=1))), sampler="heun")
    assert torch.isfinite(out).all() and summaries[-1]["blocks_skipped"] > 0


def test_hooks_are_removed_when_the_run_fails():
    t = tiny("sd3")

    class Boom(ModelPatch):
        key = "boom"

        def wrap(self, state, call, forward):
            if call.run.step == 2:
                raise RuntimeError("boom")
            return forward(call)

    model = t.handle.with_patch(hooks.CachePatch(hooks.FORA(interval=2))).with_patch(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        t.sample(model)
    assert no_cache_hooks(t.handle)
    assert torch.equal(t.sample(t.handle), t.reference)


def test_two_cache_patches_on_one_model_is_a_clear_error():
    t = tiny("sd3")
    model = t.handle.with_patch(hooks.CachePatch(hooks.FORA())).with_patch(hooks.CachePatch(hooks.TeaCache()))
    with pytest.raises(ValueError, match="at most one cache"):
        t.sample(model)
    assert no_cache_hooks(t.handle)


def test_between_block_additions_are_not_cached():
    """A ControlNet-style residual added between blocks is applied on skipped calls too and
    never counted twice: a skipped call at the same input reproduces the computed one."""
    t = tiny("sd3")
    blocks = t.handle.transformer.transformer_blocks
    added = torch.randn(1, 16, 16) * 0.5

    def add_after(module, args, output):  # runs after the (hooked) block: "between blocks"
        encoder, hidden = output
        return encoder, hidden + added

    handles = [blocks[0].register_forward_hook(add_after), blocks[1].register_forward_hook(add_after)]
    x = torch.randn(1, 4, 8, 8)
    try:
        model = t.handle.with_patch(hooks.CachePatch(hooks.FORA(interval=2)))
        with model.sampling_run(t.sigmas) as run:
            computed = model.predict(x, 0.5, t.pos)
            run.step = 1
            skipped = model.predict(x, 0.5, t.pos)
        plain = t.handle.predict(x, 0.5, t.pos)
    finally:
        for h in handles:
            h.remove()
    assert run.extras["cache"][0]["blocks_skipped"] == 3
    assert torch.equal(computed, plain)
    assert torch.allclose(skipped, computed, atol=1e-5)


def test_calibration_helpers():
    ratios = hooks.magcache_ratios_from_records(
        [{"slot": 1, "step": s, "norm": n} for s, n in enumerate([2.0, 2.2, 2.2, 1.1])])
    assert ratios == pytest.approx([1.0, 1.1, 1.0, 0.5])
    assert hooks.resample_nearest([1.0, 2.0, 3.0], 5) == [1.0, 1.0, 2.0, 3.0, 3.0]  # as diffusers' nearest_interp
    coeffs = hooks.fit_teacache([{"x": x / 10, "y": 2 * (x / 10) ** 2 + 0.1} for x in range(1, 12)])
    assert hooks.poly(coeffs, 0.5) == pytest.approx(0.6, abs=1e-6)


def test_calibration_nodes_on_a_tiny_model():
    from nodes.cache import MagCacheCalibrate, TeaCacheCalibrate

    t = tiny("sd3")
    ratios = [float(v) for v in MagCacheCalibrate(t.handle, t.pos, t.latent, t.neg, seed=1, steps=8).split(",")]
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(v > 0 for v in ratios)
    coeffs = [float(v) for v in TeaCacheCalibrate(t.handle, t.pos, t.latent, t.neg, seed=1, steps=8).split(",")]
    assert len(coeffs) == 5
    assert no_cache_hooks(t.handle)
    model = t.handle.with_patch(hooks.CachePatch(hooks.MagCache(threshold=0.5, ratios=tuple(ratios), start=0.0)))
    assert torch.isfinite(t.sample(model)).all()


def test_nodes_return_new_views_and_check_their_widgets():
    from nodes import cache as nodes

    t = tiny("sd3")
    for make in (lambda m: nodes.FirstBlockCache(m), lambda m: nodes.TeaCache(m, coefficients="1, 0"),
                 lambda m: nodes.MagCache(m, ratios="1, 0.98, 0.95"), lambda m: nodes.EasyCache(m),
                 lambda m: nodes.TaylorSeer(m), lambda m: nodes.CGTaylor(m), lambda m: nodes.DeltaDiT(m),
                 lambda m: nodes.FORACache(m)):
        patched = make(t.handle)
        assert patched is not t.handle and t.handle.patches == () and len(patched.patches) == 1
        assert patched.transformer is t.handle.transformer
    with pytest.raises(ValueError, match="start"):
        nodes.FORACache(t.handle, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="coefficients"):
        nodes.TeaCache(t.handle, coefficients="a, b")
    assert nodes.TeaCache(t.handle.with_patch(ModelPatch()), coefficients="auto").patches[-1].method.coefficients


def test_through_the_engine_cached_model_reports_the_same_skips(tmp_path, monkeypatch):
    from app.core import paths
    from app.core.executor import Engine
    from tests.fixtures.shapes import txt2img
    from tests.fixtures.tiny_models import save_family

    save_family("shapes-dit", tmp_path / "models" / "checkpoints" / "tiny-shapes")
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    wf = txt2img(steps=6)
    wf["nodes"]["cache"] = {"type": "TeaCache", "inputs": {"model": {"from": ["ckpt", "model"]}, "threshold": 10.0,
                                                          "coefficients": "1, 0", "max_skips": 2}}
    wf["nodes"]["sample"]["inputs"]["model"] = {"from": ["cache", "model"]}
    events: list[dict] = []
    first = engine.run(wf, targets=["sample"], on_event=events.append).raise_for_status()
    wf["nodes"]["sample"]["inputs"]["seed"] = 8  # the sampler re-runs, the cache node is memoized
    second = engine.run(wf, targets=["sample"], on_event=events.append).raise_for_status()
    assert "cache" in first.executed and "cache" in second.cached and "sample" in second.executed
    reports = [e for e in events if e["type"] == "cache"]
    assert len(reports) == 2 and reports[0]["node"] == "sample"
    assert reports[0]["blocks_skipped"] == reports[1]["blocks_skipped"] > 0
    assert reports[0]["skipped_steps"] == reports[1]["skipped_steps"]


def test_shipped_cache_graph_runs_on_a_tiny_shapes_model(tmp_path, monkeypatch):
    import copy
    import json
    from pathlib import Path

    from app.core import paths
    from app.core.executor import Engine
    from tests.fixtures.tiny_models import save_family

    save_family("shapes-dit", tmp_path / "models" / "checkpoints" / "tiny-shapes")
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    document = json.loads((Path(__file__).resolve().parents[2] / "graphs" / "shapes-cache.json").read_text())
    document = copy.deepcopy(document)
    document["nodes"]["1"]["inputs"]["checkpoint"] = "tiny-shapes"
    document["nodes"]["4"]["inputs"].update(width=32, height=32)
    document["nodes"]["5"]["inputs"]["steps"] = 6
    events: list[dict] = []
    Engine(device="cpu", output_dir=tmp_path / "out").run(document, on_event=events.append).raise_for_status()
    report = [e for e in events if e["type"] == "cache"]
    assert len(report) == 1 and report[0]["method"] == "taylorseer" and report[0]["skipped_calls"] > 0
