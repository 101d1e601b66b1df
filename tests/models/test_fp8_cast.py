"""fp8 storage cast inline (app/models/storage.py cast_inline) against diffusers'
``enable_layerwise_casting`` on tiny random Flux, SD3, Wan and LTX-Video transformers: the same
parameters stored in fp8 (biases and skipped layers included), bit-identical outputs, with
LoRA, block streaming and torch.compile."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from app.models.memory import module_bytes
from app.models.storage import CastLinear, apply_storage, cast_inline
from tests.models.test_residency import copy_stream  # noqa: F401  (a fixture)

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8], guidance_embeds=True)


def _flux_inputs(gen):
    return dict(hidden_states=torch.randn(1, 16, 4, generator=gen), encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
                pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)


def _sd3_inputs(gen):
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen), encoder_hidden_states=torch.randn(1, 7, 32, generator=gen),
                pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([500.0]))


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _wan_inputs(gen):
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=gen), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=gen))


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                                      attention_head_dim=8, cross_attention_dim=32, num_layers=2, caption_channels=32)


def _ltx_inputs(gen):
    return dict(hidden_states=torch.randn(1, 2 * 4 * 4, 8, generator=gen), encoder_hidden_states=torch.randn(1, 7, 32, generator=gen),
                timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 7), num_frames=2, height=4, width=4)


MODELS = {"flux": (_flux, _flux_inputs), "sd3": (_sd3, _sd3_inputs), "wan": (_wan, _wan_inputs), "ltx": (_ltx, _ltx_inputs)}


def _pair(family: str):
    """(inline-cast fp8 model, diffusers layerwise-cast copy of the same weights)."""
    make, _ = MODELS[family]
    torch.manual_seed(0)
    model = make().to(BF16).eval()
    reference = copy.deepcopy(model)
    reference.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=BF16)
    return apply_storage(model, "fp8_e4m3", BF16, torch.device("cpu")), reference


def _run(family: str, model: nn.Module) -> torch.Tensor:
    inputs = MODELS[family][1](torch.Generator().manual_seed(1))
    inputs = {k: v.to(BF16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family", list(MODELS))
def test_inline_cast_stores_what_layerwise_casting_stores_and_computes_the_same(family):
    model, reference = _pair(family)
    stored = {name: p.dtype for name, p in model.state_dict().items()}
    assert stored == {name: p.dtype for name, p in reference.state_dict().items()}  # same keys, same fp8 set
    assert any(name.endswith(".bias") and dtype == FP8 for name, dtype in stored.items())  # biases too
    assert any(dtype == BF16 for name, dtype in stored.items())  # the skipped (norm, embedder) layers
    assert module_bytes(model) == module_bytes(reference)  # what the VRAM planner measures
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())  # no layer left on the hook
    assert torch.equal(_run(family, model), _run(family, reference))
    assert all(p.dtype == stored[name] for name, p in model.state_dict().items())  # still fp8 after a call


def test_full_size_flux_dev_measures_as_with_layerwise_casting():
    """Flux-dev on meta weights: 14.1 GiB stored (its AdaLN and norm layers stay bf16), per block as before."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True).to(BF16)
    reference = copy.deepcopy(model)
    reference.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=BF16)
    apply_storage(model, "fp8_e4m3", BF16, torch.device("cpu"))
    assert module_bytes(model) == module_bytes(reference)
    assert round(module_bytes(model) / 2**30, 1) == 14.1
    blocks = lambda m: [module_bytes(b) for b in [*m.transformer_blocks, *m.single_transformer_blocks]]  # noqa: E731
    assert blocks(model) == blocks(reference)


