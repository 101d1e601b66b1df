"""HiDream-I1 (Full / Dev / Fast) on a tiny random model: our decomposed graph against
HiDreamImagePipeline, variant detection, ComfyUI single files, LoRA formats, cache / compile /
quantize, and the shipped graph.

Full's settings (CFG 5 with a negative, shift 3) are compared with the pipeline given our sigmas
(its release samples with flow UniPC, which ditgraph does not have: Euler on both sides). Dev's
run its own ``FlowMatchLCMScheduler`` untouched: LCM steps whose fresh noise the pipeline draws
from torch's global generator (``scheduler.step`` gets no generator), seeded here so that its
draws are our seeded noise stream's.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.core import paths
from app.core.executor import Engine
from app.core.registry import default_registry
from app.core.validation import errors
from app.core.workflow import Workflow
from app.models import families
from app.models.families.variants import detect_variant
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.patches.lora import lora_patch, read_lora
from app.models.sampling import compute_sigmas, make_noise, sample, sampling_defaults
from app.models.sampling.schedules import model_shift
from nodes.text import Conditioning
from tests.fixtures.cache_models import summaries  # noqa: F401 (fixture)
from tests.fixtures.lora import assert_patch_matches
from tests.fixtures.parity import PROMPT, SEED, SIZE, rel_l2, workflow
from tests.fixtures.tiny_hidream import save_hidream, scheduler, tiny_hidream, tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
STEPS, CFG, NEGATIVE = 3, 5.0, "blurry"
GRAPH = Path(__file__).resolve().parents[2] / "graphs" / "hidream-txt2img.json"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    parts = tiny_hidream()
    for variant in ("full", "dev"):
        save_hidream(root / "checkpoints" / f"tiny-hidream-{variant}", variant, parts)
    return root


@pytest.fixture
def engine(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    return Engine(device="cpu", output_dir=tmp_path / "out")


def pipeline(folder: Path):
    import diffusers

    pipe = diffusers.HiDreamImagePipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = SIZE // pipe.vae_scale_factor  # its __call__ rescales every size to this area
    return pipe


def test_full_settings_match_the_pipeline(engine, models_root):
    import diffusers

    graph = workflow("hidream")
    graph["nodes"]["ckpt"]["inputs"]["checkpoint"] = "tiny-hidream-full"
    graph["nodes"]["sample"]["inputs"].update(cfg=CFG, steps=STEPS)
    graph["nodes"]["neg"]["inputs"]["text"] = NEGATIVE
    result = engine.run(graph, targets=["decode", "ckpt", "empty"]).raise_for_status()
    model, latent = result.output("ckpt", 0), result.output("empty").samples
    assert model.family == "hidream" and sampling_defaults(model).get("variant") is None  # Full: the base model
    assert model_shift(model) == 3.0  # its UniPC scheduler's flow_shift
    sigmas = compute_sigmas(model, "auto", STEPS, 0.0, tuple(latent.shape[-2:]))
    pipe = pipeline(models_root / "checkpoints" / "tiny-hidream-full")
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    with torch.no_grad():
        reference = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                         sigmas=sigmas[:-1].tolist(), latents=make_noise(tuple(latent.shape), SEED), guidance_scale=CFG,
                         output_type="pt").images
    error = rel_l2(result.output("decode"), reference.permute(0, 2, 3, 1).float())
    print(f"hidream full: relative L2 vs HiDreamImagePipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"relative L2 {error:.3e}"


def test_dev_settings_match_the_pipeline(engine, models_root):
    """Dev's defaults (from its scheduler: 28 steps, no CFG, LCM over the shift-6 Euler timesteps)
    against the pipeline with its own scheduler; 4 steps keep it short."""
    model, te, vae = ({"from": ["ckpt", out]} for out in ("model", "text_encoder", "vae"))
    nodes = {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"checkpoint": "tiny-hidream-dev"}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": te, "text": PROMPT}},
        "empty": {"type": "EmptyLatent", "inputs": {"model": model, "vae": vae, "width": SIZE, "height": SIZE}},
        "defaults": {"type": "ModelSamplingDefaults", "inputs": {"model": model}},
        "sample": {"type": "Sampler", "inputs": {
            "model": model, "positive": {"from": ["pos", "conditioning"]}, "latent": {"from": ["empty", "latent"]},
            "seed": SEED, "steps": 4, **{k: {"from": ["defaults", k]} for k in ("cfg", "sampler", "scheduler")}}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": vae, "latent": {"from": ["sample", "latent"]}}},
    }
    result = engine.run({"format": "ditgraph/workflow", "version": 1, "nodes": nodes},
                        targets=["decode", "defaults", "empty", "ckpt"]).raise_for_status()
    assert [result.output("defaults", i) for i in range(4)] == [28, 1.0, "lcm", "turbo"]
    assert model_shift(result.output("ckpt", 0)) == 6.0
    shape = tuple(result.output("empty").samples.shape)
    pipe = pipeline(models_root / "checkpoints" / "tiny-hidream-dev")
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    torch.manual_seed(SEED)
    noise = torch.randn(shape)  # = our start noise; the global generator then draws the step noise
    assert torch.equal(noise, make_noise(shape, SEED))
    with torch.no_grad():
        reference = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, latents=noise,
                         guidance_scale=0.0, output_type="pt").images
    error = rel_l2(result.output("decode"), reference.permute(0, 2, 3, 1).float())
    print(f"hidream dev: relative L2 vs HiDreamImagePipeline = {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4, f"relative L2 {error:.3e}"


@pytest.mark.parametrize("name,scheduler_of,expected", [
    ("HiDream-I1-Full", "full", None), ("HiDream-I1-Dev", "dev", "hidream-dev"), ("some-folder", "dev", "hidream-dev"),
    ("some-folder", "fast", "hidream-fast"), ("hidream_i1_fast_fp8.safetensors", "dev", "hidream-fast"),
    ("hidream_i1_dev_bf16.safetensors", "full", "hidream-dev"), ("hidream_i1_full_fp16.safetensors", "dev", None),
])
def test_variants_by_name_then_scheduler(name, scheduler_of, expected):
    """The name wins (a ComfyUI single file with another release's config folder), else the scheduler."""
    config = dict(scheduler(scheduler_of).config)
    variant = detect_variant("hidream", {}, {**config, "_class_name": type(scheduler(scheduler_of)).__name__}, name)
    assert (variant.name if variant else None) == expected
    if variant is not None:
        assert (variant.steps, variant.cfg, variant.sampler, variant.shift) == \
            ((28, 1.0, "lcm", 6.0) if expected == "hidream-dev" else (16, 1.0, "lcm", 3.0))


def test_comfyui_single_file_loads_with_a_config_folder(models_root, tmp_path, monkeypatch):
    """ComfyUI's repacks keep the original (= diffusers) module names under model.diffusion_model.;
    a *dev* file with Full's config folder samples as Dev (shift 6)."""
    import sys

    monkeypatch.setitem(paths._overrides, "models", models_root)
    default_registry()
    loaders = sys.modules["nodes.loaders"]
    folder = models_root / "checkpoints" / "tiny-hidream-full"
    base, _, _ = loaders.load_checkpoint_folder(folder, torch.float32, torch.device("cpu"))
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in base.transformer.state_dict().items()}
    assert families.detect_state_dict_family(list(state)) == "hidream"
    file = tmp_path / "hidream_i1_dev_bf16.safetensors"
    save_file(state, str(file))
    with pytest.raises(loaders.LoadFailed, match="look like hidream"):
        loaders.load_single_file(file, None, torch.float32, torch.device("cpu"))
    handle, encoders, vae = loaders.load_single_file(file, folder, torch.float32, torch.device("cpu"))
    assert handle.family == "hidream" and set(encoders.slots) == {"clip_l", "clip_g", "t5", "llama"}
    assert sampling_defaults(handle)["variant"] == "hidream-dev" and model_shift(handle) == 6.0
    x, cond = torch.randn(1, 4, 8, 8), _cond()
    assert torch.equal(handle.predict(x, 0.7, cond), base.predict(x, 0.7, cond))


