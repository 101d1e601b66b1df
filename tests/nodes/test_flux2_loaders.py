"""Loading Flux.2 as people download it: BFL-layout single files (bare, or with ComfyUI's
prefix), Comfy-Org's "fp8mixed" files (comfy-kitchen fp8 layers with per-layer scales and
markers), and separate Mistral-3 / Qwen3 text encoder folders that tell the family; and
HunyuanDiT's BERT + mT5 loaded separately."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nodes import loaders
from tests.fixtures.flux2_models import tiny_flux2, tiny_flux2_transformer
from tests.fixtures.original_formats import flux2_to_original

FP8 = torch.float8_e4m3fn


def _config_folder(tmp_path, guidance: bool):
    model = tiny_flux2_transformer(guidance, layers=2)
    model.save_config(tmp_path / "config" / "transformer")
    return model, tmp_path / "config"


def _load(file, config):
    return loaders.load_single_file(file, config, torch.float32, torch.device("cpu"))[0]


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
def test_original_layout_file_loads_offline(prefix, guidance, tmp_path):
    model, config = _config_folder(tmp_path, guidance)
    original = flux2_to_original(model.state_dict())
    assert ("guidance_in.in_layer.weight" in original) == guidance
    save_file({prefix + k: v.contiguous() for k, v in original.items()}, str(tmp_path / "flux2.safetensors"))
    handle = _load(tmp_path / "flux2.safetensors", config)
    assert handle.family == ("flux2" if guidance else "flux2-klein")
    loaded = handle.transformer.state_dict()
    assert [k for k, v in model.state_dict().items() if not torch.equal(loaded[k], v)] == []


def _marker(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _fp8mixed(model: torch.nn.Module, fmt: str = "float8_e4m3fn") -> dict[str, torch.Tensor]:
    """Comfy-Org's fp8mixed layout: the blocks' matrices fp8 with weight_scale + comfy_quant, the rest bf16."""
    state = {}
    for key, value in flux2_to_original(model.state_dict()).items():
        if key.endswith(".weight") and value.dim() == 2 and key.startswith(("double_blocks.", "single_blocks.")):
            layer, scale = key.removesuffix(".weight"), value.abs().max() / 448
            state.update({key: (value / scale).to(FP8), f"{layer}.weight_scale": scale.float(),
                          f"{layer}.input_scale": torch.tensor(1.0), f"{layer}.comfy_quant": _marker(fmt)})
        else:
            state[key] = value.to(torch.bfloat16).contiguous()
    return state


def _run(transformer: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 48, generator=g),
              timestep=torch.tensor([0.5]), guidance=torch.tensor([4.0]), img_ids=torch.zeros(16, 4),
              txt_ids=torch.zeros(5, 4))
    with torch.no_grad():
        return transformer(**kw, return_dict=False)[0]


def test_comfy_fp8mixed_file_applies_each_layer_scale(tmp_path):
    model, config = _config_folder(tmp_path, True)
    save_file(_fp8mixed(model), str(tmp_path / "flux2_dev_fp8mixed.safetensors"))
    handle = _load(tmp_path / "flux2_dev_fp8mixed.safetensors", config)
    assert handle.family == "flux2"
    error = float((_run(handle.transformer) - _run(model)).norm() / _run(model).norm())
    assert error < 0.1  # fp8 rounding only: unscaled weights would be hundreds of times off


def test_other_comfy_quant_formats_are_refused_by_name(tmp_path):
    model, config = _config_folder(tmp_path, True)
    save_file(_fp8mixed(model, "nvfp4"), str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(loaders.LoadFailed, match="quantizes its layer as 'nvfp4'"):
        _load(tmp_path / "nvfp4.safetensors", config)


@pytest.mark.parametrize("family, slot", [("flux2", "mistral3"), ("flux2-klein", "qwen3")])
def test_text_encoder_folder_tells_the_family(family, slot, tmp_path):
    parts = tiny_flux2(family)
    folder = tmp_path / "text_encoders" / slot
    parts["text_encoder"].save_pretrained(folder)
    parts["tokenizer"].save_pretrained(folder)
    encoders = loaders.TextEncoderLoader(str(folder), dtype="fp32", device="cpu")
    assert set(encoders.slots) == {slot} and encoders.guess_family() == family


def test_hunyuan_dit_encoders_loaded_separately(tmp_path):
    """BERT is MiniLM's architecture too: its role says which; the mT5 is a T5 by its config."""
    from nodes.loaders import CombineTextEncoders, TextEncoderLoader
    from tests.fixtures.hunyuan_models import tiny_hunyuan

    parts = tiny_hunyuan()
    for name, model, tok in (("bert", "text_encoder", "tokenizer"), ("mt5", "text_encoder_2", "tokenizer_2")):
        parts[model].save_pretrained(tmp_path / name)
        parts[tok].save_pretrained(tmp_path / name)
    bert = TextEncoderLoader(str(tmp_path / "bert"), role="bert", dtype="fp32", device="cpu")
    both = CombineTextEncoders(bert, TextEncoderLoader(str(tmp_path / "mt5"), dtype="fp32", device="cpu"))
    assert set(both.slots) == {"bert", "t5"} and both.guess_family() == "hunyuan-dit"


@pytest.mark.parametrize("meta", [True, False], ids=["v1.1", "v1.2"])
def test_hunyuan_dit_original_layout_and_comfy_all_in_one_files_load(meta, tmp_path):
    """Tencent's layout (fused Wqkv/kv_proj, swapped norms); ComfyUI's all-in-one file holds it under
    model.diffusion_model. next to its text encoders and VAE, which the loader leaves out."""
    from tests.fixtures.hunyuan_models import tiny_hunyuan_transformer
    from tests.fixtures.original_formats import hunyuan_dit_to_original

    model = tiny_hunyuan_transformer(meta, layers=6)
    model.save_config(tmp_path / "config" / "transformer")
    original = hunyuan_dit_to_original(model.state_dict())
    assert "blocks.0.attn1.Wqkv.weight" in original and "blocks.5.skip_linear.weight" in original
    files = {"original": original,
             "all-in-one": {**{f"model.diffusion_model.{k}": v for k, v in original.items()},
                            "text_encoders.bert.embeddings.word_embeddings.weight": torch.zeros(3, 2),
                            "vae.decoder.conv_in.weight": torch.zeros(2, 2)}}
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
        handle = _load(tmp_path / f"{name}.safetensors", tmp_path / "config")
        assert handle.family == "hunyuan-dit"
        loaded = handle.transformer.state_dict()
        assert [k for k, v in model.state_dict().items() if not torch.equal(loaded[k], v)] == [], name