class _Layers(nn.Module):
    """Every layer type diffusers casts, the ones cast inline and the ones left on its hook."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), padding_mode="reflect")
        self.conv3 = nn.Conv3d(8, 8, 1, bias=False)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)  # no Cast class: diffusers' hook
        self.linear = nn.Linear(8, 8)
        self.norm = nn.Sequential(nn.Linear(8, 8))  # skipped, with its subtree ("norm")

    def forward(self, ids):
        x = self.conv1(self.embed(ids).T[None])  # (1, 8, 4)
        x = self.conv3(self.conv2(x[..., None])[..., None])[..., 0]  # (1, 8, 4, 1)
        return self.norm(self.linear(self.up(x).flatten(2).transpose(1, 2)))


def test_every_layer_type_matches_diffusers_hook():
    from diffusers.hooks import apply_layerwise_casting

    torch.manual_seed(0)
    model = _Layers().to(BF16)
    reference = copy.deepcopy(model)
    apply_layerwise_casting(reference, FP8, BF16, skip_modules_pattern="auto")
    assert cast_inline(model, FP8, BF16) == 6
    assert [type(m).__name__ for m in (model.embed, model.conv1, model.conv2, model.conv3, model.linear)] == \
        ["CastEmbedding", "CastConv1d", "CastConv2d", "CastConv3d", "CastLinear"]
    assert hasattr(model.up, "_diffusers_hook") and type(model.norm[0]) is nn.Linear
    assert {n: p.dtype for n, p in model.state_dict().items()} == {n: p.dtype for n, p in reference.state_dict().items()}
    ids = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


@pytest.mark.parametrize("fuse", [False, True])
def test_lora_on_fp8_storage_matches_layerwise_casting(fuse):
    from app.models.patches.lora import LoraLayer, LoraPatch

    model, reference = _pair("flux")
    gen = torch.Generator().manual_seed(2)
    layers = [LoraLayer(name, torch.randn(2, m.in_features, generator=gen), torch.randn(m.out_features, 2, generator=gen),
                        0.5, torch.randn(m.out_features, generator=gen))
              for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(("to_q", "proj_mlp"))]
    patch = LoraPatch("test", layers, strength=0.8, fuse=fuse)
    outputs = []
    for transformer in (model, reference):
        run = SimpleNamespace(transformer=transformer, handle=SimpleNamespace(device=torch.device("cpu"), dtype=BF16),
                              extras={})
        state = patch.begin_run(run)
        outputs.append(_run("flux", transformer))
        patch.end_run(run, state)
    assert torch.equal(*outputs)
    assert not torch.equal(outputs[0], _run("flux", model))  # the LoRA changed the output; end_run undid it
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == FP8


def test_peft_lora_on_fp8_storage_matches_layerwise_casting():
    """A peft adapter (training/train_lora.py) added before fp8 storage: its layers stay bf16 and
    the wrapped base layer casts, as with diffusers' hook. Added after, it is kept in the compute
    dtype too (peft reads a base layer's ``compute_dtype``); with the hook it became fp8 and the
    forward failed ("mul_cpu_reduced_float" not implemented for fp8)."""
    peft = pytest.importorskip("peft")

    def with_lora(model):
        torch.manual_seed(5)
        model.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "proj_mlp"], init_lora_weights=False))
        return model

    def fp8(model):
        return apply_storage(model, "fp8_e4m3", BF16, torch.device("cpu"))

    torch.manual_seed(0)
    plain = _flux().to(BF16).eval()
    reference = with_lora(copy.deepcopy(plain))
    reference.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=BF16)
    before, after = fp8(with_lora(copy.deepcopy(plain))), with_lora(fp8(copy.deepcopy(plain)))
    for model in (before, after):
        q = model.transformer_blocks[0].attn.to_q
        assert isinstance(q.base_layer, CastLinear) and q.base_layer.weight.dtype == FP8
        assert q.lora_A["default"].weight.dtype == BF16
    output = _run("flux", before)
    assert torch.equal(output, _run("flux", reference)) and torch.equal(output, _run("flux", after))
    assert not torch.equal(output, _run("flux", fp8(copy.deepcopy(plain))))  # the adapter is in the output


def test_streamed_fp8_blocks_compute_as_resident(copy_stream):  # noqa: F811
    from app.models.residency import apply_block_offload

    model, _ = _pair("flux")
    resident = _run("flux", model)
    streamed = apply_block_offload(copy.deepcopy(model), torch.device("cpu"), keep=1)
    assert torch.equal(_run("flux", streamed), resident)  # the first call traces the prefetch order
    assert torch.equal(_run("flux", streamed), resident)
    assert streamed.single_transformer_blocks[1].proj_out.weight.dtype == FP8  # streamed in fp8


def test_cast_compiles_without_graph_breaks():
    """The cast is part of the layer's forward: a block of a compiled view (CompileModel's
    weight-sharing copy) compiles whole; diffusers' hook broke it into 8 graphs (``Module.to``
    makes Parameters)."""
    from app.models.compile import shared_copy

    model, _ = _pair("flux")
    view = shared_copy(model)
    block = view.single_transformer_blocks[0]
    assert isinstance(block.proj_out, CastLinear) and block.proj_out.weight is model.single_transformer_blocks[0].proj_out.weight
    gen = torch.Generator().manual_seed(3)
    args = (torch.randn(1, 16, 32, generator=gen).to(BF16), torch.randn(1, 8, 32, generator=gen).to(BF16),
            torch.randn(1, 32, generator=gen).to(BF16))
    # a forward of the test's own: a dynamo cache that starts empty, without resetting the
    # process's (torch._dynamo.reset would make other tests' compiled views recompile silently)
    class Block(type(block)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    block.__class__ = Block
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(compiled(*args), block(*args), strict=True))
