"""bench/gpu_memory.py --tiny: the storage × plan × cap grid and the switch test run on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_memory


def test_tiny_grid_and_switch(tmp_path):
    pytest.importorskip("torchao", reason="torchao (the 'fast' extra) is not installed")
    out = tmp_path / "gpu_memory.json"
    gpu_memory.main(["--tiny", "--models", "flux-dev", "--storages", "bf16,int8", "--caps", "12,8",
                     "--steps", "1", "--out", str(out)])
    report = json.loads(out.read_text())["gpu_memory"]
    rows = report["models"]["flux-dev"]["rows"]
    assert len(rows) == 3 * 2 * 3  # caps (none, 12, 8) × storages × plans
    assert rows["cap=none bf16 resident"]["drift"] == 0.0
    assert rows["cap=none bf16 blocks"]["drift"] < 1e-5  # streaming changes where weights live, not results
    assert 0 < rows["cap=none int8 resident"]["drift"] < 0.2
    assert rows["cap=12.0 bf16 auto"]["plan"]["mode"] == "stream"
    assert rows["cap=8.0 bf16 auto"]["plan"]["resident_blocks"] <= rows["cap=12.0 bf16 auto"]["plan"]["resident_blocks"]
    stages = report["switch"]["stages"]
    assert [s["model"] for s in stages] == ["flux-dev", "sd3.5-large", "flux-dev"]
    assert all("error" not in s and s["finite"] for s in stages) and stages[2].get("reused")


def test_unknown_storage_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_memory.main(["--tiny", "--storages", "fp4", "--out", str(tmp_path / "x.json")])


def _e2e(tmp_path, *extra):
    out = tmp_path / "gpu_memory.json"
    gpu_memory.main(["--e2e", "--tiny", "--steps", "1", "--out", str(out), *extra])
    return json.loads(out.read_text())["gpu_memory"]


def test_tiny_end_to_end_rows_and_switch(tmp_path):
    """Text encoders + transformer + VAE placed by the planner: the reference row runs first,
    streaming changes nothing, fp8 storage drifts a little, and the switch test reuses Flux."""
    report = _e2e(tmp_path, "--rows", "flux-dev/none/fp8_e4m3/auto,flux-dev/none/bf16/blocks,flux-dev/8/bf16/auto",
                  "--switch-cap", "16")
    rows = report["e2e"]["rows"]
    assert list(rows)[0] == "flux-dev cap=none bf16 resident"  # the drift reference, added first
    assert all("error" not in r and r["finite"] for r in rows.values()), rows
    assert rows["flux-dev cap=none bf16 resident"]["drift"] == 0.0
    assert rows["flux-dev cap=none bf16 blocks"]["drift"] < 1e-5
    assert rows["flux-dev cap=none bf16 blocks"]["plan"]["t5"]["mode"] == "blocks"
    assert 0 < rows["flux-dev cap=none fp8_e4m3 auto"]["drift"] < 0.2
    capped = rows["flux-dev cap=8.0 bf16 auto"]
    assert capped["plan"]["t5"]["mode"] == "model" and any("t5:" in line for line in capped["plan_lines"])
    assert set(capped["plan"]) == {"transformer", "clip_l", "t5", "vae"}
    stages = report["switch_e2e"]["stages"]
    assert [s["model"] for s in stages] == ["flux-dev", "sd3.5-large", "flux-dev"]
    assert all("error" not in s and s["finite"] for s in stages) and stages[2].get("reused")
    assert stages[0]["plan_lines"] and list(stages[2]["stages"]) == ["place", "encode", "sample", "decode"]
    assert list(capped["stages"]) == ["build", "plan", "place", "warmup encode", "warmup sample", "warmup decode",
                                      "encode", "sample", "decode"]


def test_isolated_rows_record_their_result_or_their_timeout(tmp_path):
    """On a GPU each row runs in a subprocess: its result comes back; a hung row is recorded and the file kept."""
    report = _e2e(tmp_path, "--isolate", "--rows", "flux-dev/none/bf16/resident", "--switch-cap", "0")
    row = report["e2e"]["rows"]["flux-dev cap=none bf16 resident"]
    assert row["finite"] and row["drift"] == 0.0 and report["e2e"]["isolated"]
    report = _e2e(tmp_path, "--isolate", "--row-timeout", "0.01", "--rows", "sd3.5-large/none/bf16/resident",
                  "--switch-cap", "0")
    assert report["e2e"]["rows"]["sd3.5-large cap=none bf16 resident"]["error"].startswith("timed out")


def test_repeats_and_the_encoders_drift_say_whether_a_placement_raced(tmp_path, monkeypatch):
    """--repeat: the same image again must give the same bits (on an H200 a race in streaming
    SD3.5-large's CLIP-G gave three different images, drift 0.41 / 0.14 / 0.35); every row's
    text encoders, bf16 in all rows, are compared with the reference row's (encode_drift);
    --reuse-reference then skips the reference row whose latent is already beside --out."""
    from diffusers.hooks.group_offloading import ModuleGroup

    monkeypatch.setattr(ModuleGroup, "onload_", ModuleGroup.onload_)  # --serial-copies replaces it for the process
    report = _e2e(tmp_path, "--rows", "sd3.5-large/8/fp8_e4m3/auto", "--repeat", "2", "--serial-copies",
                  "--switch-cap", "0")
    capped = report["e2e"]["rows"]["sd3.5-large cap=8.0 fp8_e4m3 auto serial-copies"]
    assert capped["plan"]["transformer"]["mode"] == "stream"
    assert capped["repeats_equal"] and capped["repeat_drifts"] == [capped["drift"]] and 0 < capped["drift"] < 0.2
    assert set(capped["encode_drift"]) == {"positive.embeds", "positive.pooled", "negative.embeds", "negative.pooled"}
    assert all(value == 0.0 for value in capped["encode_drift"].values())
    report = _e2e(tmp_path, "--rows", "sd3.5-large/8/fp8_e4m3/auto", "--reuse-reference", "--switch-cap", "0")
    assert list(report["e2e"]["rows"]) == ["sd3.5-large cap=8.0 fp8_e4m3 auto"]
    assert report["e2e"]["rows"]["sd3.5-large cap=8.0 fp8_e4m3 auto"]["drift"] == capped["drift"]


def test_rows_none_leaves_the_switch_test_alone():
    from types import SimpleNamespace

    assert gpu_memory.e2e_rows(SimpleNamespace(rows="none")) == []


def test_bad_rows_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="model/cap/storage/plan"):
        _e2e(tmp_path, "--rows", "flux-dev/12/fp8")
    with pytest.raises(SystemExit, match="unknown rows"):
        _e2e(tmp_path, "--rows", "flux-dev/12/fp4/auto")


def test_a_failed_row_keeps_its_plan_and_the_stage_it_failed_in(tmp_path, monkeypatch):
    """The first GPU run's capped rows kept only their error: not the plan, nor where it failed."""
    import nodes.sampling

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 46.00 MiB")

    monkeypatch.setattr(nodes.sampling, "Sampler", out_of_memory)
    report = _e2e(tmp_path, "--rows", "flux-dev/12/fp8_e4m3/auto", "--switch-cap", "0")
    row = report["e2e"]["rows"]["flux-dev cap=12.0 fp8_e4m3 auto"]
    assert row["error"].startswith("OutOfMemoryError") and row["failed_stage"] == "warmup sample"
    assert row["plan"]["transformer"]["mode"] == "stream" and any(line.startswith("t5:") for line in row["plan_lines"])
    assert list(row["stages"]) == ["build", "plan", "place", "warmup encode"]


# The GPU rows' plans, sized on the meta device: what each stage of a row holds on the GPU,
# measured from the modules, fits the budget (before: kept blocks sized as 57 equal ones at one
# byte per parameter; fp8 Flux-dev under 12 GiB kept 12.8 GiB of blocks for a 9.5 GiB estimate).
GPU_ROWS = [("flux-dev", 12, "fp8_e4m3"), ("flux-dev", 8, "fp8_e4m3"), ("flux-dev", 12, "bf16"),
            ("sd3.5-large", 16, "bf16")]


def _on_gpu(module, placement) -> tuple[int, int]:
    """(bytes kept between uses, bytes while it runs) of a placed module, measured from it."""
    from app.models.memory import kept_blocks, module_bytes
    from app.models.residency import stack_of, stream_root

    total = module_bytes(module)
    if placement.mode in ("resident", "model"):
        return (total if placement.resident_bytes else 0), total
    sizes = [module_bytes(b) for b in stack_of(stream_root(module))]
    resident = set(kept_blocks(len(sizes), placement.resident_blocks))
    kept = total - sum(sizes) + sum(s for i, s in enumerate(sizes) if i in resident)
    streamed = [s for i, s in enumerate(sizes) if i not in resident]
    in_flight = max(a + b for a, b in zip(streamed, streamed[1:], strict=False)) if len(streamed) > 1 else sum(streamed)
    return (kept if placement.resident_bytes else 0), kept + in_flight


@pytest.mark.parametrize("name,cap,storage", GPU_ROWS)
def test_the_gpu_rows_plans_fit_what_each_stage_holds(name, cap, storage):
    from app.models.memory import GIB

    parts = gpu_memory.build_e2e(name, torch.device("meta"), False, storage)
    *_, named = gpu_memory.handles_e2e(parts, torch.device("cpu"))
    memory = {"vram": cap * GIB, "reserve": GIB, "size": (1024, 1024)}
    plan = gpu_memory.plan_e2e(named, parts["family"], "auto", memory, torch.device("cpu")).by_name()
    held = {n: _on_gpu(module, plan[n]) for n, (_, module) in named.items()}
    kept = sum(between for between, _ in held.values())
    encoders = [n for n in named if n not in ("transformer", "vae")]
    stages = {
        "encode": kept + sum(held[n][1] - held[n][0] for n in encoders) + max(plan[n].work_bytes for n in encoders),
        "sample": kept + held["transformer"][1] - held["transformer"][0] + plan["transformer"].work_bytes,
        "decode": kept + held["vae"][1] - held["vae"][0] + plan["vae"].work_bytes,
    }
    assert max(stages.values()) <= (cap - 1) * GIB, {k: round(v / GIB, 2) for k, v in stages.items()}
    assert plan["transformer"].mode == "stream"


def test_an_allocator_snapshot_is_cut_to_what_a_device_run_can_return(tmp_path, monkeypatch):
    """--memory-history on a failed GPU row: the snapshot is trimmed (oldest events first, then
    stack frames) under the limit, and the live bytes are summed by the place that made them."""
    frame = {"filename": "/site-packages/diffusers/hooks/group_offloading.py", "line": 208,
             "name": "_transfer_tensor_to_device"}
    torch_frame = {"filename": "/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_apply"}
    blocks = [{"state": "active_allocated", "size": 3 << 30, "frames": [torch_frame, frame] * 20},
              {"state": "active_allocated", "size": 1 << 30, "frames": []},
              {"state": "inactive", "size": 5 << 30, "frames": [frame]}]
    events = [{"action": "alloc", "addr": i, "frames": [{**frame, "line": i + j} for j in range(20)]} for i in range(400)]
    snapshot = {"segments": [{"blocks": blocks}], "device_traces": [events]}
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: snapshot)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kwargs: None)
    info = gpu_memory.dump_snapshot(tmp_path / "oom.pickle", limit=40_000)
    assert (tmp_path / "oom.pickle").stat().st_size == info["bytes"] <= 40_000 and 0 < info["events_kept"] < 400
    assert info["live_by_place"] == [{"where": "group_offloading.py:208 _transfer_tensor_to_device", "gib": 3.0},
                                     {"where": "unknown", "gib": 1.0}]
    tiny = gpu_memory.dump_snapshot(tmp_path / "tiny.pickle", limit=100)  # no events, no frames: as small as it gets
    assert tiny["events_kept"] == 0 and tiny["live_by_place"] == info["live_by_place"]
    assert "frames" not in blocks[0]


