"""Parity with diffusers for the families of issue 24 (Chroma, AuraFlow, ...).

Same set-up as test_parity.py: a tiny random model saved as a pipeline folder, our decomposed
graph (CheckpointLoader -> TextEncode/-Negative -> EmptyLatent -> Sampler -> VAEDecode) run
through the Engine, then the family's own diffusers pipeline given the same noise and sigmas;
the decoded images must agree within relative L2 1e-4 (CPU fp32).
"""

from __future__ import annotations

import math

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from nodes.sampling import compute_sigmas, make_noise
from tests.fixtures.tiny_video import _umt5
from tests.models.test_parity import PROMPT, SEED, SIZE, STEPS, rel_l2, workflow
from tests.nodes.test_nodes_tiny import _t5, _t5_tokenizer, _vae_kl, save_parts


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_components(family: str, seed: int = 0) -> tuple[dict, str]:
    """(components, pipeline class name) of a tiny random ``family`` model."""
    import diffusers

    torch.manual_seed(seed)
    if family == "chroma":
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=16,
            approximator_hidden_dim=32, approximator_layers=1)
        return {"transformer": transformer, "vae": _vae_kl(4, 0.1, 0.4, seed + 1), "scheduler": _flux_scheduler(),
                "text_encoder": _t5(32, seed + 2), "tokenizer": _t5_tokenizer()}, "ChromaPipeline"
    if family == "auraflow":
        transformer = diffusers.AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            out_channels=4, pos_embed_max_size=64)
        return {"transformer": transformer, "vae": _vae_kl(4, None, 0.13025, seed + 1),
                "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=1.73),
                "text_encoder": _umt5(32, seed + 2), "tokenizer": _t5_tokenizer()}, "AuraFlowPipeline"
    raise ValueError(family)


FAMILIES = ["chroma", "auraflow"]
CFG = 4.0


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in FAMILIES:
        parts, pipeline = tiny_components(family)
        save_parts(parts, pipeline, root / "checkpoints" / f"tiny-{family}")
    return root


@pytest.fixture
def engine(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    return Engine(device="cpu", output_dir=tmp_path / "out")


def run_pipeline(family: str, folder, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = getattr(diffusers, {"chroma": "ChromaPipeline", "auraflow": "AuraFlowPipeline"}[family])
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                 use_dynamic_shifting=False)
    latents = noise
    if hasattr(pipe, "_pack_latents"):
        latents = pipe._pack_latents(noise, *noise.shape)
    with torch.no_grad():
        images = pipe(prompt=PROMPT, negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      sigmas=sigmas[:-1].tolist(), latents=latents, guidance_scale=CFG, output_type="pt").images
    return images.permute(0, 2, 3, 1).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_diffusers_pipeline(family, engine, models_root):
    graph = workflow(family)
    graph["nodes"]["sample"]["inputs"]["cfg"] = CFG
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
