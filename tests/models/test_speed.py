"""Compile, quantize and attention backends (app/models/compile.py, quantizers/, attention.py) on
tiny random models: views leave the base untouched, compiled code is reused across runs, and
LoRA / cache accelerators keep working on compiled and quantized models."""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.core.context import RunContext, reset_current, set_current
from app.core.memo import measure
from app.core.registry import default_registry
from app.models import accelerators as hooks
from app.models import attention, quantizers
from app.models.compile import CompileOptions, compile_model, graphs_compiled, repeated_blocks
from app.models.handles import ModelPatch
from app.models.patches.lora import LoraLayer, LoraPatch
from app.models.sampling import compute_sigmas
from tests.fixtures.cache_models import Tiny, tiny
from tests.fixtures.speed import EAGER, needs_torchao, rel  # noqa: F401


def lora_on(t, fuse: bool = False) -> LoraPatch:
    """A rank-2 LoRA on every block's attention query projection."""
    g = torch.Generator().manual_seed(5)
    layers = []
    for name, module in t.handle.transformer.named_modules():
        if name.endswith("attn.to_q"):
            layers.append(LoraLayer(name, torch.randn(2, module.in_features, generator=g) * 0.3,
                                    torch.randn(module.out_features, 2, generator=g) * 0.3, 1.0))
    assert layers
    return LoraPatch("test", layers, 1.0, fuse)


def events_of(fn):
    """Run ``fn`` under a run context; return (its result, the events it emitted)."""
    events: list[dict] = []
    ctx = RunContext("r", "n", "Sampler", torch.device("cpu"), Path("."), {}, events.append, threading.Event())
    token = set_current(ctx)
    try:
        return fn(), events
    finally:
        reset_current(token)


# ---------------------------------------------------------------------------------------------
# compile


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_compiled_view_shares_weights_leaves_the_base_eager_and_is_cached(family):
    t = tiny(family)
    compiled = compile_model(t.handle, EAGER)
    base_blocks, view_blocks = repeated_blocks(t.handle.transformer), repeated_blocks(compiled.transformer)
    assert len(base_blocks) == len(view_blocks) > 1
    # (removed diffusers hooks leave a plain bound forward on a block: look for dynamo's wrapper)
    assert not any(hasattr(b.forward, "_torchdynamo_orig_callable") for b in base_blocks)  # the base stays eager
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in view_blocks)
    assert all(p is q for p, q in zip(t.handle.transformer.parameters(), compiled.transformer.parameters(), strict=True))
    assert compile_model(t.handle, EAGER).transformer is compiled.transformer  # cached per (base, options)
    assert compile_model(compiled, EAGER).transformer is compiled.transformer  # compiling twice: same view
    assert compile_model(t.handle, CompileOptions(backend="aot_eager")).transformer is not compiled.transformer
    assert torch.allclose(t.sample(compiled), t.reference, atol=1e-5)


def test_no_recompile_when_seed_steps_or_guidance_change():
    t = tiny("flux")
    compiled = compile_model(t.handle, CompileOptions(backend="eager", dynamic=False))  # a view of its own
    _, first = events_of(lambda: t.sample(compiled))
    graphs = graphs_compiled()
    sigmas = compute_sigmas(t.handle, "auto", 9)
    from app.models.sampling import sample

    def other_run():
        return sample(compiled, t.latent, t.pos, t.neg, sigmas, 11, 2.5, progress=lambda *a: None).samples

    out, second = events_of(other_run)
    assert graphs_compiled() == graphs, "a new seed / step count / cfg recompiled"
    assert torch.isfinite(out).all()
    phases = [e["phase"] for e in first + second if e["type"] == "phase"]
    assert phases.count("compiling") == phases.count("compiled") >= 1
    assert not [e for e in second if e["type"] == "phase"]  # nothing compiled in the second run
    assert all(e["run_id"] == "r" and e["node"] == "n" for e in first if e["type"] == "phase")


def test_cache_accelerator_on_a_compiled_model_fullgraph():
    t = tiny("flux")
    fora = hooks.CachePatch(hooks.FORA(interval=2))
    reference = t.sample(t.handle.with_patch(fora))
    compiled = compile_model(t.handle, CompileOptions(backend="eager", fullgraph=True))
    t.sample(compiled)
    graphs = graphs_compiled()
    out = t.sample(compiled.with_patch(fora))
    assert torch.allclose(out, reference, atol=1e-5)
    assert graphs_compiled() == graphs, "the cache hooks were traced into the compiled blocks"


