"""The shipped LoRA / control workflows (graphs/shapes-lora*.json, shapes-control.json) run end to
end on a tiny random shapes-dit-shaped model with tiny adapters under the bundled names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from tests.fixtures.tiny_models import tiny_base

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    from training.train_control import make_controlnet

    root = tmp_path_factory.mktemp("models")
    base = tiny_base(root / "checkpoints" / "shapes-dit")
    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer")
    vae = AutoencoderKL.from_pretrained(base / "vae")
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=r"decoder\..*conv1", init_lora_weights=False), vae)
    tensors = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    tensors.update({f"vae.{k}": v.contiguous() for k, v in get_peft_model_state_dict(vae).items()})
    (root / "loras" / "shapes-dit-outlined-lora").mkdir(parents=True)
    save_file(tensors, str(root / "loras" / "shapes-dit-outlined-lora" / "shapes-dit-outlined.safetensors"))
    controlnet = make_controlnet(SD3Transformer2DModel.from_pretrained(base / "transformer"), 1)
    with torch.no_grad():
        for p in controlnet.controlnet_blocks.parameters():
            p.normal_(0, 0.3)
        for p in controlnet.pos_embed_input.parameters():
            p.normal_(0, 0.3)
    controlnet.save_pretrained(root / "controlnets" / "shapes-dit-outline-control")
    return root


@pytest.mark.parametrize("name", ["shapes-lora", "shapes-control", "shapes-lora-control"])
def test_graph_runs(name, models, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models)
    document = json.loads((GRAPHS / f"{name}.json").read_text())
    document["nodes"]["5"]["inputs"]["steps"] = 2
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    result = engine.run(document).raise_for_status()
    assert result.ui["7"]["images"][0]["filename"] == f"{name}_00001.png"
    if "lora" in name:
        assert "4/4 LoRA layers matched" in result.ui["10"]["text"][0]
        assert "VAE-decoder" in result.ui["11"]["text"][0]
    if "control" in name:
        outline = engine.run(document, targets=["24"]).raise_for_status().output("24")
        assert outline.shape == (1, 128, 128, 3) and 0.02 < float(outline.mean()) < 0.2


BUNDLED = paths.BUNDLED_MODELS
HAVE_BUNDLED = all((BUNDLED / p).exists() for p in (
    "shapes-dit/ditgraph.json", "shapes-dit-outlined-lora/shapes-dit-outlined.safetensors",
    "shapes-dit-outline-control/config.json"))


@pytest.mark.skipif(not HAVE_BUNDLED, reason="bundled shapes-dit adapters not present")
def test_lora_control_graph_on_the_bundled_weights(tmp_path):
    """Style LoRA and outline ControlNet at once on the real weights: shapes follow the drawn
    (off-grid) outlines and carry the outline style."""
    from training import evaluate

    document = json.loads((GRAPHS / "shapes-lora-control.json").read_text())
    document["nodes"]["5"]["inputs"]["steps"] = 12
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    result = engine.run(document, targets=["6", "24"]).raise_for_status()
    image = (result.output("6")[0].clamp(0, 1) * 255).round().byte().numpy()
    outline = result.output("24")[0, ..., 0].numpy()
    assert evaluate.control_score(image, outline) >= 0.7
    assert evaluate.style_score(image, document["nodes"]["2"]["inputs"]["text"]) >= 0.5
