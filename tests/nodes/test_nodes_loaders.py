"""Loaders: folders, single-file safetensors, separate text encoders / VAE, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from app.core import paths
from app.core.executor import Engine
from app.core.workflow import WorkflowError
from nodes import loaders, text
from tests.fixtures.original_formats import flux_to_original, sd3_to_original
from tests.fixtures.tiny_models import components, save_family


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_family("sd3", root / "checkpoints" / "tiny-sd3")
    return root


@pytest.fixture
def models(root, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", root)
    return root


def _load(name: str, config: str = ""):
    """CheckpointLoader called as the engine calls it: file inputs resolved to real paths."""
    config = str(paths.resolve("checkpoints", config)) if config else ""
    return loaders.CheckpointLoader(str(paths.resolve("checkpoints", name)), config=config, dtype="fp32", device="cpu")


def test_folder_loads_model_text_encoders_and_vae(models):
    model, encoders, vae = _load("tiny-sd3")
    assert model.family == "sd3" and model.dtype == torch.float32
    assert set(encoders.slots) == {"clip_l", "clip_g", "t5"}
    assert vae.latent_channels == 4 and vae.factor == 2
    assert model.scheduler_config["shift"] == 3.0


def test_transformer_component_folder_loads_model_only(models):
    model, encoders, vae = _load("tiny-sd3/transformer")
    assert model.family == "sd3" and encoders is None and vae is None


def test_single_file_with_config_folder(models):
    base, _, _ = _load("tiny-sd3")
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in base.transformer.state_dict().items()}
    save_file(state, str(models / "checkpoints" / "sd3-single.safetensors"))
    model, encoders, vae = _load("sd3-single.safetensors", config="tiny-sd3")
    assert model.family == "sd3"
    for key, value in base.transformer.state_dict().items():
        assert torch.equal(model.transformer.state_dict()[key], value)
    assert encoders is not None and vae is not None  # taken from the config pipeline folder


@pytest.mark.parametrize("family", ["shapes-dit", "flux", "pixart", "sana", "lumina2"])
def test_single_file_in_diffusers_layout_for_every_family(family, models):
    """A transformer saved as one file (diffusers names, ComfyUI's prefix) loads with its config folder."""
    folder = models / "checkpoints" / f"tiny-{family}"
    if not folder.exists():
        save_family(family, folder)
    base = components(family)["transformer"]
    file = models / "checkpoints" / f"{family}-single.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in base.state_dict().items()}, str(file))
    model, encoders, vae = _load(file.name, config=folder.name)
    assert model.family == family and vae is not None
    loaded = model.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("variant", ["sd3", "sd3.5-medium"])
def test_original_format_sd3_file_is_converted_offline(variant, models):
    """An SD3/3.5 file in Stability's MMDiT layout (not diffusers') goes through diffusers'
    converter, configured from a local folder: the same weights come out, nothing is downloaded.
    The 3.5-medium variant has QK norms and a second (dual) attention in its first blocks."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(1)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if variant != "sd3" else {}
    base = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16, **extra)
    config = models / "checkpoints" / f"{variant}-config"
    base.save_config(config / "transformer")
    original = sd3_to_original(base.state_dict())
    assert "joint_blocks.1.context_block.adaLN_modulation.1.weight" in original
    assert ("joint_blocks.0.x_block.attn2.qkv.weight" in original) == (variant != "sd3")
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()},
              str(models / "checkpoints" / f"{variant}-original.safetensors"))
    model, _, _ = _load(f"{variant}-original.safetensors", config=config.name)
    assert model.family == "sd3"
    converted = model.transformer.state_dict()
    assert [k for k, v in base.state_dict().items() if not torch.equal(converted[k], v)] == []


def test_original_format_flux_file_loads_offline(models):
    """A Flux.1 file in Black Forest Labs' layout (what most fine-tunes ship as), at Flux's true
    width (diffusers' converter assumes 3072) but one block of each kind: 531M bf16 weights."""
    import diffusers

    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
                  axes_dims_rope=[16, 56, 56], guidance_embeds=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in diffusers.FluxTransformer2DModel(**config).state_dict().items()}
    # distinct, exactly representable values (randn would take seconds at this size): any
    # misplaced q/k/v slice or swapped half shows up as a mismatch
    state = {key: ((torch.arange(shape.numel(), dtype=torch.int32) * 7 + i) % 251).to(torch.bfloat16).view(shape)
             for i, (key, shape) in enumerate(shapes.items())}
    folder = models / "checkpoints" / "flux-config" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    file = models / "checkpoints" / "flux1-original.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in flux_to_original(state).items()}, str(file))
    try:
        model = loaders.CheckpointLoader(str(file), config=str(folder.parent), dtype="bf16", device="cpu")[0]
        assert model.family == "flux"
        loaded = model.transformer.state_dict()
        assert [k for k, v in state.items() if not torch.equal(loaded[k], v)] == []
    finally:
        file.unlink()


def test_single_file_config_is_confined_and_fingerprinted(models):
    base, _, _ = _load("tiny-sd3")
    save_file({k: v.contiguous() for k, v in base.transformer.state_dict().items()},
              str(models / "checkpoints" / "fp.safetensors"))
    engine = Engine(device="cpu")

    def wf(config: str) -> dict:
        return {"format": "ditgraph/workflow", "version": 1, "nodes": {
            "ckpt": {"type": "CheckpointLoader", "inputs": {"checkpoint": "fp.safetensors", "config": config}}}}

    assert engine.run(wf("tiny-sd3"), targets=["ckpt"]).raise_for_status().executed == ["ckpt"]
    assert engine.run(wf("tiny-sd3"), targets=["ckpt"]).executed == []
    scheduler = models / "checkpoints" / "tiny-sd3" / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "shift": 2.5}))  # the config folder changed: load again
    try:
        result = engine.run(wf("tiny-sd3"), targets=["ckpt"]).raise_for_status()
        assert result.executed == ["ckpt"] and "config" in result.reasons["ckpt"]
        assert result.output("ckpt").scheduler_config["shift"] == 2.5
    finally:
        scheduler.write_text(json.dumps(config))
    with pytest.raises(WorkflowError, match="outside"):
        engine.run(wf("../vae"), targets=["ckpt"])


