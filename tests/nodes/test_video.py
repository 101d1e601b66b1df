"""Video I/O nodes: save in every format with the workflow embedded, load with trim/stride,
frames <-> video, and size validation of EmptyVideoLatent before anything runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from app.core import paths
from app.core.executor import Engine
from app.core.media import FORMATS, Video, read_video, read_workflow, write_video
from app.core.workflow import Workflow, errors
from app.models import families

W, H, N, FPS = 24, 16, 7, 8.0


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    folder = tmp_path / "input"
    folder.mkdir()
    monkeypatch.setitem(paths._overrides, "inputs", folder)
    monkeypatch.setenv("DITGRAPH_TEMP", str(tmp_path / "temp"))
    ramp = torch.linspace(0, 1, N)[:, None, None, None].expand(N, H, W, 3).clone()  # frame i is grey level i/(N-1)
    write_video(folder / "clip.mp4", Video(ramp, FPS))
    return folder


def _doc(nodes: dict) -> dict:
    return {"format": "ditgraph/workflow", "version": 1, "nodes": nodes}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_save_video_reopens_with_its_frames_and_workflow(fmt, inputs, tmp_path):
    nodes = {
        "load": {"type": "LoadVideo", "inputs": {"video": "clip.mp4"}},
        "frames": {"type": "VideoFrames", "inputs": {"video": {"from": ["load", "video"]}}},
        "video": {"type": "FramesToVideo", "inputs": {"images": {"from": ["frames", "images"]}, "fps": FPS}},
        "save": {"type": "SaveVideo", "inputs": {"video": {"from": ["video", "video"]}, "filename_prefix": "clips/out",
                                                 "format": fmt}},
    }
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(_doc(nodes)).raise_for_status()
    assert set(result.ui["save"]) == {"videos"}  # a video output, not an image one
    entry = result.ui["save"]["videos"][0]
    path = tmp_path / "out" / "clips" / entry["filename"]
    assert entry["filename"] == f"out_00001.{fmt}" and (entry["frames"], entry["width"], entry["height"]) == (N, W, H)
    poster = paths.temp_dir() / entry["poster"]["subfolder"] / entry["poster"]["filename"]
    assert entry["poster"]["type"] == "temp" and poster.name == "out_00001_00001.png"
    with Image.open(poster) as still:  # the first frame (black: the clip ramps up from grey level 0)
        assert still.size == (W, H) and still.convert("L").getextrema()[1] < 8
    video = read_video(path)
    assert tuple(video.frames.shape) == (N, H, W, 3)
    assert video.fps == pytest.approx(FPS, rel=0.05)  # GIF stores 10 ms units
    levels = video.frames.mean(dim=(1, 2, 3))
    assert torch.all(levels[1:] > levels[:-1])  # frames kept in order
    assert read_workflow(path)["nodes"]["save"]["inputs"]["format"] == fmt


def test_load_video_trims_and_strides(inputs, tmp_path):
    nodes = {
        "load": {"type": "LoadVideo", "inputs": {"video": "clip.mp4", "start_frame": 1, "frame_count": 3, "stride": 2}},
        "frames": {"type": "VideoFrames", "inputs": {"video": {"from": ["load", "video"]}}},
        "last": {"type": "ExtractFrame", "inputs": {"video": {"from": ["load", "video"]}, "index": -1}},
    }
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(_doc(nodes), targets=["frames", "last"]).raise_for_status()
    images, fps, count = (result.output("frames", i) for i in range(3))
    assert count == 3 and tuple(images.shape) == (3, H, W, 3) and fps == pytest.approx(FPS / 2)
    full = read_video(inputs / "clip.mp4")
    assert torch.allclose(images, full.frames[1:6:2])  # frames 1, 3, 5
    assert torch.equal(result.output("last"), images[-1:])


def test_load_video_stays_in_the_input_folder(inputs, tmp_path):
    doc = _doc({"load": {"type": "LoadVideo", "inputs": {"video": "../secret.mp4"}},
                "frames": {"type": "VideoFrames", "inputs": {"video": {"from": ["load", "video"]}}}})
    problems = errors(Engine(device="cpu").validate(Workflow.from_dict(doc)))
    assert any(p.node == "load" and p.input == "video" for p in problems)


@pytest.mark.parametrize("inputs_, bad", [({"frames": 10}, "frames"), ({"width": 20}, "width"), ({"frames": 9}, None)])
def test_empty_video_latent_sizes_are_validated_before_running(inputs_, bad):
    nodes = {"ckpt": {"type": "CheckpointLoader", "inputs": {"checkpoint": "x"}},
             "empty": {"type": "EmptyVideoLatent", "inputs": {"model": {"from": ["ckpt", "model"]}, "width": 32,
                                                              "height": 32, **inputs_}}}
    problems = [p for p in errors(Engine(device="cpu").validate(Workflow.from_dict(_doc(nodes)))) if p.node == "empty"]
    assert [p.input for p in problems] == ([bad] if bad else [])


def test_family_size_rules():
    ltx = families.get("ltx")
    config = SimpleNamespace(patch_size=1, patch_size_t=1, in_channels=8)
    assert ltx.size_problem(config, 64, 64, 9) is None
    assert "8 plus 1" in ltx.size_problem(config, 64, 64, 13)  # 4n+1 passes validation, not LTX's 8n+1
    assert "multiples of 32" in ltx.size_problem(config, 48, 64, 9)
    assert ltx.latent_shape(config, 2, 64, 96, 17) == (2, 8, 3, 3, 2)
    wan = families.get("wan")
    wan_config = SimpleNamespace(patch_size=(1, 2, 2), in_channels=36, out_channels=16)
    assert wan.latent_shape(wan_config, 1, 832, 480, 81) == (1, 16, 21, 60, 104)
    assert wan.seq_len(wan_config, (21, 60, 104)) == 21 * 30 * 52


def test_ltx_frame_rate_sets_the_time_scale_of_positions():
    ltx = families.get("ltx")
    handle = SimpleNamespace(config=SimpleNamespace(patch_size=1, patch_size_t=1), dtype=torch.float32,
                             cond_tensors=lambda cond: (torch.zeros(1, 3, 4), None, torch.ones(1, 3)))
    x = torch.zeros(1, 8, 2, 2, 3)
    default = ltx.native_kwargs(handle, x, torch.zeros(1), SimpleNamespace(extras={}))
    slow = ltx.native_kwargs(handle, x, torch.zeros(1), SimpleNamespace(extras={"frame_rate": 8.0}))
    assert default["rope_interpolation_scale"] == (8 / 25, 32, 32) and slow["rope_interpolation_scale"][0] == 1.0
    assert tuple(default["hidden_states"].shape) == (1, 2 * 2 * 3, 8)  # packed tokens (F*H*W, C)
    # contiguous, as the pipeline's: a strided view would send proj_in down a batched-matmul path
    assert default["hidden_states"].is_contiguous()
    assert (default["num_frames"], default["height"], default["width"]) == (2, 2, 3)
