"""Parity with diffusers for HunyuanDiT (HunyuanDiTPipeline): a v-prediction discrete-time model,
two masked text encoders, RoPE, and (v1.0/1.1) image-size and style embeddings.

As for PixArt (tests/models/test_parity.py), the pipeline samples with EulerDiscreteScheduler at
"linspace" spacing (its default DDPMScheduler is stochastic), which our "discrete" schedule
reproduces; same noise, CFG 5 against a real negative; decoded images within relative L2 1e-4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from app.core.registry import default_registry
from app.core.validation import errors
from app.core.workflow import Workflow
from app.models.sampling import make_noise
from tests.fixtures.hunyuan_models import tiny_hunyuan
from tests.fixtures.parity import PROMPT, SEED, STEPS, rel_l2, workflow
from tests.fixtures.tiny_models import save_parts

SIZE = 64  # the pipeline's RoPE grid assumes an 8x VAE: 64 px = 8x8 latents = 4x4 tokens
CFG = 5.0
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for meta in (True, False):
        save_parts(tiny_hunyuan(meta=meta), "HunyuanDiTPipeline", root / "checkpoints" / f"tiny-hunyuan-{meta}")
    return root


@pytest.mark.parametrize("meta", [True, False], ids=["v1.1", "v1.2"])
def test_hunyuan_dit_matches_diffusers_pipeline(meta, models_root, tmp_path, monkeypatch):
    import diffusers

    monkeypatch.setitem(paths._overrides, "models", models_root)
    graph = workflow("hunyuan-dit")
    nodes = graph["nodes"]
    nodes["ckpt"]["inputs"]["checkpoint"] = f"tiny-hunyuan-{meta}"
    nodes["empty"]["inputs"].update(width=SIZE, height=SIZE)
    nodes["sample"]["inputs"]["cfg"] = CFG
    nodes["neg"]["inputs"]["text"] = NEGATIVE
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(graph, targets=["decode", "ckpt", "empty"])
    result.raise_for_status()
    assert result.output("ckpt", 0).family == "hunyuan-dit"
    latent = result.output("empty").samples
    folder = models_root / "checkpoints" / f"tiny-hunyuan-{meta}"
    pipe = diffusers.HunyuanDiTPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True,
                                                        safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.scheduler.set_timesteps(STEPS)
    # this Euler starts from sigma_max * noise; the pipeline's own DDPM (and ours) from the VP x_T = noise,
    # i.e. sqrt(sigma_max² + 1) * noise in Euler's coordinates: give it the noise scaled to start there
    top = float(pipe.scheduler.sigmas.max())
    noise = make_noise(tuple(latent.shape), SEED) * math.sqrt(top**2 + 1) / top
    with torch.no_grad():
        reference = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                         guidance_scale=CFG, latents=noise, use_resolution_binning=False,
                         output_type="pt").images.permute(0, 2, 3, 1)
    error = rel_l2(result.output("decode"), reference)
    print(f"hunyuan-dit ({'v1.1' if meta else 'v1.2'}): relative L2 vs HunyuanDiTPipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"relative L2 {error:.3e}"


def test_shipped_graph_names_its_model_when_absent(tmp_path, monkeypatch):
    document = json.loads((Path(__file__).resolve().parents[2] / "graphs" / "hunyuandit-txt2img.json").read_text())
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    problems = errors(Engine(registry=default_registry(), device="cpu").validate(Workflow.from_dict(document)))
    checkpoint = document["nodes"]["1"]["inputs"]["checkpoint"]
    assert problems and any(checkpoint in str(p) for p in problems), problems
