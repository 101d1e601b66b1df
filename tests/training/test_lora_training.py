"""training/train_lora.py runs end to end on CPU (a few steps, tiny random base) and its file
loads through the LoRA nodes (MODEL part and VAE-decoder part)."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.tiny_models import tiny_base  # noqa: F401


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