def test_profiled_rows_under_an_alloc_conf_on_cpu(tmp_path, monkeypatch):
    """--profile profiles sampling steps after the timed image (on CPU: the host side only, the
    device side skipped explicitly); --alloc-conf (what the row's allocator read),
    --share-copy-stream, --fast-cast and --prefix-resident are recorded in the row and its label."""
    from app.models import memory, residency, storage

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # main sets all three; restored afterwards
    monkeypatch.setattr(residency, "SHARE_COPY_STREAM", False)
    monkeypatch.setattr(storage, "FAST_CAST", False)
    monkeypatch.setattr(memory, "SPREAD_RESIDENT", True)
    report = _e2e(tmp_path, "--rows", "flux-dev/none/bf16/resident", "--switch-cap", "0", "--profile",
                  "--alloc-conf", "expandable_segments:True", "--share-copy-stream", "--fast-cast", "--prefix-resident")
    assert report["alloc_conf"] == "expandable_segments:True"
    row = report["e2e"]["rows"]["flux-dev cap=none bf16 resident alloc=expandable_segments:True shared-stream fast-cast "
                                "prefix-resident"]
    assert "error" not in row and row["finite"] and row["alloc_conf"] == "expandable_segments:True"
    assert row["share_copy_stream"] is True and row["fast_cast"] is True and storage.FAST_CAST is True
    assert row["spread_resident"] is False and memory.SPREAD_RESIDENT is False
    profile = row["profile"]
    assert profile["steps"] == 3 and profile["host_ms"] > 0 and "skipped" in profile["device"]
    assert set(profile["host_calls"]) == set(gpu_memory.HOST_CALLS)
    assert list(row["stages"])[-1] == "profile"


