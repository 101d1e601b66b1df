"""Few-step / guidance-distilled variants: detection from configs, defaults that follow them,
the warning for CFG on a guidance-distilled model, and the few-step schedules."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch

from app.core import context
from app.models.families.variants import detect_variant, guidance_warning
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, sample, sampling_defaults
from tests.fixtures.tiny_models import components


def test_detection_from_configs_and_names():
    assert detect_variant("flux", {"guidance_embeds": False}, {}).name == "flux-schnell"
    assert detect_variant("flux", {"guidance_embeds": True}, {}).name == "flux-dev"
    assert detect_variant("sd3", {}, {}, "/models/stable-diffusion-3.5-large-turbo").name == "sd3.5-turbo"
    assert detect_variant("sd3", {}, {}, "/models/stable-diffusion-3.5-large") is None
    assert detect_variant("pixart", {}, {"_class_name": "LCMScheduler"}).name == "pixart-lcm"
    assert detect_variant("pixart", {}, {"_class_name": "DPMSolverMultistepScheduler"}) is None
    assert detect_variant("sana", {"guidance_embeds": True}, {}).name == "sana-sprint"
    assert detect_variant("sana", {"guidance_embeds": False}, {}) is None
    manifest = {"variant": "shapes-dit-turbo", "defaults": {"steps": 4, "cfg": 1.0, "scheduler": "shifted"}}
    student = detect_variant("shapes-dit", {}, {}, "", manifest)
    assert (student.name, student.steps, student.scheduler) == ("shapes-dit-turbo", 4, "shifted")


def test_guidance_warning_only_for_real_cfg_on_distilled_models():
    schnell = detect_variant("flux", {"guidance_embeds": False}, {})
    assert "flux-schnell" in guidance_warning(schnell, 4.0, True)
    assert guidance_warning(schnell, 1.0, True) is None  # no CFG
    assert guidance_warning(schnell, 4.0, False) is None  # no negative: cfg is ignored
    assert guidance_warning(None, 7.0, True) is None  # a base model


def _schnell_handle():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=False)
    return ModelHandle(transformer, "flux", scheduler_config={"shift": 1.0, "use_dynamic_shifting": False})



def test_schnell_defaults_and_warning_event():
    model = _schnell_handle()
    defaults = sampling_defaults(model)
    assert (defaults["steps"], defaults["cfg"], defaults["variant"]) == (4, 1.0, "flux-schnell")
    sigmas = compute_sigmas(model, "auto", 4)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))  # shift 1: the pipeline's sigmas
    events = []
    ctx = context.RunContext("r", "n", "Sampler", torch.device("cpu"), Path("."), {}, events.append, threading.Event())
    token = context.set_current(ctx)
    try:
        cond = _cond()
        sample(model, Latent(torch.zeros(1, 4, 8, 8)), cond, cond, sigmas[-2:], 0, 3.0)
    finally:
        context.reset_current(token)
    warnings = [e for e in events if e["type"] == "warning"]
    assert len(warnings) == 1 and "flux-schnell" in warnings[0]["message"]


def _cond():
    from nodes.text import Conditioning

    g = torch.Generator().manual_seed(1)
    return Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g), family="flux")


def test_few_step_schedules_match_diffusers():
    from diffusers import LCMScheduler

    parts = components("pixart")
    config = dict(LCMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).config)
    pixart = ModelHandle(parts["transformer"], "pixart", scheduler_config=config)
    sigmas = compute_sigmas(pixart, "lcm", 4)
    timesteps = pixart.sigma_to_timestep(sigmas[:-1]).round().tolist()
    assert timesteps == [999, 759, 499, 259] and float(sigmas[-1]) == 0.0
    sana = ModelHandle(components("sana")["transformer"], "sana", scheduler_config={})
    trig = compute_sigmas(sana, "trigflow", 2)
    t = torch.tensor([1.5708, 1.3], dtype=torch.float64)
    assert torch.allclose(trig[:-1].double(), torch.sin(t) / (torch.sin(t) + torch.cos(t)), atol=1e-6)
    sd3 = ModelHandle(components("sd3")["transformer"], "sd3", scheduler_config={"shift": 3.0})
    turbo = compute_sigmas(sd3, "turbo", 4)
    assert float(turbo[0]) == 1.0 and float(turbo[-1]) == 0.0 and 0 < float(turbo[-2]) < 0.05
    assert not math.isclose(float(turbo[1]), float(compute_sigmas(sd3, "shifted", 4)[1]))


def test_qwen_image_edit_variants_from_pipeline_config_and_name():
    """Qwen-Image-Edit vs Edit-2509/2511 (same transformer class): the folder's pipeline class, the
    2511 transformer's zero_cond_t, else the file name; the base model is no variant."""
    def name(config=None, source="", pipeline=""):
        found = detect_variant("qwen-image", config or {}, {}, source, None, pipeline)
        return found.name if found else None

    assert name(pipeline="QwenImageEditPipeline", source="/m/my-model") == "qwen-image-edit"
    assert name(pipeline="QwenImageEditPlusPipeline", source="/m/my-model") == "qwen-image-edit-plus"
    assert name({"zero_cond_t": True}) == "qwen-image-edit-plus"  # 2511
    assert name(source="/m/qwen_image_edit_2509_fp8_e4m3fn.safetensors") == "qwen-image-edit-plus"
    assert name(source="/m/qwen_image_edit_fp8_e4m3fn.safetensors") == "qwen-image-edit"
    assert name(source="/m/qwen_image_fp8_e4m3fn.safetensors", pipeline="QwenImagePipeline") is None
    edit = detect_variant("qwen-image", {}, {}, "", None, "QwenImageEditPipeline")
    assert not edit.guidance_distilled and (edit.steps, edit.cfg) == (50, 4.0)  # the pipeline's own settings
