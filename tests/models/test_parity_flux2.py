"""Parity with diffusers for Flux.2 [dev] (Flux2Pipeline) and [klein] (Flux2KleinPipeline).

A tiny random model saved as a pipeline folder; our decomposed graph (CheckpointLoader ->
TextEncode(/Negative) -> EmptyLatent -> Sampler -> VAEDecode) through the Engine, then the
pipeline with the same noise and its own schedule (empirical mu, not overridden): the sigmas
must agree and the decoded images within relative L2 1e-4 (CPU fp32).
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
from app.models.sampling import compute_sigmas, make_noise
from tests.fixtures.flux2_models import PIPELINES, tiny_flux2
from tests.fixtures.parity import PROMPT, SEED, SIZE, STEPS, rel_l2, workflow
from tests.fixtures.tiny_models import save_parts

FAMILIES = list(PIPELINES)
CFG = 4.0  # klein's real CFG (and its pipeline's default); [dev] embeds its default guidance 4.0


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in FAMILIES:
        save_parts(tiny_flux2(family), PIPELINES[family], root / "checkpoints" / f"tiny-{family}")
    return root


def graph(family: str) -> dict:
    document = workflow(family)
    nodes = document["nodes"]
    if family == "flux2":  # guidance-distilled: no negative, cfg 1, the embedded guidance's default
        nodes.pop("neg")
        nodes["sample"]["inputs"].pop("negative")
        nodes["sample"]["inputs"]["cfg"] = 1.0
    else:
        nodes["sample"]["inputs"]["cfg"] = CFG
    return document


def run_pipeline(family: str, folder: Path, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import diffusers

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(folder, torch_dtype=torch.float32,
                                                                 local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
                      latents=noise, output_type="pt").images
    return images.permute(0, 2, 3, 1).float(), pipe.scheduler.sigmas.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_flux2_matches_diffusers_pipeline(family, models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    result = engine.run(graph(family), targets=["decode", "ckpt", "empty"]).raise_for_status()
    model = result.output("ckpt", 0)
    assert model.family == family
    latent = result.output("empty").samples
    assert latent.shape == (1, 16, SIZE // 4, SIZE // 4)  # the tiny VAE's 2x, patchified 2x2: 4 x 4 channels
    ours = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[-2:]))
    reference, sigmas = run_pipeline(family, models_root / "checkpoints" / f"tiny-{family}",
                                     make_noise(tuple(latent.shape), SEED))
    assert torch.allclose(ours, sigmas, atol=1e-6), (ours, sigmas)
    image = result.output("decode")
    assert image.shape == reference.shape
    error = rel_l2(image, reference)
    print(f"{family}: relative L2 vs {PIPELINES[family]} = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"{family}: relative L2 {error:.3e}"


@pytest.mark.parametrize("name", ["flux2-txt2img", "flux2-klein-txt2img"])
def test_shipped_graph_names_its_model_when_absent(name, tmp_path, monkeypatch):
    document = json.loads((Path(__file__).resolve().parents[2] / "graphs" / f"{name}.json").read_text())
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    problems = errors(Engine(registry=default_registry(), device="cpu").validate(Workflow.from_dict(document)))
    checkpoint = document["nodes"]["1"]["inputs"]["checkpoint"]
    assert problems and any(checkpoint in str(p) for p in problems), problems
    assert document["meta"]["requires"] == [f"checkpoints/{checkpoint}"]