def test_isolated_rows_get_the_alloc_conf_and_the_options(monkeypatch):
    """A row's subprocess is where the alloc conf must take effect (its allocator starts there)."""
    import subprocess
    from types import SimpleNamespace

    seen = {}

    def run(command, **kwargs):
        seen.update(command=command, env=kwargs["env"])
        return SimpleNamespace(returncode=1, stderr="stopped", stdout="")

    monkeypatch.setattr(subprocess, "run", run)
    args = SimpleNamespace(steps=1, reserve=1.0, out="x.json", tiny=True, memory_history=False, profile=True,
                           alloc_conf="expandable_segments:True", share_copy_stream=True, fast_cast=True,
                           prefix_resident=True, serial_copies=True, repeat=2)
    row = gpu_memory.run_row_isolated(("flux-dev", 12.0, "fp8_e4m3", "auto"), args, 5)
    assert {"--profile", "--share-copy-stream", "--fast-cast", "--prefix-resident", "--serial-copies"} <= set(seen["command"])
    assert seen["command"][seen["command"].index("--repeat") + 1] == "2"
    assert seen["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert row["error"].startswith("exit 1")


def _event(name, start, end, device="CPU", parent=None):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), cpu_parent=parent,
                           device_type=getattr(torch.autograd.DeviceType, device), is_user_annotation=False)


