"""Video families end to end through the Engine, and parity with their diffusers pipelines.

Tiny random Wan 2.1, Wan 2.2 (two experts) and LTX-Video models are saved as pipeline folders,
run as decomposed workflows (load, encode, empty video latent, sample, decode, save as MP4), and
compared with WanPipeline / LTXPipeline given the same noise and sigmas: relative L2 <= 1e-4 on
the decoded frames (CPU fp32).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from app.core.media import read_video, read_workflow
from app.models.sampling import compute_sigmas, make_noise
from tests.fixtures.parity import engine, rel_l2  # noqa: F401, F811 (pytest fixtures)
from tests.fixtures.tiny_video import CFG, NEGATIVE, PROMPT, SEED, SIZES, STEPS, save_video_family, workflow

FAMILIES = list(SIZES)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in FAMILIES:
        save_video_family(family, root / "checkpoints" / f"tiny-{family}")
    return root


def run_pipeline(family: str, folder, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The pipeline's decoded frames (F, H, W, 3) for the same noise and sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, WanPipeline

    width, height, frames = SIZES[family]
    cls = LTXPipeline if family == "ltx" else WanPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                 use_dynamic_shifting=False)
    kwargs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": height, "width": width, "num_frames": frames,
              "num_inference_steps": STEPS, "guidance_scale": CFG, "output_type": "pt"}
    set_timesteps = pipe.scheduler.set_timesteps

    def ours(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        return set_timesteps(sigmas=given, device=device)  # neither pipeline takes sigmas: set the scheduler's

    given = sigmas[:-1].tolist()
    pipe.scheduler.set_timesteps = ours
    kwargs["latents"] = pipe._pack_latents(noise, 1, 1) if family == "ltx" else noise
    with torch.no_grad():
        video = pipe(**kwargs).frames
    return video[0].permute(0, 2, 3, 1).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_video_family_matches_diffusers_pipeline(family, engine, models_root, tmp_path):  # noqa: F811 (fixture)
    saved = engine.run(workflow(family)).raise_for_status().ui["save"]["videos"][0]
    result = engine.run(workflow(family), targets=["decode", "ckpt", "empty"]).raise_for_status()
    assert result.executed == []  # everything memoized
    video = result.output("decode")
    model = result.output("ckpt", 0)
    assert model.family == ("ltx" if family == "ltx" else "wan")
    assert (model.transformer_2 is not None) == (family == "wan22")
    width, height, frames = SIZES[family]
    assert tuple(video.frames.shape) == (frames, height, width, 3)
    latent = result.output("empty").samples
    sigmas = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[2:]))
    if family == "wan22":  # the schedule crosses the experts' boundary: both experts run
        assert sigmas[0] >= 0.875 > sigmas[1]
    reference = run_pipeline(family, models_root / "checkpoints" / f"tiny-{family}", sigmas,
                             make_noise(tuple(latent.shape), SEED))
    error = rel_l2(video.frames, reference)
    print(f"{family}: relative L2 vs pipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"{family}: relative L2 {error:.3e}"
    # the saved MP4 reopens with the same frame count, size and fps, and carries the workflow
    path = tmp_path / "out" / saved["subfolder"] / saved["filename"]
    reopened = read_video(path)
    assert tuple(reopened.frames.shape) == (frames, height, width, 3) and reopened.fps == pytest.approx(8.0)
    assert read_workflow(path)["nodes"]["pos"]["inputs"]["text"] == PROMPT


def test_tiled_video_decode_matches_the_whole_decode(engine):  # noqa: F811 (fixture)
    """VAEDecodeVideo tiled=True goes through the VAE's own tiled_decode (tiles smaller than the video)."""
    result = engine.run(workflow("wan"), targets=["ckpt", "sample"]).raise_for_status()
    vae, latent = result.output("ckpt", 2), result.output("sample")
    whole = vae.decode(latent.samples)
    vae.vae.enable_tiling(tile_sample_min_height=8, tile_sample_min_width=8, tile_sample_stride_height=8,
                          tile_sample_stride_width=8)
    try:
        tiled = vae.decode(latent.samples, tiled=True)
    finally:
        vae.vae.disable_tiling()
    assert tiled.shape == whole.shape
    error = rel_l2(tiled, whole)
    print(f"tiled vs whole decode: relative L2 {error:.3e}")
    assert 0 < error < 0.5  # tiled for real (tiles see less context): close, not equal


def test_wan_image_to_video_matches_diffusers_pipeline(models_root, tmp_path, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from PIL import Image

    folder = save_video_family("wan-i2v", models_root / "checkpoints" / "tiny-wan-i2v")
    width, height, frames = SIZES["wan"]
    pixels = (torch.rand(height, width, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    (tmp_path / "input").mkdir()
    Image.fromarray(pixels.numpy()).save(tmp_path / "input" / "start.png")
    monkeypatch.setitem(paths._overrides, "models", models_root)
    monkeypatch.setitem(paths._overrides, "inputs", tmp_path / "input")
    doc = workflow("wan")
    nodes = doc["nodes"]
    nodes["ckpt"]["inputs"]["checkpoint"] = "tiny-wan-i2v"
    nodes["image"] = {"type": "LoadImage", "inputs": {"image": "start.png"}}
    nodes["i2v"] = {"type": "ImageToVideo", "inputs": {
        "model": {"from": ["ckpt", "model"]}, "vae": {"from": ["ckpt", "vae"]}, "positive": {"from": ["pos", "conditioning"]},
        "negative": {"from": ["neg", "conditioning"]}, "start_image": {"from": ["image", "image"]},
        "width": width, "height": height, "frames": frames}}
    nodes["sample"]["inputs"].update(positive={"from": ["i2v", "positive"]}, negative={"from": ["i2v", "negative"]},
                                     latent={"from": ["i2v", "latent"]})
    del nodes["empty"], nodes["save"]
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(doc, targets=["decode", "ckpt", "i2v"]).raise_for_status()
    video, model, latent = result.output("decode"), result.output("ckpt", 0), result.output("i2v", 2).samples
    sigmas = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[2:]))

    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v_module

    # its prompt cleaning calls ftfy without checking it is installed (WanPipeline checks): skip it alike
    monkeypatch.setattr(i2v_module, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)
    pipe = WanImageToVideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas[:-1].tolist(), device=device)
    with torch.no_grad():
        reference = pipe(image=Image.fromarray(pixels.numpy()), prompt=PROMPT, negative_prompt=NEGATIVE, height=height,
                         width=width, num_frames=frames, num_inference_steps=STEPS, guidance_scale=CFG,
                         latents=make_noise(tuple(latent.shape), SEED), output_type="pt").frames[0]
    reference = reference.permute(0, 2, 3, 1).float()
    error = rel_l2(video.frames, reference)
    print(f"wan i2v: relative L2 vs pipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"wan i2v: relative L2 {error:.3e}"