@pytest.mark.parametrize("fuse", [False, True])
def test_lora_on_a_compiled_model(fuse):
    t = tiny("sd3")
    patch = lora_on(t, fuse)
    reference = t.sample(t.handle.with_patch(patch))
    assert rel(reference, t.reference) > 1e-3  # the LoRA does something
    model = compile_model(t.handle, EAGER).with_patch(patch)
    assert torch.allclose(t.sample(model), reference, atol=1e-4)
    graphs = graphs_compiled()
    assert torch.allclose(t.sample(model), reference, atol=1e-4)
    assert graphs_compiled() == graphs  # fused weights are graph inputs; hooks run eager: no recompiles
    assert torch.allclose(t.sample(t.handle), t.reference)  # nothing left behind on the base


# ---------------------------------------------------------------------------------------------
# quantize


def linear_kinds(transformer: torch.nn.Module) -> dict[str, bool]:
    return {n: type(m.weight) is not torch.nn.Parameter for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}


@needs_torchao
@pytest.mark.parametrize("method", ["int8-weight-only", "int8-dynamic"])
def test_int8_quantized_copy_is_close_and_leaves_the_base_untouched(method):
    t = tiny("sd3")
    quantized = quantizers.quantize_model(t.handle, method, quantizers.SKIP_NONE)
    assert quantized.transformer is not t.handle.transformer
    assert not any(linear_kinds(t.handle.transformer).values())
    assert all(linear_kinds(quantized.transformer).values())
    out = t.sample(quantized)
    assert 0 < rel(out, t.reference) < 0.1
    assert torch.equal(t.sample(t.handle), t.reference)
    sizes = measure(quantized)  # the memo cache can size it (torchao tensors have no plain storage)
    assert 0 < sizes["cpu"] < 0.5 * measure(t.handle)["cpu"]  # int8 weights vs fp32 (+ fp32 biases, scales)


@needs_torchao
def test_skip_lists_keep_embedders_norms_final_and_edge_blocks():
    t = tiny("sd3")
    kinds = {skip: linear_kinds(quantizers.quantize_model(t.handle, "int8-weight-only", skip).transformer)
             for skip in quantizers.SKIPS}
    counts = [sum(kinds[s].values()) for s in quantizers.SKIPS]
    assert counts[0] > counts[1] > counts[2] > 0
    io = kinds[quantizers.SKIP_IO]
    assert not any(q for n, q in io.items() if not n.startswith("transformer_blocks."))  # embedders, final
    assert not any(q for n, q in io.items() if ".norm" in n)  # adaLN modulation
    edges = kinds[quantizers.SKIP_EDGES]
    assert not any(q for n, q in edges.items() if n.startswith(("transformer_blocks.0.", "transformer_blocks.2.")))
    assert any(q for n, q in edges.items() if n.startswith("transformer_blocks.1."))


@pytest.mark.parametrize("method", ["fp8-dynamic-row", "fp8-dynamic-tensor", "fp8-weight-only"])
def test_fp8_is_refused_on_cpu_with_a_reason(method):
    t = tiny("sd3")
    with pytest.raises(quantizers.QuantizeError, match="8.9"):
        quantizers.quantize_model(t.handle, method)
    node = default_registry().get("QuantizeModel").function
    with pytest.raises(quantizers.QuantizeError, match="fp8-capable GPU"):
        node(model=t.handle, method=method, skip=quantizers.SKIP_IO)


@needs_torchao
def test_lora_as_an_unquantized_side_branch_on_int8():
    t = tiny("sd3")
    quantized = quantizers.quantize_model(t.handle, "int8-weight-only", quantizers.SKIP_NONE)
    patch = lora_on(t)
    eager_lora = t.sample(t.handle.with_patch(patch))
    plain = t.sample(quantized)
    with_lora = t.sample(quantized.with_patch(patch))
    assert rel(with_lora, plain) > 1e-3  # the LoRA acts on the quantized model
    assert rel(with_lora, eager_lora) < 0.1  # and gives the eager LoRA result up to int8 error
    fused = default_registry().get("QuantizeModel").function
    with pytest.raises(quantizers.QuantizeError, match="fused LoRA"):
        fused(model=t.handle.with_patch(lora_on(t, fuse=True)), method="int8-weight-only", skip=quantizers.SKIP_IO)


