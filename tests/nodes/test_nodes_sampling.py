"""Samplers, schedules and guidance: identities, convergence order, composable nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.sampling import GuidanceState, Previewer, compute_sigmas, guide, sample
from nodes.sampling import Sampler, SamplerCustom, Scheduler, SplitSigmas
from nodes.text import Conditioning
from tests.fixtures.tiny_models import components


@pytest.fixture(scope="module")
def model():
    return ModelHandle(components("sd3")["transformer"], "sd3", scheduler_config={"shift": 3.0})


def cond(seed):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g), family="sd3")


def _quiet(*_):
    return None


def test_guidance_identities():
    g = torch.Generator().manual_seed(0)
    x, v_c, v_u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    s = torch.full((2, 1, 1, 1), 0.6)
    state = GuidanceState()
    cfg1 = guide("cfg", x, s, v_c, v_u, 1.0, 3, state, {})
    assert torch.allclose(cfg1.velocity, v_c, atol=1e-5)
    cfg4 = guide("cfg", x, s, v_c, v_u, 4.0, 3, state, {})
    assert torch.allclose(cfg4.velocity, v_u + 4 * (v_c - v_u), atol=1e-5)
    assert torch.allclose(guide("cfg++", x, s, v_c, v_u, 1.0, 3, state, {}).x0, cfg1.x0, atol=1e-5)
    plus = guide("cfg++", x, s, v_c, v_u, 4.0, 3, state, {})
    assert torch.allclose(plus.x0, cfg4.x0) and torch.allclose(plus.noise, x + 0.4 * v_u, atol=1e-5)
    # APG with eta=1 and no threshold/momentum is CFG (the update is the whole difference)
    apg = guide("apg", x, s, v_c, v_u, 4.0, 3, state, {"eta": 1.0})
    assert torch.allclose(apg.velocity, cfg4.velocity, atol=1e-4)
    # CFG-Zero*: zero velocity on the first step; when v_c is a multiple of v_u, s* absorbs it
    assert guide("cfg_zero_star", x, s, v_c, v_u, 4.0, 0, state, {}).velocity.abs().max() == 0
    zs = guide("cfg_zero_star", x, s, 2 * v_u, v_u, 4.0, 1, state, {})
    assert torch.allclose(zs.velocity, 2 * v_u, atol=1e-4)


def test_second_order_samplers_converge_faster(model):
    latent = Latent(torch.zeros(1, 4, 8, 8))
    pos = cond(1)

    def run(name, steps):
        sigmas = compute_sigmas(model, "shifted", steps)
        return sample(model, latent, pos, None, sigmas, 3, 1.0, sampler_name=name, progress=_quiet).samples

    reference = run("euler", 96)
    error = {name: float((run(name, 6) - reference).norm()) for name in ("euler", "heun", "rf_solver", "dpmpp_2m")}
    assert error["heun"] < error["euler"] and error["rf_solver"] < error["euler"] and error["dpmpp_2m"] < error["euler"], error


def test_scheduler_and_sampler_custom_match_sampler(model):
    latent = Latent(torch.zeros(1, 4, 8, 8))
    pos, neg = cond(1), cond(2)
    plain = Sampler(model, pos, latent, neg, seed=4, steps=4, cfg=3.0, scheduler="shifted")
    sigmas = Scheduler(model, steps=4, scheduler="shifted")
    custom = SamplerCustom(model, pos, latent, sigmas, neg, seed=4, cfg=3.0)
    assert torch.equal(plain.samples, custom.samples)
    high, low = SplitSigmas(sigmas, 2)
    assert torch.equal(high[-1], low[0]) and len(high) + len(low) == len(sigmas) + 1
    first = SamplerCustom(model, pos, latent, high, neg, seed=4, cfg=3.0)
    second = SamplerCustom(model, pos, first, low, neg, seed=4, cfg=3.0, add_noise=False)
    assert torch.allclose(second.samples, plain.samples, atol=1e-5)


def test_dynamic_shift_grows_with_resolution(model):
    small = compute_sigmas(model, "dynamic", 10, latent_hw=(32, 32))
    large = compute_sigmas(model, "dynamic", 10, latent_hw=(128, 128))
    assert bool((large[1:-1] > small[1:-1]).all())


def test_flux_dynamic_schedule_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = components("flux")
    flux = ModelHandle(parts["transformer"], "flux", scheduler_config=dict(parts["scheduler"].config))
    ours = compute_sigmas(flux, "auto", 28, latent_hw=(128, 128))
    sched = FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler"].config)
    import numpy as np

    from app.models.families import dynamic_mu

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=dynamic_mu(64 * 64, dict(sched.config)))
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6)


@pytest.mark.parametrize("scheduler", ["dynamic", "shifted"])
def test_shift_terminal_schedules_match_diffusers(scheduler):
    """Qwen-Image's released scheduler stretches its schedule to end at shift_terminal 0.02
    (LTX-Video's at 0.1); "shifted" is the same config with a static shift."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from app.models.families import dynamic_mu

    config = {"shift": 3.1, "use_dynamic_shifting": scheduler == "dynamic", "base_shift": 0.5, "max_shift": 0.9,
              "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02}
    qwen = ModelHandle(components("sd3")["transformer"], "qwen-image", scheduler_config=config)  # config is all it reads
    ours = compute_sigmas(qwen, scheduler, 20, shift=3.1 if scheduler == "shifted" else 0.0, latent_hw=(128, 96))
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=dynamic_mu(64 * 48, config))
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6)
    assert abs(float(ours[-2]) - 0.02) < 1e-6


