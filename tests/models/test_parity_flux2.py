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


@pytest.mark.parametrize("family", FAMILIES)
def test_flux2_reference_images_match_pipeline(family, models_root, tmp_path, monkeypatch):
    """Multi-reference editing: LoadImage -> VAEEncode -> ReferenceLatent (chained, two images, on
    both prompts for klein's CFG) vs the pipeline given the same two images (64 px, its minimum)."""
    import diffusers
    from PIL import Image

    inputs = tmp_path / "input"
    inputs.mkdir()
    pixels = torch.Generator().manual_seed(3)
    pictures = []
    for i, size in enumerate((64, 96)):
        picture = Image.fromarray((torch.rand(size, 64, 3, generator=pixels) * 255).byte().numpy())
        picture.save(inputs / f"ref{i}.png")
        pictures.append(picture)
    monkeypatch.setitem(paths._overrides, "models", models_root)
    monkeypatch.setitem(paths._overrides, "inputs", inputs)
    document = graph(family)
    nodes = document["nodes"]
    sides = ["pos"] + (["neg"] if "neg" in nodes else [])
    for side in sides:
        source = [side, "conditioning"]
        for i in range(2):
            nodes[f"load{i}"] = {"type": "LoadImage", "inputs": {"image": f"ref{i}.png"}}
            nodes[f"encode{i}"] = {"type": "VAEEncode", "inputs": {"vae": {"from": ["ckpt", "vae"]},
                                                                  "image": {"from": [f"load{i}", "image"]}}}
            nodes[f"{side}_ref{i}"] = {"type": "ReferenceLatent", "inputs": {"conditioning": {"from": source},
                                                                            "latent": {"from": [f"encode{i}", "latent"]}}}
            source = [f"{side}_ref{i}", "conditioning"]
        nodes["sample"]["inputs"]["positive" if side == "pos" else "negative"] = {"from": source}
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    result = engine.run(document, targets=["decode", "empty"]).raise_for_status()
    noise = make_noise(tuple(result.output("empty").samples.shape), SEED)
    folder = models_root / "checkpoints" / f"tiny-{family}"
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = pipe(prompt=PROMPT, image=pictures, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                         guidance_scale=CFG, latents=noise, output_type="pt").images
    reference = reference.permute(0, 2, 3, 1).float()
    error = rel_l2(result.output("decode"), reference)
    print(f"{family} with two reference images: relative L2 vs {PIPELINES[family]} = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"{family}: relative L2 {error:.3e}"
    plain, _ = run_pipeline(family, folder, noise)
    assert rel_l2(plain, reference) > 1e-3  # the references change the image


def test_reference_latent_counts_follow_the_family():
    """Flux.2 takes several reference images, Flux.1 Kontext one, other families none."""
    import sys

    default_registry()
    text = sys.modules["nodes.text"]
    latent = type("L", (), {"samples": torch.zeros(1, 16, 2, 2)})()
    cond = text.Conditioning(torch.zeros(1, 3, 48), family="flux2")
    twice = text.ReferenceLatent(text.ReferenceLatent(cond, latent), latent)
    assert len(twice.extras["reference_latents"]) == 2 and cond.extras == {}
    ten = cond
    for _ in range(10):
        ten = text.ReferenceLatent(ten, latent)
    with pytest.raises(ValueError, match="at most 10 reference"):
        text.ReferenceLatent(ten, latent)
    once = text.ReferenceLatent(text.Conditioning(torch.zeros(1, 3, 32), family="flux"), latent)
    with pytest.raises(ValueError, match="at most 1 reference"):
        text.ReferenceLatent(once, latent)
    with pytest.raises(ValueError, match="take no reference image"):
        text.ReferenceLatent(text.Conditioning(torch.zeros(1, 3, 32), family="sd3"), latent)
