"""Latent and image nodes: sizes, VAE round trips, img2img/inpainting, batches, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from app.core import paths
from app.models.handles import ModelHandle, VAEHandle
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, make_noise, sample
from nodes import image as image_nodes
from nodes import latent as latent_nodes
from nodes.sampling import Sampler
from nodes.text import Conditioning
from tests.fixtures.tiny_models import components


@pytest.fixture(scope="module")
def sd3():
    parts = components("sd3")
    model = ModelHandle(parts["transformer"], "sd3", scheduler_config={"shift": 3.0})
    return model, VAEHandle(parts["vae"])


def cond(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 7, 32, generator=g), torch.randn(batch, 32, generator=g), family="sd3")


def test_empty_latent_sizes_follow_model_and_vae(sd3):
    model, vae = sd3
    assert latent_nodes.EmptyLatent(model, vae, 64, 48, 2).samples.shape == (2, 4, 24, 32)
    flux = ModelHandle(components("flux")["transformer"], "flux")
    assert latent_nodes.EmptyLatent(flux, None, 64, 64).samples.shape == (1, 4, 8, 8)  # in_channels 16 = 4 x 2x2
    with pytest.raises(ValueError, match="multiples of"):
        latent_nodes.EmptyLatent(model, vae, 66, 64)
    with pytest.raises(ValueError, match="needs a model or a VAE"):
        latent_nodes.EmptyLatent(None, None, 64, 64)


def test_vae_encode_decode_shapes_and_range(sd3):
    _, vae = sd3
    pixels = torch.rand(2, 32, 48, 3)
    lat = latent_nodes.VAEEncode(vae, pixels)
    assert lat.samples.shape == (2, 4, 16, 24)
    out = latent_nodes.VAEDecode(vae, lat)
    assert out.shape == (2, 32, 48, 3) and out.min() >= 0 and out.max() <= 1
    tiled = latent_nodes.VAEDecode(vae, lat, tiled="on")
    assert tiled.shape == out.shape
    with pytest.raises(ValueError, match="channels"):
        latent_nodes.VAEDecode(vae, Latent(torch.zeros(1, 16, 8, 8)))


def test_img2img_denoise_keeps_closer_to_the_input(sd3):
    model, _ = sd3
    start = Latent(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    pos, neg = cond(1), cond(2)
    full = Sampler(model, pos, start, neg, seed=1, steps=4, cfg=2.0, denoise=1.0).samples
    half = Sampler(model, pos, start, neg, seed=1, steps=4, cfg=2.0, denoise=0.3).samples
    assert (half - start.samples).norm() < (full - start.samples).norm()
    assert Sampler(model, pos, start, neg, denoise=0.0) is start


def test_noise_mask_keeps_the_unmasked_area_exactly(sd3):
    model, _ = sd3
    start = Latent(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)))
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1
    masked = latent_nodes.SetLatentNoiseMask(start, mask)
    out = Sampler(model, cond(1), masked, cond(2), seed=2, steps=3, cfg=2.0, sampler="dpmpp_2m").samples
    assert torch.allclose(out[..., 4:], start.samples[..., 4:], atol=1e-6)
    assert not torch.allclose(out[..., :4], start.samples[..., :4], atol=1e-2)


def test_batch_items_keep_their_noise(sd3):
    model, _ = sd3
    batch = latent_nodes.EmptyLatent(model, None, 64, 64, 3)
    both = sample(model, batch, cond(1), None, compute_sigmas(model, "shifted", 2), 9, 1.0, progress=lambda *a: None)
    one = latent_nodes.LatentFromBatch(batch, 2, 1)
    alone = sample(model, one, cond(1), None, compute_sigmas(model, "shifted", 2), 9, 1.0, progress=lambda *a: None)
    assert torch.allclose(alone.samples[0], both.samples[2], atol=1e-4)
    assert torch.equal(make_noise((3, 4, 8, 8), 9)[2:], make_noise((1, 4, 8, 8), 9, [2]))


def test_latent_batch_ops():
    a, b = Latent(torch.zeros(2, 4, 8, 8)), Latent(torch.ones(1, 4, 8, 8))
    both = latent_nodes.LatentBatch(a, b)
    assert both.samples.shape == (3, 4, 8, 8)
    assert latent_nodes.RepeatLatentBatch(b, 3).samples.shape == (3, 4, 8, 8)
    assert latent_nodes.UpscaleLatent(b, 2.0).samples.shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="shapes differ"):
        latent_nodes.LatentBatch(a, Latent(torch.zeros(1, 4, 4, 4)))


def test_schedules_are_decreasing_and_end_at_zero(sd3):
    model, _ = sd3
    for name in ("shifted", "dynamic", "linear", "karras", "discrete", "auto"):
        s = compute_sigmas(model, name, 10, latent_hw=(64, 64))
        assert len(s) == 11 and s[-1] == 0 and bool((s[:-1] - s[1:] > 0).all()), name
    assert torch.allclose(compute_sigmas(model, "shifted", 4, shift=1.0), torch.linspace(1, 0, 5))
    assert len(compute_sigmas(model, "shifted", 4, denoise=0.5)) == 5
    assert compute_sigmas(model, "shifted", 4, denoise=0.5)[0] < 0.9


# -- images -----------------------------------------------------------------------------------


def test_save_image_never_overwrites_and_embeds_workflow(tmp_path, monkeypatch):
    import threading

    from app.core.context import RunContext, reset_current, set_current

    ctx = RunContext("r", "n", "SaveImage", torch.device("cpu"), tmp_path, {"nodes": {"1": {"type": "TextEncode", "inputs": {"text": "hi"}}}},
                     lambda e: None, threading.Event())
    token = set_current(ctx)
    try:
        (tmp_path / "img_00001.png").write_bytes(b"existing")
        first = image_nodes.SaveImage(torch.rand(2, 8, 8, 3), "img").ui["images"]
        second = image_nodes.SaveImage(torch.rand(1, 8, 8, 3), "sub/img").ui["images"]
        with pytest.raises(paths.PathRefused):
            image_nodes.SaveImage(torch.rand(1, 8, 8, 3), "../escape/img")
    finally:
        reset_current(token)
    assert [i["filename"] for i in first] == ["img_00002.png", "img_00003.png"]
    assert (tmp_path / "img_00001.png").read_bytes() == b"existing"
    assert second == [{"filename": "img_00001.png", "subfolder": "sub", "type": "output"}]
    with Image.open(tmp_path / "img_00002.png") as png:
        assert png.text["prompt"] == "hi" and '"TextEncode"' in png.text["workflow"]


def test_preview_goes_to_temp(tmp_path, monkeypatch):
    monkeypatch.setenv("DITGRAPH_TEMP", str(tmp_path / "temp"))
    ui = image_nodes.PreviewImage(torch.rand(1, 8, 8, 3)).ui
    assert ui["images"][0]["type"] == "temp" and (tmp_path / "temp" / ui["images"][0]["filename"]).is_file()


def test_load_image_with_alpha_gives_mask(tmp_path):
    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    rgba[:2, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "in.png")
    pixels, mask = image_nodes.LoadImage(str(tmp_path / "in.png"))
    assert pixels.shape == (1, 6, 5, 3) and torch.allclose(pixels[0, 3, 0], torch.tensor([1.0, 0, 0]))
    assert mask.shape == (1, 6, 5) and mask[0, :2].eq(1).all() and mask[0, 2:].eq(0).all()
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.jpg")
    _, no_alpha = image_nodes.LoadImage(str(tmp_path / "rgb.jpg"))
    assert no_alpha.eq(0).all()


def test_load_image_nodes_refuse_a_pixel_bomb_before_decoding(tmp_path):
    from app.core.images import ImageRefused
    from nodes import mask as mask_nodes
    from tests.fixtures.hostile import png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(16000, 11000))  # 1 KB on disk, 176 M pixels declared
    for load in (image_nodes.LoadImage, mask_nodes.LoadImageMask):
        with pytest.raises(ImageRefused, match="16000x11000"):
            load(str(bomb))


def test_save_animated_gif_and_mp4(tmp_path):
    import threading

    from app.core.context import RunContext, reset_current, set_current

    token = set_current(RunContext("r", "n", "SaveAnimated", torch.device("cpu"), tmp_path, {}, lambda e: None, threading.Event()))
    try:
        ui = image_nodes.SaveAnimated(torch.rand(4, 16, 16, 3), "anim", fps=4.0).ui
        mp4 = image_nodes.SaveAnimated(torch.rand(3, 16, 16, 3), "anim", fps=4.0, format="mp4").ui
    finally:
        reset_current(token)
    with Image.open(tmp_path / ui["images"][0]["filename"]) as gif:
        assert gif.n_frames == 4
    import imageio.v3 as iio

    video = iio.imread(tmp_path / mp4["images"][0]["filename"], plugin="FFMPEG", index=None)
    assert video.shape == (3, 16, 16, 3)


def test_prompt_metadata_follows_primitive_links():
    wf = {"nodes": {"p": {"type": "PrimitiveString", "inputs": {"value": "a blue square"}},
                    "r": {"type": "Reroute", "inputs": {"value": {"from": ["p", "value"]}}},
                    "e": {"type": "TextEncode", "inputs": {"text": {"from": ["r", "value"]}}},
                    "n": {"type": "TextEncodeNegative", "inputs": {"text": "blurry"}}}}
    assert image_nodes.prompt_texts(wf) == ["a blue square"]