def test_wiring_mistakes_get_clear_errors(model):
    with pytest.raises(ValueError, match="expects 4"):
        Sampler(model, cond(1), Latent(torch.zeros(1, 16, 8, 8)))
    flux_cond = Conditioning(torch.zeros(1, 7, 32), torch.zeros(1, 32), family="flux")
    with pytest.raises(ValueError, match="encoded for flux but the model is sd3"):
        Sampler(model, flux_cond, Latent(torch.zeros(1, 4, 8, 8)))


def test_previews_never_wait_for_a_pending_copy(model, monkeypatch):
    """A preview whose device->host copy has not landed is delivered at a later step, never
    waited for; at most one copy is in flight; the last step always gets the final latent's."""
    landed = {"now": False}
    started = []

    def slow_copy(latent):
        started.append(latent.clone())
        return latent.clone(), lambda: landed["now"]

    monkeypatch.setattr(Previewer, "_start_copy", staticmethod(slow_copy))
    previews = Previewer(model, interval=0.0)
    x0 = [torch.full((1, 16, 8, 8), float(i)) for i in range(4)]
    assert previews(1, 4, x0[0]) is None and len(started) == 1
    assert previews(2, 4, x0[1]) is None and len(started) == 1  # still in flight: no second copy
    landed["now"] = True
    image = previews(3, 4, x0[2])  # the step-1 copy landed: its image, and a new copy started
    assert image is not None and image.dtype.name == "uint8" and len(started) == 2
    final = previews(4, 4, x0[3])
    assert final.shape == image.shape
    assert Previewer(model, enabled=False)(4, 4, x0[3]) is None


def test_cfg_norm_and_fresca_adjust_how_cfg_combines(model):
    from types import SimpleNamespace

    from app.models import families
    from app.models.sampling.guidance import CFGNorm as Norm
    from app.models.sampling.guidance import renorm_of
    from nodes.sampling import CFGNorm, FreSca

    g = torch.Generator().manual_seed(1)
    x, v_c, v_u = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    s = torch.full((1, 1, 1, 1), 0.6)
    plain = v_u + 4 * (v_c - v_u)
    assert renorm_of(model) is None and model.cfg_patches == ()
    norm = renorm_of(CFGNorm(model, 1.0, False))(x, s, v_c, v_u, 4.0)
    x0, x0_c, x0_n = x - s * plain, x - s * v_c, x - s * norm
    # the guided x0 is scaled down, never up, to the conditional x0's norm over the channels
    assert torch.allclose(x0_n.norm(dim=1), torch.minimum(x0.norm(dim=1), x0_c.norm(dim=1)), atol=1e-4)
    pre = renorm_of(CFGNorm(model, 1.0, True))(x, s, v_c, v_u, 4.0)
    assert torch.allclose(pre.norm(dim=1), v_c.norm(dim=1), atol=1e-4)  # rescaled up or down
    # FreSca with one scale everywhere scales the whole guidance difference by it
    assert torch.allclose(renorm_of(FreSca(model, 1.0, 1.0, 2))(x, s, v_c, v_u, 4.0), plain, atol=1e-5)
    assert torch.allclose(renorm_of(FreSca(model, 2.0, 2.0, 2))(x, s, v_c, v_u, 4.0), v_u + 8 * (v_c - v_u), atol=1e-4)
    # on a family with its own renormalisation (Lumina 2, Qwen-Image), CFGNorm replaces it
    lumina = SimpleNamespace(info=families.get("lumina2"), cfg_patches=(Norm(1.0, True),))
    assert torch.allclose(renorm_of(lumina)(x, s, v_c, v_u, 4.0), pre, atol=1e-5)
    # and it steers a real sampling run
    latent = Latent(torch.randn(1, 4, 8, 8, generator=g))
    sigmas = compute_sigmas(model, "auto", 2, 3.0, (8, 8))
    runs = [sample(m, latent, cond(2), cond(3), sigmas, 0, 4.0, "cfg", "euler", progress=_quiet).samples
            for m in (model, CFGNorm(model, 0.5, False))]
    assert not torch.allclose(*runs)


def _turbo_graph(cfg: float, negative: bool, graph: str = "shapes-turbo.json") :
    from app.core import workflow as wf

    doc = json.loads((Path(__file__).resolve().parents[2] / "graphs" / graph).read_text())
    sampler = doc["nodes"]["5"]["inputs"]
    sampler["cfg"] = cfg
    if negative:
        doc["nodes"]["neg"] = {"type": "TextEncode", "inputs": {"text_encoder": {"from": ["1", "text_encoder"]}, "text": ""}}
        sampler["negative"] = {"from": ["neg", "conditioning"]}
    return wf.loads(json.dumps(doc))


@pytest.mark.parametrize("cfg,negative,graph,warned", [
    (4.0, True, "shapes-turbo.json", True),     # CFG on the distilled student: warned, on its cfg input
    (1.0, True, "shapes-turbo.json", False),    # no CFG
    (4.0, False, "shapes-turbo.json", False),   # no negative: cfg is ignored
    (4.0, True, "shapes-txt2img.json", False),  # the base model takes CFG
])
def test_validation_warns_of_cfg_on_a_guidance_distilled_checkpoint(cfg, negative, graph, warned):
    """The Sampler reads the variant from the checkpoint folder's configs at validation time,
    before anything loads, and warns (it does not refuse: a user may want it)."""
    from app.core.registry import default_registry
    from app.core.validation import validate

    problems = [p for p in validate(_turbo_graph(cfg, negative, graph), default_registry()) if p.kind == "check"]
    if not warned:
        assert problems == []
        return
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.node, problem.input, problem.severity) == ("5", "cfg", "warning")
    assert "shapes-dit-turbo" in problem.message and "guidance-distilled" in problem.message
