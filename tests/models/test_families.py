"""The family registry: every module registered once, detection by folder/config/pipeline/keys."""

from __future__ import annotations

import inspect
import json
import pkgutil
import sys

import diffusers
import pytest

from app.models import families
from app.models.families.base import Family
from app.models.text_encoders import TextEncoders

MODULES = [m.name for m in pkgutil.iter_modules(families.__path__) if m.name not in ("base", "variants")]


def test_every_family_module_is_registered_once_under_its_name():
    assert len(MODULES) == len(families.FAMILIES)  # one family per module, none dropped
    for module in MODULES:
        family = sys.modules[f"app.models.families.{module}"].FAMILY
        assert isinstance(family, Family)
        assert family.name.replace("-", "_") == module
        assert families.get(family.name) is family
    with pytest.raises(ValueError, match="unknown model family"):
        families.get("not-a-family")


def test_a_name_defined_twice_is_an_error(tmp_path, monkeypatch):
    package = tmp_path / "twofamilies"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module in ("one", "two"):
        (package / f"{module}.py").write_text("from app.models.families.sd3 import SD3\nFAMILY = SD3()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="defined twice"):
        families._discover("twofamilies", [str(package)])


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_family_facts_name_real_diffusers_classes(name):
    fam = families.get(name)
    assert hasattr(diffusers, fam.transformer_class) and hasattr(diffusers, fam.vae_class)
    assert set(fam.pipeline_text_slots) == set(fam.text_slots)
    assert set(fam.optional_text_slots) <= set(fam.text_slots)
    if fam.pipeline_class:  # the text components the encoder builds the pipeline with exist there
        params = inspect.signature(getattr(diffusers, fam.pipeline_class).__init__).parameters
        assert set(fam.pipeline_text_slots.values()) <= set(params)
    assert fam.prediction in ("flow", "flow_reversed", "eps", "v")
    assert fam.vae_factor >= 1 and fam.temporal_factor >= 1 and fam.latent_channels >= 1


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_detection_by_config_pipeline_and_folder(name, tmp_path):
    fam = families.get(name)
    config = {"_class_name": fam.transformer_class}
    if name == "shapes-dit":  # the bundled model is an SD3 transformer with MiniLM-sized text inputs
        config.update(joint_attention_dim=384, pooled_projection_dim=384)
    if name == "shapes-video":  # a Wan transformer with MiniLM-sized text inputs
        config.update(text_dim=384)
    if name == "flux2-klein":  # Flux.2's transformer without the guidance embedding
        config.update(guidance_embeds=False)
    assert families.detect_config_family(config) == name
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    assert families.detect_folder_family(tmp_path) == name
    for pipeline in filter(None, (fam.pipeline_class, *fam.pipeline_aliases)):
        assert families.detect_pipeline_family(pipeline) == name
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        assert families.detect_folder_family(tmp_path) == name


def test_unknown_folders_and_classes_are_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="not a supported transformer"):
        families.detect_folder_family(tmp_path)
    (tmp_path / "ditgraph.json").write_text(json.dumps({"family": "nope"}))
    with pytest.raises(ValueError, match="unknown family"):
        families.detect_folder_family(tmp_path)


@pytest.mark.parametrize("keys, expected", [
    (["double_blocks.0.img_attn.qkv.weight"], "flux"),
    (["single_transformer_blocks.0.attn.to_q.weight", "context_embedder.weight", "pos_embed.x"], "flux"),
    (["joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
    (["context_embedder.weight", "pos_embed.proj.weight"], "sd3"),
    (["cap_embedder.0.weight", "noise_refiner.0.x"], "lumina2"),
    (["caption_projection.linear_1.weight", "adaln_single.linear.weight"], "pixart"),
    (["caption_projection.linear_1.weight", "adaln_single.linear.weight", "blocks.0.ff.conv_inverted.weight"], "sana"),
    (["distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"], "chroma"),  # original
    (["distilled_guidance_layer.layers.0.linear_1.weight", "single_transformer_blocks.0.attn.to_q.weight"], "chroma"),
    (["model.register_tokens", "model.double_layers.0.attn.w1q.weight"], "auraflow"),  # fal's release
    (["register_tokens", "joint_transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.x"], "auraflow"),
    (["model.diffusion_model.txt_norm.weight", "model.diffusion_model.transformer_blocks.0.img_mod.1.weight"],
     "qwen-image"),  # ComfyUI repack (the original release uses the same names unprefixed)
    # Flux.2: original/ComfyUI names (its double_blocks are also Flux.1's), diffusers names; [klein] has no guidance
    (["double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight", "guidance_in.in_layer.weight",
      "single_stream_modulation.lin.weight"], "flux2"),
    (["double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight",
      "single_stream_modulation.lin.weight"], "flux2-klein"),
    (["single_stream_modulation.linear.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"], "flux2"),
    (["blocks.0.attn1.Wqkv.weight", "text_embedding_padding", "mlp_t5.fc1.weight"], "hunyuan-dit"),  # original
    (["some.unknown.weight"], None),
])
def test_state_dict_detection(keys, expected):
    assert families.detect_state_dict_family(keys) == expected


def test_shapes_dit_accepts_sd3_named_weights_but_not_flux():
    fam = families.get("shapes-dit")
    assert fam.accepts_state_dict_of("sd3") and not fam.accepts_state_dict_of("flux")
    assert not families.get("sd3").accepts_state_dict_of("flux")


@pytest.mark.parametrize("slots, expected", [
    ({"clip_l", "clip_g", "t5"}, "sd3"), ({"clip_l", "clip_g"}, "sd3"), ({"clip_l", "t5"}, "flux"),
    ({"t5"}, "pixart"), ({"minilm"}, "shapes-dit"), ({"gemma"}, None),  # Gemma: Sana or Lumina 2
    ({"umt5"}, "wan"),  # LTX's lone T5 is never guessed (PixArt's too): it comes from the checkpoint
    ({"qwen2vl"}, "qwen-image"),  # Chroma's T5 and AuraFlow's UMT5 are never guessed either
    ({"mistral3"}, "flux2"), ({"qwen3"}, "flux2-klein"), ({"bert", "t5"}, "hunyuan-dit"),
])
def test_text_encoder_slots_guess_the_family(slots, expected):
    encoders = TextEncoders({s: (None, None) for s in slots})
    assert encoders.guess_family() == expected


def test_packed_latent_layout():
    class Config:
        in_channels, patch_size = 64, 1

    flux, sd3 = families.get("flux"), families.get("sd3")
    assert (flux.model_latent_channels(Config), flux.patch_size(Config)) == (16, 2)
    assert (sd3.model_latent_channels(Config), sd3.patch_size(Config)) == (64, 1)