def _cond(layers: int = 2, seed: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, 1 + layers, 6, 32, generator=g), torch.randn(1, 32, generator=g), None,
                        family="hidream")


def test_oversized_image_is_refused_naming_the_limit():
    handle = ModelHandle(tiny_transformer(), "hidream")
    with pytest.raises(ValueError, match="at most 64"):
        handle.predict(torch.randn(1, 4, 18, 18), 0.5, _cond())


# -- LoRA ------------------------------------------------------------------------------------


def _peft(transformer: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    adapted = copy.deepcopy(transformer)
    torch.manual_seed(0)
    targets = ["to_q", "to_k_t", "to_out", "w1", "linear"]  # attention, MoE experts and text projections
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False), adapted)
    return adapted, get_peft_model_state_dict(adapted)


def _formats(state: dict) -> dict[str, dict]:
    """One peft state dict in the formats HiDream LoRAs come in (alpha = rank: scale 1)."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    comfy = {f"diffusion_model.{k}": v for k, v in state.items()}
    comfy.update({f"diffusion_model.{m}.alpha": torch.tensor(2.0) for m in modules})
    kohya = {}
    for m in modules:
        name = "lora_unet_" + m.replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = state[f"{m}.lora_A.weight"]
        kohya[f"{name}.lora_up.weight"] = state[f"{m}.lora_B.weight"]
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    return {"diffusers": {f"transformer.{k}": v for k, v in state.items()}, "comfyui": comfy, "kohya": kohya}


@pytest.mark.parametrize("kind", ["diffusers", "comfyui", "kohya"])
def test_lora_formats_equal_peft(kind, tmp_path):
    transformer = tiny_transformer()
    adapted, state = _peft(transformer)
    save_file({k: v.contiguous() for k, v in _formats(state)[kind].items()}, str(tmp_path / "l.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 2})})
    handle = ModelHandle(transformer, "hidream")
    patch = lora_patch(read_lora(tmp_path / "l.safetensors"), handle)
    assert patch.report.matched == patch.report.total == len(state) // 2 > 10, patch.report.summary()
    assert_patch_matches(handle, patch, adapted, torch.randn(1, 4, 8, 8), _cond())


# -- cache accelerators, compile, quantize ---------------------------------------------------


@pytest.fixture(scope="module")
def three_single_blocks():
    """A tiny HiDream with 3 single-stream blocks (what the cache methods hook) and its uncached run."""
    handle = ModelHandle(tiny_transformer(num_single_layers=3, llama_layers=[0, 1, 1, 1]), "hidream",
                         scheduler_config={"shift": 3.0})
    pos, neg = _cond(seed=1), _cond(seed=2)
    latent, sigmas = Latent(torch.zeros(1, 4, 8, 8)), compute_sigmas(handle, "auto", 6)
    run = lambda model: sample(model, latent, pos, neg, sigmas, 3, 4.0, progress=lambda *a: None).samples  # noqa: E731
    return handle, run, run(handle)


def test_cache_methods_hook_the_single_stream_blocks(three_single_blocks, summaries):  # noqa: F811 (the fixture)
    from app.models import accelerators as hooks
    from tests.fixtures.cache_models import METHODS, no_cache_hooks

    handle, run, reference = three_single_blocks
    assert hooks.stack_blocks(handle.transformer) == list(handle.transformer.single_stream_blocks)
    for method, (never, aggressive) in METHODS.items():
        assert torch.equal(run(handle.with_patch(hooks.CachePatch(never))), reference), method
        assert summaries[-1]["blocks_skipped"] == 0, method
        model = handle.with_patch(hooks.CachePatch(aggressive))
        first, second = run(model), run(model)
        assert summaries[-2]["blocks_skipped"] > 0, f"{method} skipped nothing"
        assert torch.isfinite(first).all() and torch.equal(first, second) and not torch.equal(first, reference), method
        assert no_cache_hooks(handle)


def test_compile_and_int8_quantize_work(three_single_blocks):
    from app.models import quantizers
    from app.models.compile import compile_model, repeated_blocks
    from tests.fixtures.speed import EAGER, needs_torchao, rel

    handle, run, reference = three_single_blocks
    transformer = handle.transformer
    assert len(repeated_blocks(transformer)) == len(transformer.double_stream_blocks) + len(transformer.single_stream_blocks)
    compiled = compile_model(handle, EAGER)
    assert compiled.transformer is not transformer
    assert torch.allclose(run(compiled), reference, atol=1e-5)
    if needs_torchao.args[0]:  # torchao missing: quantization is covered where it is installed
        return
    quantized = quantizers.quantize_model(handle, "int8-weight-only", quantizers.SKIP_NONE)
    assert 0 < rel(run(quantized), reference) < 0.1
    assert torch.equal(run(handle), reference)  # the base is untouched


# -- the shipped graph -----------------------------------------------------------------------


def test_shipped_graph_names_its_files_when_absent(tmp_path, monkeypatch):
    document = json.loads(GRAPH.read_text())
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    problems = [str(p) for p in errors(Engine(registry=default_registry(), device="cpu").validate(Workflow.from_dict(document)))]
    for name in ("HiDream-I1-Full", "Llama-3.1-8B-Instruct"):
        assert any(name in p for p in problems), problems


def test_shipped_graph_runs_on_a_tiny_model(models_root, tmp_path, monkeypatch):
    """The graph's layout: a pipeline folder without the Llama (as HiDream-I1-Full ships), the
    Llama from text_encoders through TextEncoderLoader, merged by CombineTextEncoders."""
    models = tmp_path / "models"
    full = models / "checkpoints" / "HiDream-I1-Full"
    shutil.copytree(models_root / "checkpoints" / "tiny-hidream-full", full)
    llama = models / "text_encoders" / "Llama-3.1-8B-Instruct"
    shutil.move(full / "text_encoder_4", llama)
    for item in (full / "tokenizer_4").iterdir():
        shutil.move(item, llama / item.name)
    (full / "tokenizer_4").rmdir()
    index = json.loads((full / "model_index.json").read_text())
    (full / "model_index.json").write_text(json.dumps({**index, "text_encoder_4": [None, None], "tokenizer_4": [None, None]}))
    monkeypatch.setitem(paths._overrides, "models", models)
    document = json.loads(GRAPH.read_text())
    document["nodes"]["6"]["inputs"].update(width=SIZE, height=SIZE)
    document["nodes"]["7"]["inputs"]["steps"] = 2
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(document, targets=["3", "8"]).raise_for_status()
    assert set(result.output("3").slots) == {"clip_l", "clip_g", "t5", "llama"}
    assert type(result.output("3").slots["llama"][1]).__name__ == "LlamaModel"  # no language-model head loaded
    image = result.output("8")
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()
