"""shapes-dit end to end through the Engine on a tiny random shapes-dit-shaped folder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from app.core.executor import Engine
from tests.fixtures.shapes import PROMPT, engine, models_root, shared_cache, txt2img  # noqa: F401, F811 (pytest fixtures)


def test_txt2img_runs_and_saves_png_with_workflow(engine, tmp_path):
    result = engine.run(txt2img(prefix="saved-once")).raise_for_status()
    images = result.ui["save"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = tmp_path / "out" / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(path) as png:
        assert png.size == (32, 32)
        meta = png.text
    assert json.loads(meta["workflow"])["nodes"]["sample"]["type"] == "Sampler"
    assert meta["prompt"] == PROMPT
    # a second identical run is all cache hits and writes nothing new
    again = engine.run(txt2img(prefix="saved-once")).raise_for_status()
    assert again.executed == []
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_changing_seed_reruns_only_the_sampler_and_after(engine):
    engine.run(txt2img(seed=1, prefix="reseed")).raise_for_status()
    result = engine.run(txt2img(seed=2, prefix="reseed")).raise_for_status()
    assert set(result.executed) == {"sample", "decode", "save"}
    assert "seed" in result.reasons["sample"]


def test_same_seed_same_latent_and_different_seed_differs(engine):
    wf = txt2img(seed=3)
    a = engine.run(wf, targets=["sample"]).raise_for_status().output("sample").samples
    fresh = Engine(device="cpu")  # an empty cache: everything recomputed
    b = fresh.run(wf, targets=["sample"]).raise_for_status().output("sample").samples
    c = engine.run(txt2img(seed=4), targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_matches_training_reference_sampler(engine):
    """Our Euler+CFG loop equals the training monitor's reference loop (training/sample.py)."""
    wf = txt2img(steps=3, seed=11)
    result = engine.run(wf, targets=["sample", "ckpt", "pos", "neg", "empty"]).raise_for_status()
    model = result.output("ckpt", 0)
    pos, neg = result.output("pos"), result.output("neg")
    ours = result.output("sample").samples
    from app.models.sampling import make_noise

    noise = make_noise((1, 4, 16, 16), 11)
    sig = torch.linspace(1.0, 0.0, 4)
    sig = 3.0 * sig / (1 + 2.0 * sig)
    x = noise.clone()
    tr = model.transformer
    for i in range(3):
        s, s_next = sig[i], sig[i + 1]
        v = tr(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([neg.embeds, pos.embeds]),
               pooled_projections=torch.cat([neg.pooled, pos.pooled]), timestep=(s * 1000).expand(2),
               return_dict=False)[0]
        v_u, v_c = v.chunk(2)
        x = x + (s_next - s) * (v_u + 4.0 * (v_c - v_u))
    assert torch.allclose(ours, x.detach(), atol=1e-5)


def test_text_conditioning_follows_the_shapes_convention(engine):
    result = engine.run(txt2img(), targets=["pos", "neg"]).raise_for_status()
    pos, neg = result.output("pos"), result.output("neg")
    assert pos.embeds.shape == (1, 40, 384) and pos.pooled.shape == (1, 384)
    assert pos.mask is None
    # padded positions are zeroed; "" has only [CLS] [SEP]
    assert torch.count_nonzero(neg.embeds[0].abs().sum(-1)) == 2
    tokens = int(torch.count_nonzero(pos.embeds[0].abs().sum(-1)))
    assert 10 < tokens < 40
    assert torch.allclose(pos.pooled, pos.embeds.sum(1) / tokens, atol=1e-5)


@pytest.mark.parametrize("sampler", ["heun", "rf_solver", "dpmpp_2m"])
def test_other_samplers_run(engine, sampler):
    lat = engine.run(txt2img(sampler=sampler), targets=["sample"]).raise_for_status().output("sample").samples
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()


@pytest.mark.parametrize("guidance", ["cfg++", "cfg_zero_star", "apg"])
def test_guidance_methods_run(engine, guidance):
    lat = engine.run(txt2img(guidance=guidance, cfg=2.0), targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.isfinite(lat).all()


@pytest.mark.parametrize("scheduler", ["shifted", "dynamic", "linear", "karras"])
def test_schedulers_run(engine, scheduler):
    lat = engine.run(txt2img(scheduler=scheduler), targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.isfinite(lat).all()


def test_progress_events_carry_previews(engine):
    events = []
    engine.run(txt2img(steps=3, seed=33), on_event=events.append).raise_for_status()
    steps = [e for e in events if e["type"] == "progress" and e["node"] == "sample"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    preview = steps[-1]["preview"]
    assert preview.dtype.name == "uint8" and preview.shape[-1] == 3


def test_missing_checkpoint_is_a_validation_error(engine):
    from app.core.workflow import WorkflowError

    wf = txt2img()
    wf["nodes"]["ckpt"]["inputs"]["checkpoint"] = "does-not-exist"
    with pytest.raises(WorkflowError, match="not found"):
        engine.run(wf)


def test_cancel_during_sampling_stops_at_a_step_and_leaves_the_engine_usable(engine):
    import threading

    cancel = threading.Event()

    def on_event(event):
        if event["type"] == "progress" and event["node"] == "sample" and event["step"] == 2:
            cancel.set()

    result = engine.run(txt2img(steps=6, seed=21), cancel=cancel, on_event=on_event)
    assert result.status == "cancelled" and "sample" not in result.executed
    again = engine.run(txt2img(steps=6, seed=21)).raise_for_status()
    assert "sample" in again.executed and "ckpt" in again.cached
