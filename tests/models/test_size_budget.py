"""A model config is refused before allocation when it asks for more parameters than the budget."""

from __future__ import annotations

import json
import time

import pytest
import torch
from diffusers import SD3Transformer2DModel

from app.models.size_budget import check_parameter_budget, estimate_parameters

CONFIG = {"attention_head_dim": 8, "caption_projection_dim": 16, "in_channels": 4, "joint_attention_dim": 16,
          "num_attention_heads": 2, "num_layers": 3, "out_channels": 4, "patch_size": 2, "pooled_projection_dim": 16,
          "pos_embed_max_size": 8, "sample_size": 8}


def test_estimate_is_exact_for_a_real_build():
    real = sum(p.numel() for p in SD3Transformer2DModel.from_config(CONFIG).parameters())
    assert estimate_parameters(SD3Transformer2DModel, CONFIG) == real


def test_over_budget_configs_are_refused_in_seconds_without_allocating():
    started = time.monotonic()
    with pytest.raises(ValueError, match="over the limit of 1024"):
        check_parameter_budget(SD3Transformer2DModel, CONFIG | {"num_layers": 1_000_000}, "deep")
    with pytest.raises(ValueError, match="over the budget"):  # wide: 1000 layers of 2 x 4096 heads
        check_parameter_budget(SD3Transformer2DModel, CONFIG | {"num_layers": 1000, "attention_head_dim": 4096,
                                                                "caption_projection_dim": 8192}, "wide")
    assert time.monotonic() - started < 30


def test_the_loader_refuses_a_hostile_checkpoint_folder(tmp_path):
    from safetensors.torch import save_file

    from nodes.loaders import LoadFailed, load_diffusers_component

    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **CONFIG,
                                                    "num_layers": 1_000_000}))
    save_file({"x": torch.zeros(1)}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LoadFailed, match="num_layers = 1,000,000"):
        load_diffusers_component(folder, torch.float32, torch.device("cpu"))