@needs_torchao
def test_fused_lora_after_quantize_runs_unfused_on_quantized_layers_with_a_warning():
    t = tiny("sd3")
    quantized = quantizers.quantize_model(t.handle, "int8-weight-only", quantizers.SKIP_NONE)
    unfused = t.sample(quantized.with_patch(lora_on(t)))
    fused, events = events_of(lambda: t.sample(quantized.with_patch(lora_on(t, fuse=True))))
    assert torch.allclose(fused, unfused, atol=1e-5)  # the same side branch, not a crash
    warnings = [e for e in events if e.get("type") == "warning"]
    assert warnings and "quantized" in warnings[0]["message"] and "unfused" in warnings[0]["message"]
    _, events = events_of(lambda: t.sample(t.handle.with_patch(lora_on(t, fuse=True))))
    assert not [e for e in events if e.get("type") == "warning"]  # unquantized layers still fuse


@needs_torchao
def test_memo_measures_quantized_weights_and_compiled_views_by_what_they_hold():
    t = tiny("sd3")
    base_bytes = measure(t.handle.transformer)["cpu"]
    quantized = quantizers.quantize_model(t.handle, "int8-weight-only", quantizers.SKIP_NONE)
    q_bytes = measure(quantized.transformer)["cpu"]  # torchao tensors: no crash on data_ptr
    assert 0 < q_bytes < 0.6 * base_bytes  # int8 weights (+ scales, fp32 biases/norms) of an fp32 model
    for model in (t.handle, quantized):
        view = compile_model(model, EAGER).transformer
        assert measure(view).get("cpu", 0) < 0.01 * measure(model.transformer)["cpu"]  # shares every tensor
        assert measure((model.transformer, view))["cpu"] == measure(model.transformer)["cpu"]


@needs_torchao
def test_cache_and_compile_on_a_quantized_model():
    t = tiny("flux")
    quantized = quantizers.quantize_model(t.handle, "int8-weight-only", quantizers.SKIP_IO)
    plain = t.sample(quantized)
    compiled = compile_model(quantized, EAGER)
    assert isinstance(compiled, quantizers.QuantizedHandle)
    assert torch.allclose(t.sample(compiled), plain, atol=1e-4)
    cached = t.sample(compiled.with_patch(hooks.CachePatch(hooks.FORA(interval=2))))
    assert torch.isfinite(cached).all() and rel(cached, plain) < 0.5
    with pytest.raises(quantizers.QuantizeError, match="before CompileModel"):
        quantizers.quantize_model(compile_model(t.handle, EAGER), "int8-weight-only")


# ---------------------------------------------------------------------------------------------
# attention


def test_attention_native_matches_and_reports_where_it_applies():
    for family, kind in (("flux", "dispatcher"), ("sd3", "SDPA kernel")):
        t = tiny(family)
        patched, report = attention.with_attention_backend(t.handle, "auto")
        assert kind in report and "native" in report
        assert torch.allclose(t.sample(patched), t.reference, atol=1e-5)
    t = tiny("sd3")
    math_model, report = attention.with_attention_backend(t.handle, "math")
    assert "JointAttnProcessor2_0" in report
    assert torch.allclose(t.sample(math_model), t.reference, atol=1e-4)
    for family in ("flux", "sd3"):  # Hopper's "auto": a kernel priority list (CPU takes flash/math from it)
        t = tiny(family)
        hopper = t.handle.with_patch(attention.AttentionPatch(attention.HOPPER_AUTO, ""))
        assert torch.allclose(t.sample(hopper), t.reference, atol=1e-4)


def test_attention_backends_that_would_do_nothing_or_cannot_run_are_refused():
    sd3 = tiny("sd3").handle
    with pytest.raises(attention.AttentionBackendError, match="JointAttnProcessor2_0.*silently ignore"):
        attention.with_attention_backend(sd3, "flex")
    with pytest.raises(attention.AttentionBackendError, match="needs a CUDA GPU"):
        attention.with_attention_backend(sd3, "cudnn")
    node = default_registry().get("AttentionBackend")
    choices = node.inputs["backend"].spec.choice_list()
    assert ("sage" in choices) == (importlib.util.find_spec("sageattention") is not None)  # only when importable
    assert {"auto", "native", "cudnn", "flash", "efficient", "flex"} <= set(choices)


