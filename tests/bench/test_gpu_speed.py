"""bench/gpu_speed.py --tiny: every variant's code path runs on CPU and lands in the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_speed


def test_tiny_run_writes_every_variant(tmp_path):
    pytest.importorskip("torchao", reason="torchao (the 'fast' extra) is not installed")
    out = tmp_path / "gpu_speed.json"
    gpu_speed.main(["--tiny", "--models", "sd3.5-medium", "--out", str(out)])
    report = json.loads(out.read_text())["gpu_speed"]
    assert report["tiny"] and report["matmul_tflops"] > 0
    model = report["models"]["sd3.5-medium"]
    variants = model["variants"]
    assert {"eager", "compile", "fp8+compile", "int8+compile", "attention-native", "compile-fused-qkv",
            "fp8+compile-fused-qkv", "compile-fullgraph", "compile-max-autotune",
            "compile-coordinate-descent"} <= set(variants)
    assert variants["eager"]["drift"] == 0.0 and variants["eager"]["finite"]
    assert variants["compile"]["drift"] < 1e-4 and variants["compile"]["e2e_runs"] >= 2
    assert 0 < variants["int8+compile"]["drift"] < 0.2  # quantized: a small, nonzero drift
    assert variants["int8+compile"]["weights_gib"] < variants["eager"]["weights_gib"]
    assert "fp8-capable GPU" in variants["fp8+compile"]["error"]  # refused on CPU, with the reason
    assert "silently ignore" in variants["attention-flex"]["error"]  # SD3's processors bypass the dispatcher
    assert model["flops_per_step"] > 0 and variants["eager"]["matmul_fraction"] > 0
    for name in ("compile", "compile-fullgraph", "compile-max-autotune", "compile-coordinate-descent"):
        assert variants[name]["drift"] < 1e-4, name
        assert variants[name]["step_graphs_compiled"] == 0, name  # the timed steps reuse the warm-up's graphs
    assert "compile(max-autotune-no-cudagraphs" in variants["compile-max-autotune"]["key"]
    assert "tuning=coordinate-descent" in variants["compile-coordinate-descent"]["key"]
    # a dozen compiled views of one block class in one process: none past dynamo's recompile limit
    assert not [name for name, row in variants.items() if row.get("recompile_limit_hits")]
    fused = variants["compile-fused-qkv"]  # SD3's processors take fused projections or the variant says why not
    assert fused.get("drift", 1.0) < 1e-4 or "error" in fused


def test_models_all_and_variant_filter(tmp_path):
    out = tmp_path / "gpu_speed.json"
    report = gpu_speed.main(["--tiny", "--models", "all", "--variants", "compile-fused-qkv", "--out", str(out)])
    assert set(report["models"]) == set(gpu_speed.MODELS)
    for name, model in report["models"].items():
        assert set(model["variants"]) == {"compile-fused-qkv"}, name
    flux = report["models"]["flux-dev"]["variants"]["compile-fused-qkv"]
    assert flux["finite"] and "fused" not in flux.get("error", "")  # Flux's processors use to_qkv


def test_models_filter_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit):
        gpu_speed.main(["--tiny", "--models", "nope", "--out", str(tmp_path / "x.json")])


def test_profile_and_cudagraph_variants_run_on_cpu(tmp_path):
    """--profile adds one profiled step per variant; the CUDA-graph and scope variants run their
    code path (fp8 ones are refused on CPU with the reason)."""
    pytest.importorskip("torchao", reason="torchao (the 'fast' extra) is not installed")
    new = ["compile-cudagraphs", "fp8+compile-cudagraphs", "fp8+compile-max-autotune", "fp8+compile-model",
           "fp8+compile-model-cudagraphs"]
    report = gpu_speed.main(["--tiny", "--models", "flux-dev", "--profile", "--variants", ",".join(["eager", *new]),
                             "--out", str(tmp_path / "gpu_speed.json")])
    variants = report["models"]["flux-dev"]["variants"]
    assert set(variants) == {"eager", *new}
    eager = variants["eager"]
    assert eager["ms_per_step"] > 0 and eager["ms_per_step_synced"] > 0 and eager["host_ms_per_step"] > 0
    profile = eager["profile"]
    assert profile["busy_ms"] > 0 and profile["idle_ms"] is None  # idle time only means something on a GPU
    assert "timeline" not in profile  # device activity: GPU only
    assert profile["ms_by_kind"]["attention"] > 0 and profile["ms_by_kind"]["gemm"] > 0
    assert sum(profile["ms_by_kind"].values()) == pytest.approx(profile["busy_ms"])
    graphs = variants["compile-cudagraphs"]
    assert graphs["drift"] < 1e-4 and graphs["step_graphs_compiled"] == 0 and "reduce-overhead" in graphs["key"]
    for name in new[1:]:
        assert "fp8-capable GPU" in variants[name]["error"], name


@pytest.mark.parametrize("name, kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >", "attention"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
    ("void cutlass::device_kernel<f8f8bf16_rowwise_kernel>", "gemm"),
    ("triton_tem_fused_mm_0", "gemm"),
    ("triton_poi_fused__scaled_mm__to_copy_abs_amax_clamp_0", "inductor"),
    ("triton_red_fused_native_layer_norm_1", "inductor"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >", "eager-elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>", "copy"),
    ("Memset (Device)", "copy"),
    ("aten::_int_mm", "gemm"),
    ("some_other_kernel", "other"),
])
def test_kernel_kinds(name, kind):
    assert gpu_speed.kernel_kind(name) == kind


def test_timeline_splits_idle_time_into_lead_kernel_switches_and_waits():
    # host starts at 0; kernels at 100-200, 205-300 (a 5 µs switch), 800-900 (a 500 µs wait), one
    # nested inside another (no gap), over 2 steps
    spans = [(100.0, 200.0, "a"), (205.0, 300.0, "b"), (210.0, 250.0, "nested"), (800.0, 900.0, "c")]
    found = gpu_speed.timeline(spans, 0.0, 2)
    assert found["lead_ms"] == pytest.approx(0.1)
    assert found["gap_ms"] == pytest.approx(0.505 / 2) and found["launch_gap_ms"] == pytest.approx(0.005 / 2)
    assert found["gaps_per_step"] == 1.0
    assert found["largest_gaps"][0] == {"ms": pytest.approx(0.5), "previous": "b", "next": "c"}
    assert gpu_speed.timeline([], 0.0, 1)["lead_ms"] is None


def test_host_syncs_are_counted_per_step_by_the_ops_that_made_them():
    from types import SimpleNamespace

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, parent=None, device=cpu):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start),
                               cpu_parent=parent)

    steps = event(gpu_speed.STEPS_LABEL, 0.0)
    to = event("aten::to", 1.0, steps)
    copy = event("aten::copy_", 2.0, event("aten::_to_copy", 1.5, to))
    item = event("aten::item", 5.0, steps)
    events = [event("cudaStreamSynchronize", 3.0, copy), event("cudaStreamSynchronize", 6.0, item),
              event("cudaDeviceSynchronize", 50.0), event("cudaStreamSynchronize", 4.0, device=cuda),
              event("cudaLaunchKernel", 4.0, copy)]
    found = gpu_speed.host_syncs(events, 0.0, 10.0, 2)
    assert found == {"per_step": 1.0, "by_op": {"aten::to > aten::copy_": 1, "aten::item": 1}}
    # device activity: kernels, not the GPU-side span of the steps' label
    kernel = SimpleNamespace(name="gemm", device_type=cuda, is_user_annotation=False)
    label = SimpleNamespace(name=gpu_speed.STEPS_LABEL, device_type=cuda, is_user_annotation=True)
    assert gpu_speed.device_events([kernel, label, steps]) == [kernel]
