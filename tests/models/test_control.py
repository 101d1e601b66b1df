"""ControlNet residual injection: SD3 / Flux (incl. union) through the Engine equal the diffusers
ControlNet pipelines with the same ControlNet; several ControlNets at once; the base MODEL stays
unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from app.core import paths
from app.core.executor import Engine
from app.models.sampling import compute_sigmas, make_noise
from tests.fixtures.parity import CFG, PROMPT, SIZE, STEPS
from tests.fixtures.parity import workflow as parity_workflow
from tests.fixtures.tiny_models import components, save_family
from training.train_control import controlnet_from_transformer

SEED = 99  # prompt, steps, size and cfg are the parity tests' (their workflow is reused here)


def make_sd3_controlnet(transformer, seed: int, layers: int = 1, instantx: bool = False):
    torch.manual_seed(seed)
    cn = controlnet_from_transformer(transformer, layers, force_zeros_pooled=instantx)
    with torch.no_grad():  # the zero-initialised outputs, made non-zero so the control has an effect
        for p in cn.controlnet_blocks.parameters():
            p.normal_(0, 0.3)
    return cn.eval()


def make_flux_controlnet(transformer, seed: int, union: bool = False):
    from diffusers import FluxControlNetModel

    config = dict(transformer.config)
    config.update(num_layers=1, num_single_layers=1, num_mode=4 if union else None)
    torch.manual_seed(seed)
    cn = FluxControlNetModel.from_config(config)
    with torch.no_grad():
        for p in list(cn.controlnet_blocks.parameters()) + list(cn.controlnet_single_blocks.parameters()):
            p.normal_(0, 0.3)
    return cn.eval()


def two_layer_sd3():
    from diffusers import SD3Transformer2DModel

    config = dict(components("sd3")["transformer"].config)
    config["num_layers"] = 2
    torch.manual_seed(5)
    return SD3Transformer2DModel.from_config(config).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("sd3", "flux"):
        save_family(family, root / "checkpoints" / f"tiny-{family}")
    sd3 = two_layer_sd3()  # a 1-layer SD3's only block is context_pre_only, which takes no residual
    sd3.save_pretrained(root / "checkpoints" / "tiny-sd3" / "transformer")
    make_sd3_controlnet(sd3, 1).save_pretrained(root / "controlnets" / "sd3-cn")
    make_sd3_controlnet(sd3, 2, instantx=True).save_pretrained(root / "controlnets" / "sd3-cn-instantx")
    make_sd3_controlnet(sd3, 6).save_pretrained(root / "controlnets" / "sd3-cn-b")
    flux = components("flux")["transformer"]
    make_flux_controlnet(flux, 3).save_pretrained(root / "controlnets" / "flux-cn")
    make_flux_controlnet(flux, 4, union=True).save_pretrained(root / "controlnets" / "flux-union")
    inputs = root / "input"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(inputs / "control.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(inputs / "control2.png")
    return root


@pytest.fixture(scope="module")
def shared_engine(root, tmp_path_factory):
    """One engine for the module: checkpoints, prompts and uncontrolled runs stay memoized."""
    return Engine(device="cpu", output_dir=tmp_path_factory.mktemp("out"))


@pytest.fixture
def engine(root, shared_engine, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", root)
    monkeypatch.setitem(paths._overrides, "inputs", root / "input")
    return shared_engine


def workflow(family: str, controls: list[dict]) -> dict:
    """The parity tests' txt2img graph with ControlNets chained between the checkpoint and the sampler."""
    document = parity_workflow(family, seed=SEED)
    document["meta"]["name"] = "control"
    nodes = document["nodes"]
    source = ["ckpt", "model"]
    for i, c in enumerate(controls):
        nodes[f"cn{i}"] = {"type": "ControlNetLoader", "inputs": {"controlnet": c["name"]}}
        nodes[f"img{i}"] = {"type": "LoadImage", "inputs": {"image": c.get("image", "control.png")}}
        nodes[f"apply{i}"] = {"type": "ApplyControlNet", "inputs": {
            "model": {"from": source}, "control": {"from": [f"cn{i}", "control"]}, "image": {"from": [f"img{i}", "image"]},
            "vae": {"from": ["ckpt", "vae"]}, "strength": c.get("strength", 1.0), "start": c.get("start", 0.0),
            "end": c.get("end", 1.0), "mode": c.get("mode", -1)}}
        source = [f"apply{i}", "model"]
    nodes["sample"]["inputs"]["model"] = {"from": source}
    return document


def run_pipeline(family, root, controls, sigmas, noise, monkeypatch):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxControlNetPipeline,
        SD3ControlNetModel,
        StableDiffusion3ControlNetPipeline,
    )
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.controlnets import SD3MultiControlNetModel

    # the pipelines sample the control image's posterior; our nodes use its mean
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    cls = SD3ControlNetModel if family == "sd3" else FluxControlNetModel
    nets = [cls.from_pretrained(root / "controlnets" / c["name"], local_files_only=True) for c in controls]
    images = []
    for c in controls:
        arr = np.asarray(Image.open(root / "input" / c.get("image", "control.png")).convert("RGB"), dtype=np.float32)
        images.append(torch.from_numpy(arr / 255.0).permute(2, 0, 1)[None] * 2 - 1)
    pipe_cls = StableDiffusion3ControlNetPipeline if family == "sd3" else FluxControlNetPipeline
    controlnet = nets[0] if len(nets) == 1 else SD3MultiControlNetModel(nets)
    pipe = pipe_cls.from_pretrained(root / "checkpoints" / f"tiny-{family}", controlnet=controlnet,
                                    torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                 use_dynamic_shifting=False)
    one = len(controls) == 1
    pick = (lambda key, default: controls[0].get(key, default)) if one else \
        (lambda key, default: [c.get(key, default) for c in controls])
    kwargs = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "output_type": "pt",
              "sigmas": sigmas[:-1].tolist(), "control_image": images[0] if one else images,
              "controlnet_conditioning_scale": pick("strength", 1.0),
              "control_guidance_start": pick("start", 0.0), "control_guidance_end": pick("end", 1.0)}
    if family == "flux":
        b, c, h, w = noise.shape
        kwargs.update(latents=pipe._pack_latents(noise, b, c, h, w), guidance_scale=3.5)
        if controls[0].get("mode", -1) >= 0:
            kwargs["control_mode"] = controls[0]["mode"]
    else:
        kwargs.update(latents=noise, guidance_scale=CFG)
    with torch.no_grad():
        return pipe(**kwargs).images.permute(0, 2, 3, 1).float()


