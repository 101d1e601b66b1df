"""Parity with diffusers for the families of issue 24 (Chroma, AuraFlow, ...).

Same set-up as test_parity.py: a tiny random model saved as a pipeline folder, our decomposed
graph (CheckpointLoader -> TextEncode/-Negative -> EmptyLatent -> Sampler -> VAEDecode) run
through the Engine, then the family's own diffusers pipeline given the same noise and sigmas;
the decoded images must agree within relative L2 1e-4 (CPU fp32).
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
from tests.fixtures.new_families import FAMILIES, tiny_components
from tests.fixtures.parity import PROMPT, SEED, SIZE, STEPS, rel_l2, workflow
from tests.fixtures.tiny_models import save_parts

CFG = 4.0
NEGATIVE = "blurry"  # a real negative: Qwen-Image's pipeline skips CFG without one
PIPELINES = {"chroma": "ChromaPipeline", "auraflow": "AuraFlowPipeline", "qwen-image": "QwenImagePipeline"}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in FAMILIES:
        save_parts(tiny_components(family), PIPELINES[family], root / "checkpoints" / f"tiny-{family}")
    return root


@pytest.fixture
def engine(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    return Engine(device="cpu", output_dir=tmp_path / "out")


def run_pipeline(family: str, folder, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = getattr(diffusers, PIPELINES[family])
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                 use_dynamic_shifting=False)
    latents = noise[:, :, 0] if noise.dim() == 5 else noise  # Qwen-Image: one latent frame
    if hasattr(pipe, "_pack_latents"):
        latents = pipe._pack_latents(latents, *latents.shape)
    cfg = {"true_cfg_scale": CFG} if family == "qwen-image" else {"guidance_scale": CFG}
    with torch.no_grad():
        images = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      sigmas=sigmas[:-1].tolist(), latents=latents, output_type="pt", **cfg).images
    return images.permute(0, 2, 3, 1).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_diffusers_pipeline(family, engine, models_root):
    graph = workflow(family)
    graph["nodes"]["sample"]["inputs"]["cfg"] = CFG
    graph["nodes"]["neg"]["inputs"]["text"] = NEGATIVE
    result = engine.run(graph, targets=["decode", "ckpt", "empty"]).raise_for_status()
    model = result.output("ckpt", 0)
    assert model.family == family
    latent = result.output("empty").samples
    sigmas = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[-2:]))
    noise = make_noise(tuple(latent.shape), SEED)
    reference = run_pipeline(family, models_root / "checkpoints" / f"tiny-{family}", sigmas, noise)
    image = result.output("decode")
    assert image.shape == reference.shape
    error = rel_l2(image, reference)
    print(f"{family}: relative L2 vs its diffusers pipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"{family}: relative L2 {error:.3e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_graph_names_its_model_when_absent(family, tmp_path, monkeypatch):
    document = json.loads((Path(__file__).resolve().parents[2] / "graphs" / f"{family}-txt2img.json").read_text())
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    problems = errors(Engine(registry=default_registry(), device="cpu").validate(Workflow.from_dict(document)))
    checkpoint = document["nodes"]["1"]["inputs"]["checkpoint"]
    assert problems and any(checkpoint in str(p) for p in problems), problems


def test_flux_kontext_reference_latent_matches_kontext_pipeline(tmp_path, monkeypatch):
    """Flux.1 Kontext: LoadImage -> VAEEncode -> ReferenceLatent on the prompt, vs FluxKontextPipeline
    given the same encoded image latents (its image preprocessing is the VAE encode we share)."""
    import diffusers
    from PIL import Image

    from tests.fixtures.tiny_models import components

    models, inputs = tmp_path / "models", tmp_path / "input"
    save_parts(components("flux"), "FluxKontextPipeline", models / "checkpoints" / "tiny-flux-kontext")
    inputs.mkdir()
    pixels = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=pixels) * 255).byte().numpy()).save(inputs / "ref.png")
    monkeypatch.setitem(paths._overrides, "models", models)
    monkeypatch.setitem(paths._overrides, "inputs", inputs)
    graph = workflow("flux")
    nodes = graph["nodes"]
    nodes["ckpt"]["inputs"]["checkpoint"] = "tiny-flux-kontext"
    nodes["load"] = {"type": "LoadImage", "inputs": {"image": "ref.png"}}
    nodes["encode"] = {"type": "VAEEncode", "inputs": {"vae": {"from": ["ckpt", "vae"]},
                                                       "image": {"from": ["load", "image"]}}}
    nodes["ref"] = {"type": "ReferenceLatent", "inputs": {"conditioning": {"from": ["pos", "conditioning"]},
                                                          "latent": {"from": ["encode", "latent"]}}}
    nodes["sample"]["inputs"]["positive"] = {"from": ["ref", "conditioning"]}
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    result = engine.run(graph, targets=["decode", "ckpt", "empty", "encode"]).raise_for_status()
    model, latent = result.output("ckpt", 0), result.output("empty").samples
    sigmas = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[-2:]))
    noise = make_noise(tuple(latent.shape), SEED)
    pipe = diffusers.FluxKontextPipeline.from_pretrained(models / "checkpoints" / "tiny-flux-kontext",
                                                         torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                           use_dynamic_shifting=False)
    with torch.no_grad():
        reference = pipe(prompt=PROMPT, image=result.output("encode").samples, height=SIZE, width=SIZE,
                         max_area=SIZE**2, num_inference_steps=STEPS, sigmas=sigmas[:-1].tolist(), guidance_scale=3.5,
                         latents=pipe._pack_latents(noise, *noise.shape), output_type="pt").images
    reference = reference.permute(0, 2, 3, 1).float()
    error = rel_l2(result.output("decode"), reference)
    print(f"flux kontext: relative L2 vs FluxKontextPipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"kontext: relative L2 {error:.3e}"
    nodes["sample"]["inputs"]["positive"] = {"from": ["pos", "conditioning"]}  # without the reference image
    plain = engine.run(graph, targets=["decode"]).raise_for_status().output("decode")
    assert rel_l2(plain, reference) > 1e-3


def test_qwen_image_pair_keeps_each_prompt_at_its_own_length():
    """QwenImagePipeline encodes each prompt alone, without a mask when every token counts; a padded,
    masked pair would make the transformer take masked attention (9% slower on an H200)."""
    from app.models.handles import TextEncoders
    from nodes.text import encode, encode_pair

    parts = tiny_components("qwen-image")
    encoders = TextEncoders({"qwen2vl": (parts["tokenizer"], parts["text_encoder"])}, "qwen-image",
                            torch.device("cpu"), torch.float32)
    long_prompt = "a large red circle and a small blue square on a white background, " * 3
    pos, neg = encode_pair(encoders, long_prompt, "", "qwen-image")
    assert pos.mask is None and neg.mask is None
    assert neg.embeds.shape[1] < pos.embeds.shape[1]
    alone = encode(encoders, [""], "qwen-image")
    assert torch.equal(neg.embeds, alone.embeds)
