"""LoRA loading and patching: formats, strength, stacking, fuse, errors, and a clean base model."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from app.core import paths
from app.core.executor import Engine
from app.models.handles import ModelHandle
from app.models.patches.lora import LoraMismatch, lora_patch, read_lora
from nodes.text import Conditioning
from tests.fixtures.lora import (
    _Capture,  # noqa: F401
    assert_patch_matches,  # noqa: F401
)
from tests.fixtures.tiny_models import components, save_family

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "ff.net.0.proj", "ff.net.2", "proj_out"]


def _peft_lora(transformer: torch.nn.Module, seed: int, rank: int = 4, alpha: float = 8.0):
    """A random peft LoRA for ``transformer`` (on a copy): (state dict, LoraConfig, adapted copy)."""
    from peft import LoraConfig, get_peft_model_state_dict

    adapted = copy.deepcopy(transformer)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(seed)
    adapted.add_adapter(config, adapter_name=f"l{seed}")
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return get_peft_model_state_dict(adapted, adapter_name=f"l{seed}"), config, adapted


def _save_diffusers(folder, state, config):
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def base():
    return components("shapes-dit")["transformer"].eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(2, 7, 384, generator=g), torch.randn(2, 384, generator=g), family="shapes-dit")
    return torch.randn(2, 4, 8, 8, generator=g), cond


def _call(transformer, x, sigma, cond):
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.full((x.shape[0],), sigma * 1000),
                           encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, return_dict=False)[0]


def _merged(transformer, loras):
    """An independent reference: W += factor * B @ A for every (peft state dict, factor)."""
    merged = copy.deepcopy(transformer)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for state, factor in loras:
            for key, down in state.items():
                if ".lora_A." in key:
                    name = key.split(".lora_A.")[0]
                    modules[name].weight += factor * state[key.replace(".lora_A.", ".lora_B.")] @ down
    return merged


def _snapshot(module):
    return {k: (v.data_ptr(), v.detach().clone()) for k, v in module.state_dict().items()}


def _assert_unchanged(module, snapshot):
    now = module.state_dict()
    assert set(now) == set(snapshot)  # no injected adapter layers
    for key, (ptr, value) in snapshot.items():
        assert now[key].data_ptr() == ptr and torch.equal(now[key], value), key
    for m in module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("fuse", [False, True])
def test_peft_lora_round_trip_equals_peft(base, tmp_path, fuse):
    state, config, adapted = _peft_lora(base, seed=1)
    file = _save_diffusers(tmp_path, state, config)
    handle = ModelHandle(base, "shapes-dit")
    snapshot = _snapshot(base)
    x, cond = _inputs()
    patch = lora_patch(read_lora(file), handle, 1.0, fuse=fuse)
    assert patch.report.matched == patch.report.total == len(state) // 2
    ours = handle.with_patch(patch).predict(x, 0.6, cond)
    reference = _call(adapted, x, 0.6, cond)  # peft's own forward, scale alpha/r = 2
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, handle.predict(x, 0.6, cond), atol=1e-2)
    _assert_unchanged(base, snapshot)
    assert torch.equal(handle.predict(x, 0.6, cond), _call(base, x, 0.6, cond))


def test_strength_zero_is_base_and_negative_strength_mirrors(base, tmp_path):
    state, config, _ = _peft_lora(base, seed=2)
    lora = read_lora(_save_diffusers(tmp_path, state, config))
    handle = ModelHandle(base, "shapes-dit")
    x, cond = _inputs(1)
    plain = handle.predict(x, 0.5, cond)
    assert torch.equal(handle.with_patch(lora_patch(lora, handle, 0.0)).predict(x, 0.5, cond), plain)
    # the LoRA's first-order effect flips sign with the strength
    small = 1e-3
    up = handle.with_patch(lora_patch(lora, handle, small)).predict(x, 0.5, cond) - plain
    down = handle.with_patch(lora_patch(lora, handle, -small)).predict(x, 0.5, cond) - plain
    assert torch.allclose(up, -down, atol=2e-4 * small / 1e-3 + 1e-5, rtol=0.05)


def test_two_loras_stack_with_independent_strengths(base, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sa, ca, _ = _peft_lora(base, seed=3)
    sb, cb, _ = _peft_lora(base, seed=4, rank=2, alpha=2.0)
    fa, fb = _save_diffusers(tmp_path / "a", sa, ca), _save_diffusers(tmp_path / "b", sb, cb)
    handle = ModelHandle(base, "shapes-dit")
    x, cond = _inputs(2)
    stacked = handle.with_patch(lora_patch(read_lora(fa), handle, 0.7)).with_patch(
        lora_patch(read_lora(fb), handle, -1.3, fuse=True))
    ours = stacked.predict(x, 0.4, cond)
    reference = _merged(base, [(sa, 0.7 * 8.0 / 4), (sb, -1.3 * 2.0 / 2)])
    assert torch.allclose(ours, _call(reference, x, 0.4, cond), atol=1e-4, rtol=1e-4)


def test_kohya_and_sd3_original_names(base, tmp_path):
    """kohya underscores with alpha, and SD3 reference names with a fused qkv, map onto diffusers modules."""
    handle = ModelHandle(base, "shapes-dit")
    x, cond = _inputs(3)
    g = torch.Generator().manual_seed(5)
    dim = base.config.num_attention_heads * base.config.attention_head_dim
    down, up = torch.randn(4, dim, generator=g) * 0.3, torch.randn(3 * dim, 4, generator=g) * 0.3
    fc_down, fc_up = torch.randn(4, dim, generator=g) * 0.3, torch.randn(4 * dim, 4, generator=g) * 0.3
    kohya = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
        "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(2.0),
        "lora_unet_transformer_blocks_0_ff_net_0_proj.lora_down.weight": fc_down,
        "lora_unet_transformer_blocks_0_ff_net_0_proj.lora_up.weight": fc_up,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
    }
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    patch = lora_patch(read_lora(tmp_path / "kohya.safetensors"), handle, 1.0)
    assert (patch.report.matched, patch.report.total, patch.report.text_encoder) == (2, 2, 1)
    assert "text-encoder layers ignored" in patch.report.summary()
    reference = copy.deepcopy(base)
    block = reference.transformer_blocks[0]
    with torch.no_grad():
        for i, linear in enumerate((block.attn.to_q, block.attn.to_k, block.attn.to_v)):
            linear.weight += 0.5 * up[i * dim:(i + 1) * dim] @ down  # alpha/rank = 2/4
        block.ff.net[0].proj.weight += fc_up @ fc_down  # no alpha: scale 1
    assert torch.allclose(handle.with_patch(patch).predict(x, 0.7, cond), _call(reference, x, 0.7, cond), atol=1e-4)


def test_flux_kohya_goes_through_diffusers_converter(tmp_path):
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    flux = components("flux")["transformer"].eval()
    handle = ModelHandle(flux, "flux")
    g = torch.Generator().manual_seed(6)
    dim = flux.config.num_attention_heads * flux.config.attention_head_dim
    kohya = {}
    for name, (din, dout) in {"lora_unet_double_blocks_0_img_attn_proj": (dim, dim),
                              "lora_unet_single_blocks_0_linear2": (dim * 5, dim)}.items():
        kohya[f"{name}.lora_down.weight"] = torch.randn(4, din, generator=g) * 0.2
        kohya[f"{name}.lora_up.weight"] = torch.randn(dout, 4, generator=g) * 0.2
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(kohya, str(tmp_path / "flux-kohya.safetensors"))
    patch = lora_patch(read_lora(tmp_path / "flux-kohya.safetensors"), handle, 1.0)
    assert patch.report.matched == patch.report.total == 2
    reference = copy.deepcopy(flux)
    converted = FluxLoraLoaderMixin.lora_state_dict(dict(kohya))
    reference.load_lora_adapter(converted, prefix="transformer", adapter_name="k")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g), family="flux")
    capture = _Capture()
    handle.with_patch(capture).predict(x, 0.5, cond)
    base_native = capture.out
    handle.with_patch(patch).with_patch(capture).predict(x, 0.5, cond)
    with torch.no_grad():
        ref_native = reference(**capture.kwargs, return_dict=False)[0]
    assert not torch.allclose(ref_native, base_native, atol=1e-3)
    assert torch.allclose(capture.out, ref_native, atol=1e-4, rtol=1e-4)


def test_mismatched_lora_is_an_error_and_partial_match_is_counted(base, tmp_path):
    handle = ModelHandle(base, "shapes-dit")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(48, 4)},
              str(tmp_path / "flux-only.safetensors"))
    with pytest.raises(LoraMismatch, match="matches none of the layers"):
        lora_patch(read_lora(tmp_path / "flux-only.safetensors"), handle)
    state, config, _ = _peft_lora(base, seed=8)
    wrong = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in state.items()}
    save_file({f"transformer.{k}": v for k, v in wrong.items()}, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(LoraMismatch, match="right shape"):
        lora_patch(read_lora(tmp_path / "shapes.safetensors"), handle)
    partial = dict(state)
    partial["transformer_blocks.0.attn.to_nowhere.lora_A.weight"] = torch.zeros(4, 16)
    partial["transformer_blocks.0.attn.to_nowhere.lora_B.weight"] = torch.zeros(16, 4)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    patch = lora_patch(read_lora(tmp_path / "partial.safetensors"), handle)
    n = len(state) // 2
    assert (patch.report.matched, patch.report.total) == (n, n + 1)
    assert f"{n}/{n + 1} LoRA layers matched" in patch.report.summary() and "to_nowhere" in patch.report.summary()


def test_peft_adapter_folder_with_config(base, tmp_path):
    state, config, adapted = _peft_lora(base, seed=9, rank=4, alpha=2.0)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2.0, "peft_type": "LORA"}))
    handle = ModelHandle(base, "shapes-dit")
    x, cond = _inputs(4)
    ours = handle.with_patch(lora_patch(read_lora(folder), handle)).predict(x, 0.3, cond)
    assert torch.allclose(ours, _call(adapted, x, 0.3, cond), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# through the engine


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, base):
    root = tmp_path_factory.mktemp("models")
    save_family("shapes-dit", root / "checkpoints" / "tiny-shapes")
    (root / "loras").mkdir()
    for seed, name in ((11, "one"), (12, "two")):
        transformer = components("shapes-dit")["transformer"]
        state, config, _ = _peft_lora(transformer, seed=seed)
        _save_diffusers(root / "loras", state, config)
        (root / "loras" / "pytorch_lora_weights.safetensors").rename(root / "loras" / f"{name}.safetensors")
    return root


def _workflow(loras: list[tuple[str, float, bool]]) -> dict:
    from tests.fixtures.shapes import txt2img

    wf = txt2img(steps=2)
    source = ["ckpt", "model"]
    for i, (name, strength, fuse) in enumerate(loras):
        wf["nodes"][f"lora{i}"] = {"type": "LoraLoader", "inputs": {"model": {"from": source}, "lora": f"{name}.safetensors",
                                                                   "strength": strength, "fuse": fuse}}
        source = [f"lora{i}", "model"]
    wf["nodes"]["sample"]["inputs"]["model"] = {"from": source}
    return wf


def test_engine_lora_nodes_leave_the_memoized_model_clean(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    plain = engine.run(_workflow([]), targets=["sample", "ckpt"]).raise_for_status()
    model = plain.output("ckpt", 0)
    snapshot = _snapshot(model.transformer)
    first = plain.output("sample").samples
    one = engine.run(_workflow([("one", 1.0, False)]), targets=["sample"]).raise_for_status()
    assert "ckpt" in one.cached and "matched" in one.ui["lora0"]["text"][0]
    assert not torch.allclose(one.output("sample").samples, first)
    fused = engine.run(_workflow([("one", 1.0, True)]), targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.allclose(fused, one.output("sample").samples, atol=1e-4)
    zero = engine.run(_workflow([("one", 0.0, False)]), targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.equal(zero, first)
    both = engine.run(_workflow([("one", 1.0, False), ("two", 0.5, True)]), targets=["sample"]).raise_for_status()
    assert not torch.allclose(both.output("sample").samples, one.output("sample").samples)
    _assert_unchanged(model.transformer, snapshot)
    again = engine.run(_workflow([]), targets=["sample"]).raise_for_status()
    engine.cache.clear()
    rerun = engine.run(_workflow([]), targets=["sample"]).raise_for_status().output("sample").samples
    assert torch.equal(again.output("sample").samples, first) and torch.equal(rerun, first)


def test_two_runs_at_once_on_one_engine_with_different_loras_each_get_their_own_result(models_root, tmp_path,
                                                                                        monkeypatch):
    """LoRA patches act on the shared transformer while a run samples, so one engine runs one
    workflow at a time (docs/engine.md, "Concurrency"): a second run started while the first is
    mid-sampling waits, and each gets exactly what it gets alone (one unfused, one fused)."""
    monkeypatch.setitem(paths._overrides, "models", models_root)
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    graphs = {"one": _workflow([("one", 1.0, False)]), "two": _workflow([("two", 1.0, True)])}
    alone = {name: engine.run(graph, targets=["sample"]).raise_for_status().output("sample").samples
             for name, graph in graphs.items()}
    for graph in graphs.values():  # both sample again, on the one cached model
        engine.forget(graph, ["sample"])
    one_mid_sampling, two_started = threading.Event(), threading.Event()
    timeline, results = [], {}

    def on_event(name):
        def record(event):
            timeline.append((name, event["type"]))
            if name == "two" and event["type"] == "run_started":
                two_started.set()
            if name == "one" and event["type"] == "progress" and event["step"] == 1:
                one_mid_sampling.set()
                two_started.wait(1.5)  # give "two" every chance to start in the middle of "one"
        return record

    def run(name):
        results[name] = engine.run(graphs[name], targets=["sample"], on_event=on_event(name))

    first = threading.Thread(target=run, args=("one",))
    first.start()
    assert one_mid_sampling.wait(60)
    second = threading.Thread(target=run, args=("two",))
    second.start()
    first.join(120)
    second.join(120)
    for name in graphs:
        assert torch.equal(results[name].raise_for_status().output("sample").samples, alone[name]), name
    assert not torch.allclose(alone["one"], alone["two"])
    # the second run started only once the first had finished
    assert timeline.index(("two", "run_started")) > timeline.index(("one", "run_finished"))


def test_engine_reports_a_mismatched_lora(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(48, 4)},
              str(models_root / "loras" / "wrong.safetensors"))
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    result = engine.run(_workflow([("wrong", 1.0, False)]), targets=["sample"])
    assert result.status == "failed" and result.error["node"] == "lora0"
    assert "matches none of the layers" in result.error["message"]


@pytest.mark.parametrize("family", ["pixart", "sana", "lumina2"])
def test_peft_lora_on_other_families_equals_peft(family, tmp_path):
    """The peft path for PixArt / Sana / Lumina 2 (no diffusers loader mixin needed): module names
    as in the diffusers model, applied by our hooks exactly as peft's own layers compute."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    transformer = components(family)["transformer"].eval()
    adapted = copy.deepcopy(transformer)
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                       init_lora_weights=False), adapted)
    state = get_peft_model_state_dict(adapted)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "l.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 4})})
    handle = ModelHandle(transformer, family)
    patch = lora_patch(read_lora(tmp_path / "l.safetensors"), handle)
    assert patch.report.matched == patch.report.total == len(state) // 2 > 0
    g = torch.Generator().manual_seed(1)
    dims = {"pixart": 32, "sana": 8, "lumina2": 8}
    mask = torch.ones(1, 6, dtype=torch.long)
    cond = Conditioning(torch.randn(1, 6, dims[family], generator=g), None, mask, family=family)
    assert_patch_matches(handle, patch, adapted, torch.randn(1, 4, 8, 8, generator=g), cond)


def test_dropping_the_patched_model_unloads_the_lora(base, tmp_path):
    import gc
    import weakref

    state, config, _ = _peft_lora(base, seed=13)
    handle = ModelHandle(base, "shapes-dit")
    lora = read_lora(_save_diffusers(tmp_path, state, config))
    patched = handle.with_patch(lora_patch(lora, handle))
    x, cond = _inputs(5)
    patched.predict(x, 0.5, cond)
    refs = [weakref.ref(layer.down) for layer in patched.patches[0].layers]
    del lora, patched
    gc.collect()
    assert all(r() is None for r in refs)  # nothing of the LoRA is kept by the shared transformer
