"""training/train_control.py runs on CPU (a few steps, tiny random base) for both kinds, and
what it writes loads through ControlNetLoader and drives ApplyControlNet."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.tiny_models import tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.mark.parametrize("kind,extra", [("controlnet", []), ("tokens", []),
                                        ("tokens", ["--image-lora-rank", "2", "--p-two", "1", "--object-weight", "2"])])
def test_train_control_runs_and_loads(base, tmp_path, kind, extra):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from app.models.handles import ModelHandle, VAEHandle
    from nodes.control import ApplyControlNet, ControlNetLoader
    from nodes.text import Conditioning
    from training import train_control

    out = tmp_path / kind
    code = train_control.main(["--base", str(base), "--out", str(out), "--kind", kind, "--max-steps", "2",
                               "--batch", "2", "--eval-n", "2", "--eval-steps", "1", "--layers", "1", "--rank", "4",
                               "--device", "cpu", "--lr", "0.05", "--warmup", "1", *extra])
    assert code == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["steps"] == 2 and set(state["eval"]) == {"control", "none"}
    target = out if kind == "controlnet" else out / train_control.TOKENS_FILE
    control = ControlNetLoader(str(target), dtype="fp32", device="cpu")
    if kind == "tokens":  # the image-stream LoRA is trained (no longer zero) and saved in the same file
        assert control.module.has_image_lora == bool(extra)
        assert all(p.abs().sum() > 0 for p in control.module.image_up.values())
    model = ModelHandle(SD3Transformer2DModel.from_pretrained(base / "transformer"), "shapes-dit")
    vae = VAEHandle(AutoencoderKL.from_pretrained(base / "vae"))
    image = torch.zeros(1, 128, 128, 3)
    image[:, 40:80, 40:44] = 1.0
    patched = ApplyControlNet(model, control, image, vae, strength=1.0).outputs[0]
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 40, 384, generator=g), torch.randn(1, 384, generator=g), family="shapes-dit")
    x = torch.randn(1, 4, 16, 16, generator=g)
    assert not torch.allclose(patched.predict(x, 0.8, cond), model.predict(x, 0.8, cond), atol=1e-6)
