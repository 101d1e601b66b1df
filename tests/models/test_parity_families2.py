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
from bench.gpu_parity import qwen_tokenizer
from nodes.sampling import compute_sigmas, make_noise
from tests.fixtures.tiny_video import _umt5
from tests.fixtures.parity import PROMPT, SEED, SIZE, STEPS, rel_l2, workflow
from tests.fixtures.tiny_models import _t5, _t5_tokenizer, _vae_kl, save_parts


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_components(family: str, seed: int = 0, layers: int = 1) -> dict:
    """The pipeline components (diffusers names) of a tiny random ``family`` model."""
    import diffusers

    torch.manual_seed(seed)
    if family == "chroma":
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=16,
            approximator_hidden_dim=32, approximator_layers=1)
        return {"transformer": transformer, "vae": _vae_kl(4, 0.1, 0.4, seed + 1), "scheduler": _flux_scheduler(),
                "text_encoder": _t5(32, seed + 2), "tokenizer": _t5_tokenizer()}
    if family == "auraflow":
        transformer = diffusers.AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=layers, num_single_dit_layers=layers,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            out_channels=4, pos_embed_max_size=64)
        return {"transformer": transformer, "vae": _vae_kl(4, None, 0.13025, seed + 1),
                "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=1.73),
                "text_encoder": _umt5(32, seed + 2), "tokenizer": _t5_tokenizer()}
    if family == "qwen-image":
        transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
        vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                               temperal_downsample=[False, True, True],
                                               latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.1])
        return {"transformer": transformer, "vae": vae.eval(), "scheduler": _flux_scheduler(),
                "text_encoder": _qwen25vl(32, seed + 2), "tokenizer": qwen_tokenizer()}
    raise ValueError(family)


def _qwen25vl(hidden: int, seed: int):
    """The smallest Qwen2.5-VL that transformers builds (a 1-block vision tower is required)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=None, eos_token_id=258)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vision_start_token_id=290,
                              image_token_id=291, video_token_id=292)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


FAMILIES = ["chroma", "auraflow", "qwen-image"]
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