class BetweenBlockResiduals(ModelPatch):
    """What a ControlNet patch does to the transformer call: residuals added between blocks."""

    key = "residuals"

    def wrap(self, state, call, forward):
        hidden = call.kwargs["hidden_states"]
        tokens = (hidden.shape[-2] // 2) * (hidden.shape[-1] // 2)
        g = torch.Generator().manual_seed(3)
        residual = torch.randn(hidden.shape[0], tokens, 16, generator=g).to(hidden)
        call.kwargs["block_controlnet_hidden_states"] = [residual]
        return forward(call)


@pytest.mark.parametrize("kind", ["compiled", pytest.param("quantized", marks=needs_torchao)])
def test_controlnet_residuals_on_compiled_and_quantized_models(kind):
    t = tiny("sd3")
    if kind == "compiled":
        model = compile_model(t.handle, EAGER)
        reference = t.sample(t.handle.with_patch(BetweenBlockResiduals()))
        assert rel(reference, t.reference) > 1e-3
        assert torch.allclose(t.sample(model.with_patch(BetweenBlockResiduals())), reference, atol=1e-4)
    else:
        model = quantizers.quantize_model(t.handle, "int8-dynamic", quantizers.SKIP_IO)
        reference = t.sample(t.handle.with_patch(BetweenBlockResiduals()))
        out = t.sample(model.with_patch(BetweenBlockResiduals()))
        assert rel(out, t.sample(model)) > 1e-3 and rel(out, reference) < 0.1


# attention: torch's kernel selection rules, simulated (no GPU here)
H200_BF16 = attention.CallNeeds(torch.bfloat16, "cuda", (9, 0), head_dim=128)


@pytest.mark.parametrize(("kernel", "needs", "refused"), [
    ("FLASH_ATTENTION", H200_BF16, ""),
    ("FLASH_ATTENTION", attention.CallNeeds(torch.bfloat16, "cuda", (9, 0), has_mask=True), "no attention mask"),
    ("FLASH_ATTENTION", attention.CallNeeds(torch.float32, "cuda", (9, 0)), "fp16/bf16"),
    ("FLASH_ATTENTION", attention.CallNeeds(torch.float16, "cuda", (7, 5)), "8.0+"),
    ("FLASH_ATTENTION", attention.CallNeeds(torch.bfloat16, "cuda", (9, 0), head_dim=512), "up to 256"),
    ("EFFICIENT_ATTENTION", attention.CallNeeds(torch.float32, "cuda", (9, 0), has_mask=True), ""),
    ("EFFICIENT_ATTENTION", attention.CallNeeds(torch.bfloat16, "cuda", (7, 5)), "bf16"),
    ("CUDNN_ATTENTION", attention.CallNeeds(torch.float32, "cuda", (9, 0)), "fp16/bf16"),
    ("CUDNN_ATTENTION", attention.CallNeeds(torch.bfloat16, "cuda", (8, 0), head_dim=192), "up to 128"),
    ("MATH", attention.CallNeeds(torch.float32, "mps", None, has_mask=True), ""),
    ("EFFICIENT_ATTENTION", attention.CallNeeds(torch.float32, "cpu"), "CUDA only"),
])
def test_kernel_refusal_follows_torch_rules(kernel, needs, refused):
    reason = attention.kernel_refusal(kernel, needs)
    assert (refused in reason and reason) if refused else reason == ""


def test_flash_on_a_masked_call_keeps_flash_first_and_falls_back_for_the_mask():
    flash = attention.BACKENDS["flash"]
    assert attention.kernel_plan(flash, H200_BF16) == (("FLASH_ATTENTION",), "")
    masked = attention.replace(H200_BF16, has_mask=True)
    kernels, note = attention.kernel_plan(flash, masked)
    assert kernels[0] == "FLASH_ATTENTION" and "MATH" in kernels and len(kernels) > 2
    assert all(not attention.kernel_refusal(k, masked) for k in kernels[1:])
    assert "mask" in note
    # auto already lists mask-capable kernels: no fallback note
    assert attention.kernel_plan(attention.HOPPER_AUTO, masked)[1] == ""
    fp32 = attention.CallNeeds(torch.float32, "cuda", (9, 0))
    assert attention.kernel_plan(flash, fp32)[0] == ("EFFICIENT_ATTENTION", "MATH")


def test_masked_pixart_call_is_detected_and_a_kernel_without_a_call_falls_back_with_a_warning(monkeypatch):
    t = tiny("pixart")
    seen = []
    real = attention.kernel_plan
    monkeypatch.setattr(attention, "kernel_plan", lambda b, n: seen.append(n.has_mask) or real(b, n))
    model = t.handle.with_patch(attention.AttentionPatch(attention.BACKENDS["efficient"], ""))
    out, events = events_of(lambda: t.sample(model))  # efficient has no CPU kernel: falls back, no crash
    assert seen and all(seen)  # PixArt passes its text mask
    assert torch.allclose(out, t.reference, atol=1e-4)
    assert [e for e in events if e.get("type") == "warning" and "CUDA only" in e["message"]]
    # a rule that is wrong at run time ("No available kernel") re-runs the call under native
    monkeypatch.setattr(attention, "kernel_refusal", lambda kernel, needs: "")
    out, events = events_of(lambda: t.sample(model))
    assert torch.allclose(out, t.reference, atol=1e-4)
    assert [e for e in events if e.get("type") == "warning" and "re-ran" in e["message"]]


# ---------------------------------------------------------------------------------------------
# CUDA-graph modes and scope=model


def test_cudagraph_modes_mark_each_call_a_step_and_return_a_copy(monkeypatch):
    """reduce-overhead replays graphs whose outputs the next replay overwrites: each transformer
    call marks a new step and hands back a copy, so a multistep sampler's kept velocities stay
    right (the graphs themselves need CUDA: here the blocks trace with the eager backend)."""
    from app.models import compile as compile_module

    options = CompileOptions(mode="reduce-overhead")
    assert options.cudagraphs and not EAGER.cudagraphs and not CompileOptions(mode="max-autotune-no-cudagraphs").cudagraphs
    monkeypatch.setattr(CompileOptions, "kwargs", lambda self: {"backend": "eager"})
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    outputs = []
    real_call = compile_module.CompileReport._call

    def spy(self, call, forward):
        out = real_call(self, call, lambda c: outputs.append(forward(c)) or outputs[-1])
        assert out is not outputs[-1] and out.data_ptr() != outputs[-1].data_ptr()  # a copy, not the pool's tensor
        return out

    monkeypatch.setattr(compile_module.CompileReport, "_call", spy)
    t = tiny("flux")
    compiled = compile_model(t.handle, options)
    assert "reduce-overhead" in repr(compiled)
    out = t.sample(compiled, "dpmpp_2m")  # keeps the previous step's prediction
    assert len(marks) == len(outputs) > 1  # one step mark per transformer call
    assert torch.allclose(out, t.sample(t.handle, "dpmpp_2m"), atol=1e-5)


def test_scope_model_compiles_the_whole_forward_without_recompiles_and_keys_apart():
    t = tiny("flux")
    options = CompileOptions(backend="eager", scope="model", dynamic=False)
    compiled = compile_model(t.handle, options)
    assert hasattr(compiled.transformer.forward, "_torchdynamo_orig_callable")
    assert not any(hasattr(b.forward, "_torchdynamo_orig_callable") for b in repeated_blocks(compiled.transformer))
    assert not hasattr(t.handle.transformer.forward, "_torchdynamo_orig_callable")  # the base stays eager
    assert compiled.transformer is not compile_model(t.handle, EAGER).transformer
    assert "scope=model" in repr(compiled) and "scope" not in repr(compile_model(t.handle, EAGER))
    assert torch.allclose(t.sample(compiled), t.reference, atol=1e-5)
    graphs = graphs_compiled()
    from app.models.sampling import sample

    sigmas = compute_sigmas(t.handle, "auto", 5)
    out = sample(compiled, t.latent, t.pos, t.neg, sigmas, 3, 2.0, progress=lambda *a: None).samples
    assert torch.isfinite(out).all() and graphs_compiled() == graphs, "another seed/steps/cfg recompiled"
    with pytest.raises(ValueError, match="unknown scope"):
        CompileOptions(scope="everything")


def test_scope_model_with_a_cache_accelerator_runs_eagerly_with_a_warning():
    t = tiny("flux")
    fora = hooks.CachePatch(hooks.FORA(interval=2))
    reference = t.sample(t.handle.with_patch(fora))
    compiled = compile_model(t.handle, CompileOptions(backend="eager", scope="model"))
    t.sample(compiled)
    graphs = graphs_compiled()
    out, events = events_of(lambda: t.sample(compiled.with_patch(fora)))
    assert torch.allclose(out, reference, atol=1e-5)
    assert graphs_compiled() == graphs
    assert any(e["type"] == "warning" and "scope=model" in e.get("message", "") for e in events), events


# ---------------------------------------------------------------------------------------------
# dynamo's recompile limit


def tiny_sd35_medium(block_class: type) -> Tiny:
    """SD3.5-medium's block layout at CPU size: dual-attention blocks, plain blocks and the
    context_pre_only last block, three structures of one class. Its blocks become
    ``block_class``, a subclass of the test's own whose forward calls diffusers': a code object,
    so a dynamo cache, that starts empty as in a fresh process (the cache of diffusers' forward
    holds earlier tests' entries, and their other shapes make the first graphs shape-dynamic)."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=(0, 1), qk_norm="rms_norm").eval()
    for block in transformer.transformer_blocks:
        block.__class__ = block_class
    return Tiny("sd3", (transformer, 32, True, False))


def test_sd35_medium_blocks_all_compile_in_every_view_and_reruns_do_not_recompile(monkeypatch, request):
    """Dynamo keeps one cache per code object: every compiled view in the process adds its block
    structures to the one list of the block class's forward. Three views (the GPU bench's
    compile, fp8 and int8 ones) are nine entries, past dynamo's default limit of 8, after which
    it ran the remaining blocks eagerly, saying so in one log line."""
    from diffusers.models.attention import JointTransformerBlock as Block

    class JointTransformerBlock(Block):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    # as in a fresh process: dynamo's default limit and no views counted yet (earlier tests in this
    # process raised the limit, which would let this test pass whatever the counting did);
    # config.patch, not monkeypatch: undoing a monkeypatch of a dynamo config value set since
    # (allow_recompiles sets it) deletes it for the rest of the process
    from app.models import compile as compile_module

    monkeypatch.setattr(compile_module, "_COMPILED", {})
    limit = torch._dynamo.config.patch(recompile_limit=8)
    limit.__enter__()
    request.addfinalizer(lambda: limit.__exit__(None, None, None))
    t = tiny_sd35_medium(JointTransformerBlock)
    structures = {(b.use_dual_attention, b.context_pre_only) for b in t.handle.transformer.transformer_blocks}
    assert len(structures) == 3
    for options in (EAGER, CompileOptions(backend="eager", dynamic=False), CompileOptions(backend="aot_eager")):
        compiled = compile_model(t.handle, options)
        graphs = graphs_compiled()
        out, events = events_of(lambda: t.sample(compiled))  # noqa: B023 (called at once)
        assert graphs_compiled() - graphs == len(structures), f"{options}: a block structure ran eagerly"
        assert torch.allclose(out, t.reference, atol=1e-5)
        assert not [e for e in events if e["type"] == "warning"]
    # another prompt, seed, step count and guidance: nothing compiles
    g = torch.Generator().manual_seed(9)
    pos, neg = (replace(c, embeds=torch.randn(c.embeds.shape, generator=g)) for c in (t.pos, t.neg))
    graphs = graphs_compiled()
    from app.models.sampling import sample

    def other_run():
        return sample(compiled, t.latent, pos, neg, compute_sigmas(t.handle, "auto", 4), 11, 2.5,
                      progress=lambda *a: None).samples

    out, events = events_of(other_run)
    assert graphs_compiled() == graphs, "another prompt / seed / step count / cfg recompiled"
    assert torch.isfinite(out).all() and not [e for e in events if e["type"] in ("phase", "warning")]


def test_a_run_past_the_recompile_limit_warns():
    """Past the limit dynamo runs the code eagerly for the rest of the process: the run says so."""
    from diffusers.models.attention import JointTransformerBlock as Block

    class JointTransformerBlock(Block):  # another code object: the eager fallback stays with it
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    t = tiny_sd35_medium(JointTransformerBlock)
    compiled = compile_model(t.handle, EAGER)
    # config.patch, not monkeypatch: compile_model below sets the limit, and undoing a monkeypatch
    # of a dynamo config value set since deletes it for the rest of the process
    with torch._dynamo.config.patch(recompile_limit=1):  # as if the process had used it up
        out, events = events_of(lambda: t.sample(compiled))
        assert torch.allclose(out, t.reference, atol=1e-5)  # eager blocks: right, only slower
        warnings = [e["message"] for e in events if e["type"] == "warning"]
        assert len(warnings) == 1 and "recompile limit" in warnings[0], warnings
        later = compile_model(t.handle, CompileOptions(backend="eager", dynamic=False))  # compiles nothing more
        _, events = events_of(lambda: t.sample(later))
    assert [e for e in events if e["type"] == "warning" and "recompile limit" in e["message"]]
