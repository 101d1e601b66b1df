"""LoRA loading on Flux.2 [dev] and [klein]: peft/diffusers naming exactly as peft computes, and
the trainer formats people download (ai-toolkit / BFL ``diffusion_model.double_blocks...`` names,
as ComfyUI's Flux.2 LoRAs; kohya ``lora_unet_...``) exactly as diffusers' own loader applies them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from app.models.handles import ModelHandle
from app.models.patches.lora import lora_patch, read_lora
from nodes.text import Conditioning
from tests.fixtures.flux2_models import TEXT_HIDDEN, tiny_flux2_transformer
from tests.fixtures.lora import assert_patch_matches

FAMILIES = {"flux2": True, "flux2-klein": False}  # family -> guidance embedding
RANK = 2


def _check(handle: ModelHandle, patch, adapted: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, 6, 3 * TEXT_HIDDEN, generator=g), family=handle.family)
    assert_patch_matches(handle, patch, adapted, torch.randn(1, 16, 4, 4, generator=g), cond)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_equals_peft(family, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    transformer = tiny_flux2_transformer(FAMILIES[family], layers=2)
    adapted = copy.deepcopy(transformer)
    torch.manual_seed(0)
    targets = ["to_q", "add_v_proj", "to_qkv_mlp_proj", "linear_in"]
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=4, target_modules=targets, init_lora_weights=False), adapted)
    state = get_peft_model_state_dict(adapted)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "l.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 4})})
    handle = ModelHandle(transformer, family)
    patch = lora_patch(read_lora(tmp_path / "l.safetensors"), handle)
    assert patch.report.matched == patch.report.total == len(state) // 2 > 0
    _check(handle, patch, adapted)


def _original_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """BFL module names -> the diffusers Linear whose shape they have (fused q/k/v: to_q times 3)."""
    names = {}
    for i, block in enumerate(transformer.transformer_blocks):
        for side, attn_proj, ff in (("img", "to_out.0", "ff"), ("txt", "to_add_out", "ff_context")):
            names[f"double_blocks.{i}.{side}_attn.qkv"] = (block.attn.to_q, 3)
            names[f"double_blocks.{i}.{side}_attn.proj"] = (block.attn.get_submodule(attn_proj), 1)
            names[f"double_blocks.{i}.{side}_mlp.0"] = (getattr(block, ff).linear_in, 1)
            names[f"double_blocks.{i}.{side}_mlp.2"] = (getattr(block, ff).linear_out, 1)
    for i, block in enumerate(transformer.single_transformer_blocks):
        names[f"single_blocks.{i}.linear1"] = (block.attn.to_qkv_mlp_proj, 1)
        names[f"single_blocks.{i}.linear2"] = (block.attn.to_out, 1)
    return names


def _original_lora(transformer: torch.nn.Module, kohya: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {}
    for name, (linear, fused) in _original_modules(transformer).items():
        down = torch.randn(RANK, linear.in_features, generator=g) * 0.1
        up = torch.randn(fused * linear.out_features, RANK, generator=g) * 0.1
        if kohya:
            key = "lora_unet_" + name.replace(".", "_")
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)})
        else:
            out.update({f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up})
    return out


@pytest.mark.parametrize("kohya", [False, True], ids=["ai-toolkit", "kohya"])
@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_format_lora_equals_diffusers_loader(family, kohya, tmp_path):
    from diffusers import Flux2Pipeline

    transformer = tiny_flux2_transformer(FAMILIES[family], layers=2)
    tensors = _original_lora(transformer, kohya)
    save_file(tensors, str(tmp_path / "original.safetensors"))
    adapted = copy.deepcopy(transformer)
    Flux2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=adapted).load_lora_weights(
        {k: v.clone() for k, v in tensors.items()})
    handle = ModelHandle(transformer, family)
    patch = lora_patch(read_lora(tmp_path / "original.safetensors"), handle)
    assert patch.report.matched == patch.report.total > 0, patch.report.summary()
    _check(handle, patch, adapted)
