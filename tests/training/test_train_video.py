"""train_video (training/train_video.py): per-token timesteps, i2v sampling, the --tiny smoke run."""

import json

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import load_file

from training import train_video as tv


def test_token_timesteps_zero_on_given_first_frame():
    s = torch.tensor([0.5, 0.25])
    t = tv.token_timesteps(s, torch.tensor([True, False]), (2, 4, 5, 16, 16))
    assert t.shape == (2, 5 * 8 * 8)
    assert (t[0, :64] == 0).all() and (t[0, 64:] == 500).all() and (t[1] == 250).all()


def test_i2v_sampling_keeps_the_given_latent():
    model = WanTransformer3DModel(**tv.TINY_TRANSFORMER).eval()
    hidden, uncond = torch.randn(2, 40, 384), torch.zeros(1, 40, 384)
    first = torch.randn(2, 4, 16, 16)
    z = tv.sample_latents(model, hidden, uncond, (4, 5, 16, 16), steps=2, first=first)
    assert torch.equal(z[:, :, 0], first) and not torch.equal(z[:, :, 1], z[:, :, 0])
    free = tv.sample_latents(model, hidden, uncond, (4, 5, 16, 16), steps=2)
    assert not torch.equal(free[:, :, 0], first)


def test_tiny_smoke_run_exports_and_resumes(tmp_path):
    out = tmp_path / "sv"
    state = tv.main(["--tiny", "--steps", "3", "--out", str(out)])
    assert state["dit_steps"] == 3 and {r["mode"] for r in state["final_eval"]} == {"t2v", "i2v"}
    manifest = json.loads((out / "ditgraph.json").read_text())
    assert manifest["family"] == "shapes-video" and manifest["defaults"]["frames"] == 17
    vae = AutoencoderKLWan.from_pretrained(out / "vae")
    assert len(vae.config.latents_std) == vae.config.z_dim and (out / "README.md").exists()
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert WanTransformer3DModel.from_pretrained(out / "transformer").config.num_layers == 2
    state = tv.main(["--tiny", "--steps", "1", "--out", str(out), "--final-cfgs", ""])  # resumes from --out
    assert state["dit_steps"] == 4