def test_step_profile_measures_copy_overlap_idle_and_host_calls():
    """The CUDA side of --profile on a made-up timeline (µs), two steps: one H2D copy half under
    a GEMM (20 of its 50 µs), one pageable copy alone; what ran before the window is not counted."""
    from bench import gpu_speed

    window = _event(gpu_speed.STEPS_LABEL, 0, 200)
    events = [window, _event("gemm_kernel", -20, -5, "CUDA"), _event("gemm_kernel", 10, 60, "CUDA"),
              _event("Memcpy HtoD (Pinned -> Device)", 40, 90, "CUDA"), _event("flash_fwd_kernel", 100, 150, "CUDA"),
              _event("Memcpy HtoD (Pageable -> Device)", 160, 170, "CUDA"),
              _event("cudaStreamSynchronize", 95, 99, parent=window), _event("cudaFree", 120, 125, parent=window),
              _event("cudaFree", 250, 260, parent=None)]  # after the window
    row = gpu_memory.step_profile(events, 2, cuda=True)
    assert row["h2d_ms"] == pytest.approx(0.03) and row["h2d_overlapped"] == pytest.approx(20 / 60)
    assert row["wall_ms"] == pytest.approx(0.085) and row["idle_ms"] == pytest.approx(0.015)
    assert row["busy_ms_by_kind"] == pytest.approx({"h2d": 0.03, "gemm": 0.025, "attention": 0.025})
    assert row["pageable_h2d"] == 0.5 and row["host_calls"]["cudaFree"]["per_step"] == 0.5
    assert row["host_calls"]["cudaStreamSynchronize"] == pytest.approx({"per_step": 0.5, "ms": 0.002})
    assert row["host_syncs"]["per_step"] == 0.5 and row["host_ms"] == 0.1
    assert gpu_memory.overlap([(0, 10), (20, 30)], [(5, 25)]) == 10 and gpu_memory.covered([(0, 10), (5, 12)]) == 12
