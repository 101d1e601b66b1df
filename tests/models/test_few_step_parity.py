"""Few-step models end to end through the Engine, against their diffusers pipelines.

Tiny random variants (Flux-schnell, SD3.5-turbo, PixArt-LCM, Sana-Sprint) are saved as
pipeline folders and run as a txt2img workflow whose Sampler takes steps, cfg, sampler and
scheduler from ModelSamplingDefaults (so the variant is detected and its defaults are the
pipeline's), then compared with the pipeline run with the same seed (the stochastic samplers
draw their step noise from one seeded generator in the pipelines' order). Relative L2 on the
decoded image must be <= 1e-4 on CPU fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from app.core import paths
from app.core.executor import Engine, NodeFailed
from app.models import families
from tests.fixtures.parity import PROMPT, SIZE, rel_l2
from tests.fixtures.tiny_models import save_family

SEED = 4321


def _schnell():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=False)
    return "flux", {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15)}, None


def _sd3_turbo():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return "sd3", {"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}, None


def _pixart_lcm():
    from diffusers import LCMScheduler

    return "pixart", {"scheduler": LCMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)}, None


def _sana_sprint():
    from diffusers import SanaTransformer2DModel, SCMScheduler

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=32, guidance_embeds=True, qk_norm="rms_norm_across_heads")
    return "sana", {"transformer": transformer, "scheduler": SCMScheduler()}, "SanaSprintPipeline"


# variant: (factory, its sampler, its scheduler, its steps, pipeline kwargs)
VARIANTS = {
    "flux-schnell": (_schnell, "euler", "auto", 4, {}),
    "sd3-turbo": (_sd3_turbo, "euler", "turbo", 4, {"guidance_scale": 0.0}),
    "pixart-lcm": (_pixart_lcm, "lcm", "lcm", 4, {"guidance_scale": 0.0, "use_resolution_binning": False,
                                                  "clean_caption": False}),
    "sana-sprint": (_sana_sprint, "lcm", "trigflow", 2, {"use_resolution_binning": False}),
}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, (factory, *_rest) in VARIANTS.items():
        family, replace, pipeline = factory()
        save_family(family, root / "checkpoints" / f"tiny-{name}", replace=replace, pipeline=pipeline)
    return root


def few_step_workflow(name: str) -> dict:
    model, te, vae = ({"from": ["ckpt", out]} for out in ("model", "text_encoder", "vae"))
    return {"format": "ditgraph/workflow", "version": 1, "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"checkpoint": f"tiny-{name}"}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": te, "text": PROMPT}},
        "empty": {"type": "EmptyLatent", "inputs": {"model": model, "vae": vae, "width": SIZE, "height": SIZE}},
        "defaults": {"type": "ModelSamplingDefaults", "inputs": {"model": model}},
        "sample": {"type": "Sampler", "inputs": {
            "model": model, "positive": {"from": ["pos", "conditioning"]}, "latent": {"from": ["empty", "latent"]},
            "seed": SEED, **{k: {"from": ["defaults", k]} for k in ("steps", "cfg", "sampler", "scheduler")}}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": vae, "latent": {"from": ["sample", "latent"]}}},
    }}


def run_pipeline(name: str, folder, noise: torch.Tensor) -> torch.Tensor:
    import diffusers

    _factory, _sampler, _scheduler, steps, kwargs = VARIANTS[name]
    index = diffusers.DiffusionPipeline.load_config(folder)
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder, torch_dtype=torch.float32,
                                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)  # draws the latents, then the step noise
    with torch.no_grad():
        images = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, output_type="pt",
                      generator=generator, **kwargs).images
    return images.permute(0, 2, 3, 1).float()


# The Sana-Sprint model call (timestep s, embedded guidance) belongs to the sana family module;
# until it has it, sampling fails there (and only there: any other failure is a real one).
_SPRINT_CALL = getattr(families.get("sana"), "sprint_guidance", None) is not None
PARAMS = [pytest.param(n, marks=pytest.mark.xfail(n == "sana-sprint" and not _SPRINT_CALL, raises=NodeFailed,
                                                  reason="needs the Sana-Sprint call in families/sana.py"))
          for n in VARIANTS]


@pytest.mark.parametrize("name", PARAMS)
def test_few_step_variant_matches_its_pipeline(name, models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    result = engine.run(few_step_workflow(name), targets=["decode", "defaults"]).raise_for_status()
    _factory, sampler, scheduler, steps, _kwargs = VARIANTS[name]
    assert result.output("defaults", 0) == steps and result.output("defaults", 1) == 1.0
    assert (result.output("defaults", 2), result.output("defaults", 3)) == (sampler, scheduler)
    image = result.output("decode")
    reference = run_pipeline(name, models_root / "checkpoints" / f"tiny-{name}", None)
    assert image.shape == reference.shape
    error = rel_l2(image, reference)
    print(f"{name}: relative L2 vs its pipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"{name}: relative L2 {error:.3e}"