def rel_l2(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


CASES = {
    "sd3": ("sd3", [{"name": "sd3-cn", "strength": 0.8}]),
    "sd3-instantx-window": ("sd3", [{"name": "sd3-cn-instantx", "strength": 1.2, "start": 0.3, "end": 1.0}]),
    "sd3-two": ("sd3", [{"name": "sd3-cn", "strength": 0.7, "end": 0.67},
                        {"name": "sd3-cn-b", "strength": 0.5, "image": "control2.png"}]),
    "flux": ("flux", [{"name": "flux-cn", "strength": 0.9, "end": 0.67}]),
    "flux-union": ("flux", [{"name": "flux-union", "strength": 1.0, "mode": 2}]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_matches_diffusers_pipeline(case, engine, root, monkeypatch):
    family, controls = CASES[case]
    result = engine.run(workflow(family, controls), targets=["decode", "ckpt", "empty"]).raise_for_status()
    ours = result.output("decode")
    model = result.output("ckpt", 0)
    latent = result.output("empty").samples
    sigmas = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[-2:]))
    reference = run_pipeline(family, root, controls, sigmas, make_noise(tuple(latent.shape), SEED), monkeypatch)
    plain = engine.run(workflow(family, []), targets=["decode"]).raise_for_status().output("decode")
    error = rel_l2(ours, reference)
    print(f"{case}: relative L2 vs diffusers ControlNet pipeline {error:.2e}; control effect {rel_l2(plain, reference):.2e}")
    assert math.isfinite(error) and error <= 1e-3
    assert rel_l2(plain, reference) > 1e-2  # the control changed the image


def test_base_model_is_unchanged_by_a_controlled_run(engine, tmp_path):
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    plain = engine.run(workflow("sd3", []), targets=["sample", "ckpt"]).raise_for_status()
    model = plain.output("ckpt", 0)
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    processors = {n: type(p) for n, p in model.transformer.attn_processors.items()}
    controlled = engine.run(workflow("sd3", [{"name": "sd3-cn"}]), targets=["sample"]).raise_for_status()
    assert "ckpt" in controlled.cached
    assert not torch.allclose(controlled.output("sample").samples, plain.output("sample").samples)
    after = model.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {n: type(p) for n, p in model.transformer.attn_processors.items()} == processors
    engine.cache.clear()
    again = engine.run(workflow("sd3", []), targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.equal(again, plain.output("sample").samples)


def test_wrong_family_and_missing_mode_are_clear_errors(engine):
    wf = workflow("sd3", [{"name": "flux-cn"}])
    result = engine.run(wf, targets=["sample"])
    assert result.status == "failed" and "cannot control a sd3 model" in result.error["message"]
    result = engine.run(workflow("flux", [{"name": "flux-union"}]), targets=["sample"])
    assert result.status == "failed" and "needs a mode" in result.error["message"]


def test_sana_controlnet_residuals_as_the_pipeline_passes_them():
    """Sana: the patch calls the ControlNet and the transformer exactly as SanaControlNetPipeline
    does per step (same inputs, residuals as controlnet_block_samples); two stack."""
    import inspect

    from diffusers import SanaControlNetModel, SanaTransformer2DModel

    from app.models.handles import ModelHandle, VAEHandle
    from app.models.patches.controlnet import ControlNetPatch, LoadedControlNet
    from nodes.text import Conditioning

    parts = components("sana")
    config = dict(parts["transformer"].config)
    config["num_layers"] = 2  # block 0 takes no residual
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel.from_config(config).eval()
    accepted = inspect.signature(SanaControlNetModel.__init__).parameters
    cn = SanaControlNetModel(**{**{k: v for k, v in config.items() if k in accepted}, "num_layers": 1}).eval()
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if "controlnet_blocks" in name or "input_block" in name:
                p.normal_(0, 0.3)
    handle, vae = ModelHandle(transformer, "sana"), VAEHandle(parts["vae"].eval())
    control = LoadedControlNet(cn, "sana", source="sana-cn")
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 5, 8, generator=g), None, torch.ones(1, 5, dtype=torch.long), family="sana")
    x = torch.randn(1, 4, 16, 16, generator=g)
    ours = handle.with_patch(ControlNetPatch(control, image, vae, 0.8)).predict(x, 0.5, cond)
    with torch.no_grad():
        t = torch.tensor([500.0])
        residuals = cn(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                       controlnet_cond=vae.encode(image), conditioning_scale=0.8, return_dict=False)[0]
        reference = transformer(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                                controlnet_block_samples=tuple(residuals), return_dict=False)[0]
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, handle.predict(x, 0.5, cond), atol=1e-3)
    two = handle.with_patch(ControlNetPatch(control, image, vae, 0.4)).with_patch(ControlNetPatch(control, image, vae, 0.4))
    assert torch.allclose(two.predict(x, 0.5, cond), ours, atol=1e-4)  # residuals add: 0.4 + 0.4 = 0.8
