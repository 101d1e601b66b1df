"""Every real family end to end through the Engine, and parity with its diffusers pipeline.

For each family a tiny random model is saved as a diffusers pipeline folder, loaded with
CheckpointLoader, encoded, sampled (Euler, CFG where the family uses it), decoded and saved —
all through ``Engine.run`` on a workflow dict. The same folder is then loaded into the
family's diffusers pipeline, given the same initial noise and the same sigmas (its scheduler
set to shift 1 so the sigmas are used as given; PixArt: EulerDiscreteScheduler with
"linspace" spacing, which our "discrete" schedule reproduces), and the decoded images must
agree within relative L2 1e-3 on CPU fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from app.models.sampling import make_noise
from tests.fixtures.parity import CFG, FAMILIES, PROMPT, SEED, SIZE, STEPS, engine, models_root, rel_l2, workflow  # noqa: F401, F811 (pytest fixtures)


def run_pipeline(family: str, folder, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    import diffusers
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    cls = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline,
           "pixart": diffusers.PixArtSigmaPipeline, "sana": diffusers.SanaPipeline,
           "lumina2": diffusers.Lumina2Pipeline}[family]
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "output_type": "pt"}
    if family == "pixart":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        kwargs.update(latents=noise, use_resolution_binning=False, clean_caption=False, guidance_scale=CFG)
    else:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                     use_dynamic_shifting=False)
        kwargs["sigmas"] = sigmas[:-1].tolist()
        if family == "flux":
            b, c, h, w = noise.shape
            kwargs.update(latents=pipe._pack_latents(noise, b, c, h, w), guidance_scale=3.5)
        else:
            kwargs.update(latents=noise, guidance_scale=CFG)
        if family == "sana":
            kwargs["use_resolution_binning"] = False
    with torch.no_grad():
        images = pipe(**kwargs).images
    return images.permute(0, 2, 3, 1).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end_matches_diffusers_pipeline(family, engine, models_root, tmp_path):
    paired = family == "pixart"  # the GPU benchmark's graph: prompt and negative in one TextEncodePair
    result = engine.run(workflow(family, paired=paired)).raise_for_status()
    saved = result.ui["save"]["images"]
    assert len(saved) == 1 and (tmp_path / "out" / saved[0]["filename"]).is_file()
    ours = engine.run(workflow(family, paired=paired), targets=["decode", "ckpt", "empty"]).raise_for_status()
    assert ours.executed == []  # everything memoized
    image = ours.output("decode")
    model = ours.output("ckpt", 0)
    assert model.family == family
    latent = ours.output("empty").samples
    from app.models.sampling import compute_sigmas

    sigmas = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[-2:]))
    noise = make_noise(tuple(latent.shape), SEED)
    reference = run_pipeline(family, models_root / "checkpoints" / f"tiny-{family}", sigmas, noise)
    assert image.shape == reference.shape
    error = rel_l2(image, reference)
    print(f"{family}: relative L2 vs {family} pipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-3, f"{family}: relative L2 {error:.3e}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "flux"])
def test_text_encode_pair_matches_two_encode_nodes(family, engine):
    """One batched pass gives the conditionings of TextEncode + TextEncodeNegative."""
    nodes = {"ckpt": {"type": "CheckpointLoader", "inputs": {"checkpoint": f"tiny-{family}"}}}
    te = {"from": ["ckpt", "text_encoder"]}
    nodes["pos"] = {"type": "TextEncode", "inputs": {"text_encoder": te, "text": PROMPT}}
    nodes["neg"] = {"type": "TextEncodeNegative", "inputs": {"text_encoder": te, "text": "blurry"}}
    nodes["pair"] = {"type": "TextEncodePair", "inputs": {"text_encoder": te, "prompt": PROMPT, "negative_prompt": "blurry"}}
    wf = {"format": "ditgraph/workflow", "version": 1, "nodes": nodes}
    result = engine.run(wf, targets=["pos", "neg", "pair"]).raise_for_status()
    for single, paired in ((result.output("pos"), result.output("pair", 0)), (result.output("neg"), result.output("pair", 1))):
        assert paired.texts == single.texts and paired.family == single.family == family
        for name in ("embeds", "pooled", "mask"):
            a, b = getattr(single, name), getattr(paired, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5), f"{family} {name}"
