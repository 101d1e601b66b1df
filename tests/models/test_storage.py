"""Weight storage formats and pre-quantized single files (fp8, scaled fp8, GGUF) on tiny Flux models
written by the test: key maps, dtypes, shapes, outputs; damaged files refused with clear errors."""

from __future__ import annotations

import struct

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from app.models import storage
from nodes import loaders

CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference model, its config folder, a folder to write files in)."""
    folder = tmp_path_factory.mktemp("storage")
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    model.save_config(folder / "cfg")
    return model, folder / "cfg", folder


def _run(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 16, 4, generator=gen),
              encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
              pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        return model(**kw).sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _linears(model):
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _scaled_fp8(model, prefix="model.diffusion_model."):
    """A ComfyUI-style scaled-fp8 file: fp8 Linear weights, a per-tensor scale_weight, the marker."""
    linears, state = _linears(model), {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for key, value in model.state_dict().items():
        if key in linears:
            scale = value.abs().max() / 448
            state[prefix + key] = (value / scale).to(FP8)
            state[prefix + key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            state[prefix + key] = value.contiguous()
    return state


def test_fp8_file_keeps_fp8_weights_and_matches_upcast_reference(tiny):
    model, cfg, folder = tiny
    linears = _linears(model)
    state = {k: (v.to(FP8) if k in linears else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "fp8.safetensors"))
    handle, _, _ = loaders.load_single_file(folder / "fp8.safetensors", cfg, torch.float32, torch.device("cpu"))
    q = handle.transformer.transformer_blocks[0].attn.to_q
    assert q.parametrizations.weight.original.dtype == FP8  # stored in fp8 ...
    assert q.weight.dtype == torch.float32 and q.weight.shape == model.transformer_blocks[0].attn.to_q.weight.shape
    reference = FluxTransformer2DModel(**CONFIG).eval()
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    assert _rel(_run(handle.transformer), _run(reference)) < 1e-6  # ... computed exactly as the upcast weights
    assert 0 < _rel(_run(handle.transformer), _run(model)) < 0.2


def test_scaled_fp8_applies_each_scale(tiny):
    model, cfg, folder = tiny
    save_file(_scaled_fp8(model), str(folder / "scaled.safetensors"))
    handle, _, _ = loaders.load_single_file(folder / "scaled.safetensors", cfg, torch.float32, torch.device("cpu"))
    assert handle.transformer.proj_out.parametrizations.weight.original.dtype == FP8
    assert _rel(_run(handle.transformer), _run(model)) < 0.1  # unscaled weights would be ~100x off
    converted, _, _ = loaders.load_single_file(folder / "scaled.safetensors", cfg, torch.float32, torch.device("cpu"),
                                               storage="fp8_e5m2")  # dequantized, then stored as asked
    assert converted.transformer.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.float8_e5m2
    assert converted.transformer.proj_out.weight.dtype == torch.float32  # diffusers keeps the output layer
    assert _rel(_run(converted.transformer), _run(model)) < 0.2


@pytest.mark.parametrize("damage,message", [
    (lambda s: s.update({next(k for k in s if k.endswith("to_q.weight")): torch.zeros(32, 32)}), "not fp8"),
    (lambda s: s.update({"model.diffusion_model.ghost.scale_weight": torch.ones(1)}), "not in the file"),
    (lambda s: s.update({next(k for k in s if k.endswith("scale_weight")): torch.ones(2)}), "one float"),
    (lambda s: [s.pop(k) for k in [k for k in s if k.endswith("scale_weight")]], "holds no .scale_weight"),
])
def test_bad_scaled_fp8_files_are_refused(tiny, damage, message):
    model, cfg, folder = tiny
    state = _scaled_fp8(model)
    damage(state)
    save_file(state, str(folder / "bad.safetensors"))
    with pytest.raises(loaders.LoadFailed, match=message):
        loaders.load_single_file(folder / "bad.safetensors", cfg, torch.float32, torch.device("cpu"))


def test_safetensors_header_claiming_the_wrong_dtype_is_refused(tiny):
    model, cfg, folder = tiny
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "ok.safetensors"))
    data = (folder / "ok.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + size].replace(b'"F32"', b'"F16"', 1)  # claims half the bytes it holds
    (folder / "claims.safetensors").write_bytes(data[:8] + header + data[8 + size:])
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    for name in ("claims.safetensors", "cut.safetensors"):
        with pytest.raises(loaders.LoadFailed, match=f"{name}: not a valid safetensors file"):
            loaders.load_single_file(folder / name, cfg, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["fp8_e4m3", "int8"])
def test_storage_option_stores_the_weights_smaller(tiny, kind):
    model, cfg, folder = tiny
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "plain.safetensors"))
    handle, _, _ = loaders.load_single_file(folder / "plain.safetensors", cfg, torch.float32, torch.device("cpu"),
                                            storage=kind)
    weight = handle.transformer.transformer_blocks[0].ff.net[0].proj.weight
    assert weight.dtype == torch.float8_e4m3fn if kind == "fp8_e4m3" else "Int8" in type(weight).__name__ or \
        getattr(weight, "qdata", weight).dtype == torch.int8
    assert storage.bytes_per_param(kind, torch.bfloat16) == 1.0
    assert _rel(_run(handle.transformer), _run(model)) < 0.2


def test_nf4_without_bitsandbytes_says_what_to_install(tiny):
    model, _, _ = tiny
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    with pytest.raises(storage.WeightFileError, match="pip install bitsandbytes"):
        storage.apply_storage(model, "nf4", torch.float32, torch.device("cpu"))


def _gguf(model, path, claim_f32_for=None):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            claim = gguf.GGMLQuantizationType.F32 if key == claim_f32_for else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, packed, raw_shape=packed.shape if claim != gguf.GGMLQuantizationType.F32
                              else array.shape, raw_dtype=claim)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf


def test_gguf_file_loads_quantized(tiny):
    model, cfg, folder = tiny
    gguf = _gguf(model, folder / "q8.gguf")
    handle, _, _ = loaders.load_single_file(folder / "q8.gguf", cfg, torch.float32, torch.device("cpu"))
    weight = handle.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.quant_type == gguf.GGMLQuantizationType.Q8_0
    assert weight.dtype == torch.uint8 and weight.shape == (32, 34)  # 32 values -> 34 bytes per Q8_0 block
    assert handle.transformer.proj_out.bias.dtype == torch.float32
    assert _rel(_run(handle.transformer), _run(model)) < 0.02
    with pytest.raises(loaders.LoadFailed, match="already quantized"):
        loaders.load_single_file(folder / "q8.gguf", cfg, torch.float32, torch.device("cpu"), storage="int8")


def test_truncated_or_lying_gguf_is_refused(tiny):
    model, cfg, folder = tiny
    _gguf(model, folder / "whole.gguf")
    data = (folder / "whole.gguf").read_bytes()
    (folder / "cut.gguf").write_bytes(data[: len(data) - 4096])
    with pytest.raises(loaders.LoadFailed, match="cut.gguf: .*(truncated|not a readable)"):
        loaders.load_single_file(folder / "cut.gguf", cfg, torch.float32, torch.device("cpu"))
    (folder / "head.gguf").write_bytes(data[:100])
    with pytest.raises(loaders.LoadFailed, match="head.gguf: not a readable GGUF file"):
        loaders.load_single_file(folder / "head.gguf", cfg, torch.float32, torch.device("cpu"))


def test_gguf_tensor_with_a_wrong_type_claim_is_refused(tiny):
    model, cfg, folder = tiny  # Q8_0 bytes labelled F32: gguf reads them as a smaller float matrix
    _gguf(model, folder / "lies.gguf", claim_f32_for="transformer_blocks.0.attn.to_q.weight")
    with pytest.raises(loaders.LoadFailed, match=r"lies.gguf: .*to_q.weight (claims|expected shape)"):
        loaders.load_single_file(folder / "lies.gguf", cfg, torch.float32, torch.device("cpu"))


def test_gguf_header_claiming_more_bytes_than_the_tensor_holds_is_refused(tiny):
    model, cfg, folder = tiny
    gguf = _gguf(model, folder / "ok.gguf")
    data = bytearray((folder / "ok.gguf").read_bytes())
    name = b"transformer_blocks.0.attn.to_q.weight"
    at = data.index(name) + len(name)  # tensor info: name, n_dims u32, dims u64 each, type u32, offset u64
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == gguf.GGMLQuantizationType.Q8_0
    struct.pack_into("<I", data, type_at, gguf.GGMLQuantizationType.F32)  # 4096 bytes claimed, 1088 there
    (folder / "claims.gguf").write_bytes(bytes(data))
    with pytest.raises(loaders.LoadFailed, match=r"claims.gguf: .*to_q.weight claims 4096 bytes"):
        loaders.load_single_file(folder / "claims.gguf", cfg, torch.float32, torch.device("cpu"))