def test_single_file_without_config_is_refused_clearly(models):
    base, _, _ = _load("tiny-sd3")
    save_file({k: v.contiguous() for k, v in base.transformer.state_dict().items()}, str(models / "checkpoints" / "x.safetensors"))
    with pytest.raises(loaders.LoadFailed, match="needs a config folder.*look like sd3; folders with a sd3 config: .*tiny-sd3"):
        _load("x.safetensors")


def test_bad_safetensors_names_the_file(models):
    bad = models / "checkpoints" / "broken.safetensors"
    bad.write_bytes(b"not really a safetensors file")
    with pytest.raises(loaders.LoadFailed, match="broken.safetensors: not a valid safetensors file"):
        _load("broken.safetensors", config="tiny-sd3")


def test_missing_config_and_wrong_class_and_pickles(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(loaders.LoadFailed, match="missing config.json"):
        loaders.load_diffusers_component(empty, torch.float32, torch.device("cpu"))
    folder = models / "checkpoints" / "tiny-sd3" / "transformer"
    with pytest.raises(loaders.LoadFailed, match="expected 'FluxTransformer2DModel'"):
        loaders.load_diffusers_component(folder, torch.float32, torch.device("cpu"), expected="FluxTransformer2DModel")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(loaders.LoadFailed, match="pickle formats are refused"):
        loaders.load_diffusers_component(pickled, torch.float32, torch.device("cpu"))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="not a supported transformer"):
        loaders.load_checkpoint_folder(unknown, torch.float32, torch.device("cpu"))


