"""Condition-token control (EasyControl/OminiControl style) on an SD3-type model: K/V computed once
per run and reused, causal condition attention, strength and step window, a clean base model."""

from __future__ import annotations

import pytest
import torch

from app.models.handles import ModelHandle, VAEHandle
from app.models.latents import Latent
from app.models.patches import condition_tokens as ct
from app.models.sampling import compute_sigmas, sample
from nodes.control import ApplyControlNet
from nodes.text import Conditioning
from tests.fixtures.tiny_models import components


@pytest.fixture(scope="module")
def parts():
    from diffusers import SD3Transformer2DModel

    config = dict(components("shapes-dit")["transformer"].config)
    config["num_layers"] = 2
    torch.manual_seed(3)
    transformer = SD3Transformer2DModel.from_config(config).eval()
    vae = VAEHandle(components("shapes-dit")["vae"].eval())
    module = ct.ConditionAdapterModule(transformer, rank=4)
    with torch.no_grad():
        for p in module.up.values():
            p.normal_(0, 0.5)
    adapter = ct.ConditionAdapter(module.eval().requires_grad_(False), source="test-adapter.safetensors")
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    return ModelHandle(transformer, "shapes-dit"), vae, adapter, image


def _cond(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 7, 384, generator=g), torch.randn(batch, 384, generator=g), family="shapes-dit")


def _apply(model, adapter, image, vae, **kw):
    return ApplyControlNet(model, adapter, image, vae, **kw).outputs[0]


def test_strength_window_and_effect(parts):
    model, vae, adapter, image = parts
    x, cond = torch.randn(1, 4, 16, 16), _cond()
    base = model.predict(x, 0.7, cond)
    assert torch.equal(_apply(model, adapter, image, vae, strength=0.0).predict(x, 0.7, cond), base)
    on = _apply(model, adapter, image, vae).predict(x, 0.7, cond)
    assert not torch.allclose(on, base, atol=1e-4)
    weaker = _apply(model, adapter, image, vae, strength=0.2).predict(x, 0.7, cond)
    assert (weaker - base).norm() < (on - base).norm()
    with pytest.raises(ValueError, match=">= 0"):
        _apply(model, adapter, image, vae, strength=-1.0)
    # a window that excludes every step of a run equals the base run
    latent = Latent(torch.zeros(1, 4, 16, 16))
    sigmas = compute_sigmas(model, "shifted", 3)
    pos, neg = _cond(seed=1), _cond(seed=2)
    plain = sample(model, latent, pos, neg, sigmas, 5, 3.0, progress=lambda *a: None)
    off = sample(_apply(model, adapter, image, vae, start=0.99, end=1.0), latent, pos, neg, sigmas, 5, 3.0,
                 progress=lambda *a: None)
    assert torch.equal(plain.samples, off.samples)


def test_condition_kv_computed_once_per_run_and_reused(parts, monkeypatch):
    model, vae, adapter, image = parts
    calls = []
    original = ct.ConditionAdapterModule.kv

    def counting(self, transformer, latents):
        calls.append(latents.shape)
        return original(self, transformer, latents)

    monkeypatch.setattr(ct.ConditionAdapterModule, "kv", counting)
    patched = _apply(model, adapter, image, vae)
    latent = Latent(torch.zeros(1, 4, 16, 16))
    sigmas = compute_sigmas(model, "shifted", 4)
    a = sample(patched, latent, _cond(seed=1), _cond(seed=2), sigmas, 7, 3.0, sampler_name="heun",
               progress=lambda *a: None)
    assert len(calls) == 1  # 4 heun steps x 2 evaluations x CFG batch: one condition pass
    b = sample(patched, latent, _cond(seed=1), _cond(seed=2), sigmas, 7, 3.0, sampler_name="heun",
               progress=lambda *a: None)
    assert len(calls) == 2 and torch.equal(a.samples, b.samples)  # fresh per run, same result


def test_condition_tokens_attend_only_to_themselves(parts):
    """The cached K/V are the same whatever the prompt, latents and step: condition tokens see
    only themselves (and use the timestep-0 embedding without text)."""
    model, vae, adapter, image = parts
    latents = vae.encode(image)
    kv = adapter.module.kv(model.transformer, latents)
    assert len(kv) == 2 and kv[0][0].shape[2] == (16 // 2) ** 2
    patched = _apply(model, adapter, image, vae)
    seen = []
    with patched.sampling_run() as run:
        procs = [b.attn.processor for b in model.transformer.transformer_blocks]
        assert all(isinstance(p, ct.ConditionAttnProcessor) for p in procs)
        for x_seed, sigma in ((0, 0.9), (1, 0.3)):
            x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(x_seed))
            patched.predict_many(x, sigma, [_cond(seed=4), _cond(seed=5)])
            seen.append(run.states[0]["kv"][(16, 16)])
    assert seen[0] is seen[1]
    for (k, v), (k2, v2) in zip(seen[0], kv, strict=True):
        assert torch.allclose(k, k2, atol=1e-5) and torch.allclose(v, v2, atol=1e-5)


