"""HunyuanDiT patches: LoRAs in peft naming and in Tencent's original layer names (the fused
attn1.Wqkv / attn2.kv_proj of HYDiT-LoRA) apply exactly; the eight cache accelerators (on its
``blocks``, as on Wan's), compile and int8 work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from app.models.handles import ModelHandle
from app.models.patches.lora import lora_patch, read_lora
from nodes.text import Conditioning
from tests.fixtures.cache_models import METHODS, skipped
from tests.fixtures.hunyuan_models import BERT_HIDDEN, T5_HIDDEN, tiny_hunyuan_transformer
from tests.fixtures.lora import assert_patch_matches

RANK = 2


def _cond() -> Conditioning:
    g = torch.Generator().manual_seed(1)
    width = max(BERT_HIDDEN, T5_HIDDEN)
    embeds = torch.randn(1, 77 + 256, width, generator=g)
    embeds[:, :77, BERT_HIDDEN:] = 0  # BERT's tokens zero-padded to the T5 width, as encoded
    mask = torch.ones(1, 77 + 256, dtype=torch.long)
    mask[:, 20:77] = mask[:, 100:] = 0
    return Conditioning(embeds, None, mask, family="hunyuan-dit")


def _check(handle: ModelHandle, patch, adapted: torch.nn.Module) -> None:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert_patch_matches(handle, patch, adapted, x, _cond())


def test_peft_lora_equals_peft(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    transformer = tiny_hunyuan_transformer()
    adapted = copy.deepcopy(transformer)
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=4, target_modules=["to_q", "to_v", "proj"],
                                       init_lora_weights=False), adapted)
    state = get_peft_model_state_dict(adapted)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "l.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 4})})
    handle = ModelHandle(transformer, "hunyuan-dit")
    patch = lora_patch(read_lora(tmp_path / "l.safetensors"), handle)
    assert patch.report.matched == patch.report.total == len(state) // 2 > 0
    _check(handle, patch, adapted)


def test_tencent_original_names_merge_as_its_readme_does(tmp_path):
    """HYDiT-LoRA: B @ A of the fused projections, chunked into q/k/v (k/v) and added to the weights."""
    transformer = tiny_hunyuan_transformer()
    g = torch.Generator().manual_seed(5)
    tensors, merged = {}, copy.deepcopy(transformer)
    for i, block in enumerate(merged.blocks):
        fused = {"attn1.Wqkv": [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v],
                 "attn2.kv_proj": [block.attn2.to_k, block.attn2.to_v], "attn2.q_proj": [block.attn2.to_q],
                 "attn1.out_proj": [block.attn1.to_out[0]], "mlp.fc1": [block.ff.net[0].proj]}
        for name, linears in fused.items():
            down = torch.randn(RANK, linears[0].in_features, generator=g) * 0.1
            up = torch.randn(sum(lin.out_features for lin in linears), RANK, generator=g) * 0.1
            tensors[f"blocks.{i}.{name}.lora_A.weight"], tensors[f"blocks.{i}.{name}.lora_B.weight"] = down, up
            with torch.no_grad():
                for linear, delta in zip(linears, torch.chunk(up @ down, len(linears)), strict=True):
                    linear.weight += delta
    save_file(tensors, str(tmp_path / "hydit_lora.safetensors"))
    handle = ModelHandle(transformer, "hunyuan-dit")
    patch = lora_patch(read_lora(tmp_path / "hydit_lora.safetensors"), handle)
    assert patch.report.matched == patch.report.total == len(tensors) // 2
    _check(handle, patch, merged)


def _hunyuan_run() -> tuple:
    from app.models.latents import Latent
    from app.models.sampling import compute_sigmas

    handle = ModelHandle(tiny_hunyuan_transformer(layers=6), "hunyuan-dit", scheduler_config={
        "beta_start": 0.00085, "beta_end": 0.018, "beta_schedule": "scaled_linear"})
    return handle, Latent(torch.zeros(1, 4, 8, 8)), _cond(), compute_sigmas(handle, "auto", 6)


def _wan_run() -> tuple:
    """Wan's blocks are a plain ``blocks`` list too: the same runtime hooks them."""
    from app.models.latents import Latent
    from app.models.sampling import compute_sigmas
    from tests.fixtures.tiny_video import _wan_transformer

    handle = ModelHandle(_wan_transformer(0).eval(), "wan", scheduler_config={"shift": 3.0})
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, 7, handle.config.text_dim, generator=g), family="wan")
    return handle, Latent(torch.zeros(1, 16, 1, 8, 8)), cond, compute_sigmas(handle, "auto", 6)


def _sample(model, latent, cond, sigmas) -> torch.Tensor:
    from app.models.sampling import sample

    return sample(model, latent, cond, cond, sigmas, 3, 5.0, sampler_name="euler", progress=lambda *a: None).samples


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("setup", [_hunyuan_run, _wan_run], ids=["hunyuan-dit", "wan"])
def test_cache_methods_exact_at_never_skip_and_skipping_when_aggressive(setup, method, request):
    from app.models import accelerators as hooks

    found = request.getfixturevalue("summaries")
    handle, latent, cond, sigmas = setup()
    reference = _sample(handle, latent, cond, sigmas)
    never, aggressive = METHODS[method]
    assert torch.equal(_sample(handle.with_patch(hooks.CachePatch(never)), latent, cond, sigmas), reference)
    assert skipped(found[-1]) == 0
    model = handle.with_patch(hooks.CachePatch(aggressive))
    first, second = (_sample(model, latent, cond, sigmas) for _ in range(2))
    assert skipped(found[-2]) > 0, f"{method} skipped nothing"
    assert torch.isfinite(first).all() and torch.equal(first, second) and not torch.equal(first, reference)


def test_compile_and_int8_quantize_work():
    from app.models import quantizers
    from app.models.compile import compile_model
    from tests.fixtures.speed import EAGER, needs_torchao, rel

    handle, latent, cond, sigmas = _hunyuan_run()
    reference = _sample(handle, latent, cond, sigmas)
    assert torch.allclose(_sample(compile_model(handle, EAGER), latent, cond, sigmas), reference, atol=1e-5)
    if needs_torchao.args[0]:  # torchao missing: quantization is covered where it is installed
        return
    # the node's default skip list (blocks only): SKIP_NONE would also take the text pooler, whose
    # weights F.multi_head_attention_forward reads directly (torchao's int8 tensor cannot transpose)
    quantized = quantizers.quantize_model(handle, "int8-weight-only", quantizers.SKIP_IO)
    assert 0 < rel(_sample(quantized, latent, cond, sigmas), reference) < 0.1
    assert torch.equal(_sample(handle, latent, cond, sigmas), reference)  # the base is untouched
