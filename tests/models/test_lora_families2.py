"""LoRA loading on the issue-24 families: peft/diffusers naming applied by our hooks exactly as
peft's own layers compute, and the common trainer formats through diffusers' converters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from app.models.handles import ModelHandle
from app.models.patches.lora import lora_patch, read_lora
from nodes.text import Conditioning
from tests.fixtures.lora import assert_patch_matches
from tests.fixtures.new_families import FAMILIES, tiny_components

LATENT = {"qwen-image": (1, 4, 1, 8, 8)}  # one frame of its video-style VAE


def _peft_state(transformer: torch.nn.Module, targets: list[str]) -> tuple[torch.nn.Module, dict]:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    adapted = copy.deepcopy(transformer)
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False), adapted)
    return adapted, get_peft_model_state_dict(adapted)


def _check(handle: ModelHandle, patch, adapted: torch.nn.Module, family: str) -> None:
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, 6, 32, generator=g), None, torch.ones(1, 6, dtype=torch.long), family=family)
    assert_patch_matches(handle, patch, adapted, torch.randn(*LATENT.get(family, (1, 4, 8, 8)), generator=g), cond)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_equals_peft(family, tmp_path):
    transformer = tiny_components(family)["transformer"].eval()
    adapted, state = _peft_state(transformer, ["to_q", "to_k", "to_v"])
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "l.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 4})})
    handle = ModelHandle(transformer, family)
    patch = lora_patch(read_lora(tmp_path / "l.safetensors"), handle)
    assert patch.report.matched == patch.report.total == len(state) // 2 > 0
    _check(handle, patch, adapted, family)


def test_qwen_image_comfyui_prefixed_lora(tmp_path):
    """ComfyUI / musubi-tuner Qwen-Image LoRAs: ``diffusion_model.`` names, converted by diffusers."""
    transformer = tiny_components("qwen-image")["transformer"].eval()
    adapted, state = _peft_state(transformer, ["to_q", "add_k_proj", "img_mlp.net.2"])
    keys = {f"diffusion_model.{k}": v.contiguous() for k, v in state.items()}
    keys.update({f"diffusion_model.{k.rsplit('.lora_A', 1)[0]}.alpha": torch.tensor(2.0)
                 for k in state if ".lora_A." in k})  # alpha = rank: scale 1, as peft's r=2, alpha=4 is not
    save_file(keys, str(tmp_path / "comfy.safetensors"))
    handle = ModelHandle(transformer, "qwen-image")
    patch = lora_patch(read_lora(tmp_path / "comfy.safetensors"), handle, 2.0)  # strength 2 x scale 1 = peft's 2
    assert patch.report.matched == patch.report.total == len(state) // 2 > 0
    _check(handle, patch, adapted, "qwen-image")