def test_base_model_unchanged_and_errors(parts):
    model, vae, adapter, image = parts
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    procs = [b.attn.processor for b in model.transformer.transformer_blocks]
    x, cond = torch.randn(1, 4, 16, 16), _cond()
    base = model.predict(x, 0.5, cond)
    two = _apply(_apply(model, adapter, image, vae), adapter, image.flip(1), vae, strength=0.5)
    assert not torch.allclose(two.predict(x, 0.5, cond), base, atol=1e-4)
    assert [b.attn.processor for b in model.transformer.transformer_blocks] == procs
    assert all(torch.equal(v, before[k]) for k, v in model.transformer.state_dict().items())
    assert torch.equal(model.predict(x, 0.5, cond), base)
    flux = ModelHandle(components("flux")["transformer"], "flux")
    with pytest.raises(ValueError, match="joint-attention"):
        _apply(flux, adapter, image, vae)
    small = ModelHandle(components("shapes-dit")["transformer"], "shapes-dit")  # 1 block
    with pytest.raises(ValueError, match="does not fit"):
        _apply(small, adapter, image, vae)


def test_adapter_file_round_trip(parts, tmp_path):
    model, vae, adapter, image = parts
    path = tmp_path / "tokens.safetensors"
    ct.save_condition_adapter(adapter.module, path, {"note": "test"}, dtype=torch.float32)
    loaded = ct.load_condition_adapter(path, torch.float32, torch.device("cpu"))
    x, cond = torch.randn(1, 4, 16, 16), _cond()
    a = _apply(model, adapter, image, vae).predict(x, 0.6, cond)
    b = _apply(model, loaded, image, vae).predict(x, 0.6, cond)
    assert torch.equal(a, b) and loaded.info == {"note": "test"}
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a condition-token adapter"):
        ct.load_condition_adapter(tmp_path / "plain.safetensors", torch.float32, torch.device("cpu"))


def _image_lora_adapter(model, adapter):
    """A copy of ``adapter`` that also carries a (non-zero) image-stream LoRA of rank 2."""
    module = ct.ConditionAdapterModule(model.transformer, rank=4, image_rank=2)
    module.load_state_dict(adapter.module.state_dict(), strict=False)
    with torch.no_grad():
        for p in module.image_up.values():
            p.normal_(0, 0.5)
    return ct.ConditionAdapter(module.eval().requires_grad_(False), source="image-lora.safetensors")


def test_image_lora_changes_the_image_stream_only_while_active(parts):
    model, vae, adapter, image = parts
    with_image = _image_lora_adapter(model, adapter)
    assert with_image.module.has_image_lora and not adapter.module.has_image_lora
    x, cond = torch.randn(1, 4, 16, 16), _cond()
    tokens_only = _apply(model, adapter, image, vae).predict(x, 0.6, cond)
    both = _apply(model, with_image, image, vae).predict(x, 0.6, cond)
    assert not torch.allclose(both, tokens_only, atol=1e-4)
    # the condition tokens' own K/V do not see the image LoRA
    latents = vae.encode(image)
    for (k, v), (k2, v2) in zip(adapter.module.kv(model.transformer, latents),
                                with_image.module.kv(model.transformer, latents), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    # strength 0 is still exactly the base model; a lower strength fades the image LoRA too
    base = model.predict(x, 0.6, cond)
    assert torch.equal(_apply(model, with_image, image, vae, strength=0.0).predict(x, 0.6, cond), base)
    weak = _apply(model, with_image, image, vae, strength=1e-6).predict(x, 0.6, cond)
    assert torch.allclose(weak, base, atol=1e-4)
    with torch.no_grad():
        for p in with_image.module.image_up.values():
            p.zero_()
    assert torch.allclose(_apply(model, with_image, image, vae).predict(x, 0.6, cond), tokens_only, atol=1e-6)


def test_image_lora_file_round_trip_and_old_files(parts, tmp_path):
    from safetensors import safe_open

    model, vae, adapter, image = parts
    with_image = _image_lora_adapter(model, adapter)
    path = tmp_path / "image.safetensors"
    ct.save_condition_adapter(with_image.module, path, dtype=torch.float32)
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
    assert "image.transformer_blocks.1.attn.to_out.0.lora_B.weight" in keys
    loaded = ct.load_condition_adapter(path, torch.float32, torch.device("cpu"))
    assert loaded.module.has_image_lora and loaded.module.config["image_rank"] == 2
    x, cond = torch.randn(1, 4, 16, 16), _cond()
    assert torch.equal(_apply(model, loaded, image, vae).predict(x, 0.6, cond),
                       _apply(model, with_image, image, vae).predict(x, 0.6, cond))
    # a file written before the image LoRA existed: no image_* config keys, no image.* tensors
    old = tmp_path / "old.safetensors"
    ct.save_condition_adapter(adapter.module, old, dtype=torch.float32)
    with safe_open(str(old), "pt") as fh:
        assert not any(k.startswith(ct.IMAGE_PREFIX) for k in fh.keys())
        assert "image_rank" not in fh.metadata()["config"]
    assert not ct.load_condition_adapter(old, torch.float32, torch.device("cpu")).module.has_image_lora
    # a config that names an image LoRA whose tensors are missing says which
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(ct.IMAGE_PREFIX)}
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"broken.safetensors.*lacks .*image\.transformer_blocks"):
        ct.load_condition_adapter(tmp_path / "broken.safetensors", torch.float32, torch.device("cpu"))