def test_separate_text_encoders_and_vae_match_the_checkpoint(models):
    parts = components("sd3")
    for slot, (model_key, tok_key) in {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                                       "t5": ("text_encoder_3", "tokenizer_3")}.items():
        folder = models / "text_encoders" / slot
        parts[model_key].save_pretrained(folder)
        parts[tok_key].save_pretrained(folder)
    parts["vae"].save_pretrained(models / "vae" / "tiny-vae")
    engine = Engine(device="cpu")
    wf = {"format": "ditgraph/workflow", "version": 1, "nodes": {
        "l": {"type": "TextEncoderLoader", "inputs": {"text_encoder": "clip_l", "role": "clip_l"}},
        "g": {"type": "TextEncoderLoader", "inputs": {"text_encoder": "clip_g", "role": "clip_g"}},
        "t": {"type": "TextEncoderLoader", "inputs": {"text_encoder": "t5"}},
        "all": {"type": "CombineTextEncoders", "inputs": {"first": {"from": ["l", "text_encoder"]},
                                                          "second": {"from": ["g", "text_encoder"]},
                                                          "third": {"from": ["t", "text_encoder"]}}},
        "enc": {"type": "TextEncode", "inputs": {"text_encoder": {"from": ["all", "text_encoder"]}, "text": "a red circle"}},
        "vae": {"type": "VAELoader", "inputs": {"vae": "tiny-vae"}},
    }}
    result = engine.run(wf, targets=["enc", "vae", "t"]).raise_for_status()
    assert set(result.output("t").slots) == {"t5"}  # auto role from the config
    ours = result.output("enc")
    _, encoders, vae = _load("tiny-sd3")
    reference = text.encode(encoders, ["a red circle"], "sd3")
    assert torch.allclose(ours.embeds, reference.embeds) and torch.allclose(ours.pooled, reference.pooled)
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(result.output("vae").decode(z), vae.decode(z))


def test_gemma_needs_a_family_choice(models):
    parts = components("sana")
    folder = models / "text_encoders" / "gemma"
    parts["text_encoder"].save_pretrained(folder)
    parts["tokenizer"].save_pretrained(folder)
    encoders = loaders.TextEncoderLoader(str(folder), dtype="fp32", device="cpu")
    assert set(encoders.slots) == {"gemma"}
    with pytest.raises(ValueError, match="set the 'family' input"):
        text.TextEncode(encoders, "a cat")
    assert text.TextEncode(encoders, "a cat", family="lumina2").mask is not None


def test_offload_policy_moves_weights_back_after_use(models):
    """With offload=cpu every model lives in RAM between uses (on a CPU-only machine the
    target device is the CPU too, so this checks the bookkeeping: policy set, calls work)."""
    model, encoders, vae = loaders.CheckpointLoader(str(paths.resolve("checkpoints", "tiny-sd3")), dtype="fp32",
                                                    device="cpu", offload="cpu")
    assert model.residency == encoders.residency == vae.residency == "offload"
    moved = []
    model.offload = lambda: moved.append("model")  # instance attribute: record the release
    cond = text.encode(encoders, ["a red circle"], "sd3")
    model.predict(torch.zeros(1, 4, 8, 8), 0.5, cond)
    assert moved == ["model"]
    assert model.with_patch(object()).residency == "offload"


def test_sd3_without_t5_pads_with_zeros(models):
    _, encoders, _ = _load("tiny-sd3")
    clip_only = type(encoders)({k: v for k, v in encoders.slots.items() if k != "t5"}, "sd3",
                               options={"joint_attention_dim": 32})
    cond = text.encode(clip_only, ["a red circle"], "sd3")
    assert cond.embeds.shape == (1, 77 + 256, 32) and cond.pooled.shape == (1, 32)
    assert cond.embeds[:, 77:].abs().sum() == 0


def test_block_offload_gives_the_same_predictions(models):
    """offload=blocks streams weights block by block (diffusers group offloading); on a
    CPU-only machine the "device" is the CPU, which still exercises the hooks."""
    base, encoders, _ = _load("tiny-sd3")
    streamed, streamed_encoders, _ = loaders.CheckpointLoader(str(paths.resolve("checkpoints", "tiny-sd3")),
                                                              dtype="fp32", device="cpu", offload="blocks")
    cond = text.encode(encoders, ["a red circle"], "sd3")
    assert torch.allclose(text.encode(streamed_encoders, ["a red circle"], "sd3").embeds, cond.embeds, atol=1e-6)
    x = torch.randn(1, 4, 8, 8)
    assert torch.allclose(streamed.predict(x, 0.4, cond), base.predict(x, 0.4, cond), atol=1e-5)
