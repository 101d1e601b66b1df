"""shapes-video through the product: a tiny random model in train_video.py's own layout runs the
shipped workflows (graphs/shapes-t2v, shapes-i2v, shapes-t2v-cache) and matches train_video's
sampler (relative L2 <= 1e-4, CPU fp32); the MP4 has the right frames, size and fps; the video
evaluator scores what the workflows save."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from app.core.media import read_video
from app.models import accelerators as hooks
from tests.fixtures.shapes_video import T2V_PROMPT, load_reference, save_tiny_shapes_video
from tests.fixtures.terminal import run_cli_on_a_terminal
from tests.fixtures.tiny_models import save_family

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
STEPS = 3


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    """The shipped checkpoint names, held by tiny random models (a 32 px shapes-dit draws the first frame)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_shapes_video(root / "checkpoints" / "shapes-video")
    save_family("shapes-dit", root / "checkpoints" / "shapes-dit")
    return root


@pytest.fixture(scope="module")
def reference(models_root):
    """train_video's own sampler, models and text encoding."""
    from training import text as textenc
    from training import train_video as tv

    model, vae = load_reference(models_root / "checkpoints" / "shapes-video")
    tok, te = textenc.load_text_encoder()
    hidden, _ = textenc.encode_prompts(tok, te, [T2V_PROMPT])
    uncond, _ = textenc.encode_prompts(tok, te, [""])

    def run(shape, first=None, steps=STEPS, zero_star=False, cfg=1.0):
        """cfg 1: the shipped graphs' (shapes-video is guidance-distilled)."""
        return tv.sample_latents(model, hidden.float(), uncond.float(), shape, steps, cfg, 3.0, 0, first, zero_star)

    return run, vae


@pytest.fixture
def engine(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", models_root)
    monkeypatch.setitem(paths._overrides, "outputs", tmp_path / "out")
    return Engine(device="cpu", output_dir=tmp_path / "out")


def graph(name: str, size: int = 32, frames: int = 5, steps: int = STEPS) -> dict:
    """A shipped workflow at a small size and few steps (its models are the tiny ones above)."""
    document = copy.deepcopy(json.loads((GRAPHS / f"{name}.json").read_text()))
    for node in document["nodes"].values():
        if node["type"] in ("EmptyVideoLatent", "ImageToVideo"):
            node["inputs"].update(width=size, height=size, frames=frames)
        if node["type"] == "EmptyLatent":
            node["inputs"].update(width=32, height=32)
        if node["type"] == "Sampler":
            node["inputs"]["steps"] = steps
    return document


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_shipped_video_graphs_use_the_manifest_defaults():
    manifest = json.loads((GRAPHS.parent / "models" / "shapes-video" / "ditgraph.json").read_text())["defaults"]
    assert (manifest["cfg"], manifest["guidance_distilled"]) == (1.0, True)
    for name in ("shapes-t2v", "shapes-i2v", "shapes-t2v-cache"):
        nodes = json.loads((GRAPHS / f"{name}.json").read_text())["nodes"]
        video = [n for n in nodes.values() if n["type"] in ("EmptyVideoLatent", "ImageToVideo")][0]["inputs"]
        assert (video["width"], video["height"], video["frames"]) == (128, 128, 17), name
        sampler = [n for n in nodes.values() if n["type"] == "Sampler"][-1]["inputs"]
        assert (sampler["steps"], sampler["cfg"], sampler["shift"]) == (manifest["steps"], manifest["cfg"], 0.0), name
        assert [n for n in nodes.values() if n["type"] == "VAEDecodeVideo"][0]["inputs"]["fps"] == 8.0


def test_t2v_matches_train_video_and_saves_the_clip(engine, reference, tmp_path):
    """Full size (17 x 128 x 128): the latents are train_video's, the MP4 reopens as 17 frames at
    8 fps, and the evaluator scores it."""
    run, _ = reference
    result = engine.run(graph("shapes-t2v", 128, 17), targets=["1", "5", "7"]).raise_for_status()
    latents = result.output("5").samples
    assert latents.shape == (1, 4, 5, 16, 16)
    assert result.output("1").family == "shapes-video"
    error = rel_l2(latents, run(tuple(latents.shape[1:])))
    assert error <= 1e-4, f"relative L2 to train_video.sample_latents {error:.2e}"
    saved = result.ui["7"]["videos"][0]
    assert (saved["frames"], saved["fps"], saved["width"], saved["height"]) == (17, 8.0, 128, 128)
    video = read_video(tmp_path / "out" / saved["filename"])
    assert tuple(video.frames.shape) == (17, 128, 128, 3) and video.fps == 8.0


@pytest.mark.parametrize("zero_star", [False, True])
def test_cfg_and_cfg_zero_star_match_train_video(engine, reference, zero_star):
    """The engine's CFG at 4 (a CFG checkpoint such as the tiny one here) and CFG-Zero* (the projection
    per clip, no move on step 0) against train_video's own."""
    run, _ = reference
    document = graph("shapes-t2v")
    document["nodes"]["5"]["inputs"].update(cfg=4.0, guidance="cfg_zero_star" if zero_star else "cfg")
    latents = engine.run(document, targets=["5"]).raise_for_status().output("5").samples
    shape = tuple(latents.shape[1:])
    error = rel_l2(latents, run(shape, zero_star=zero_star, cfg=4.0))
    assert error <= 1e-4, f"relative L2 to train_video.sample_latents(cfg=4, zero_star={zero_star}) {error:.2e}"
    assert rel_l2(latents, run(shape, zero_star=not zero_star, cfg=4.0)) > 1e-3  # the two differ
    assert rel_l2(latents, run(shape)) > 1e-3  # and neither is the shipped cfg 1


@pytest.mark.parametrize("guidance", ["cfg_zero_star", "apg", "cfg++"])
def test_every_guidance_keeps_the_given_first_frame(engine, reference, guidance):
    """CFG-Zero* scales and zeroes the velocity, APG projects it: the held frame must survive both."""
    from training import train_video as tv

    _, vae = reference
    document = graph("shapes-i2v")
    document["nodes"]["11"]["inputs"].update(guidance=guidance, cfg=6.0)
    result = engine.run(document, targets=["6", "11"]).raise_for_status()
    first = tv.encode(vae, result.output("6").permute(0, 3, 1, 2)[:, :, None] * 2 - 1)[:, :, 0]
    assert torch.allclose(result.output("11").samples[:, :, 0], first, atol=1e-5), guidance


def test_i2v_holds_the_shapes_dit_frame_and_matches_train_video(engine, reference):
    from training import train_video as tv

    run, vae = reference
    result = engine.run(graph("shapes-i2v"), targets=["6", "11", "13"]).raise_for_status()
    image = result.output("6")  # shapes-dit's image, (1, 32, 32, 3) in [0, 1]
    first = tv.encode(vae, image.permute(0, 3, 1, 2)[:, :, None] * 2 - 1)[:, :, 0]
    latents = result.output("11").samples
    assert torch.allclose(latents[:, :, 0], first, atol=1e-5)  # the given frame is kept
    error = rel_l2(latents, run(tuple(latents.shape[1:]), first))
    assert error <= 1e-4, f"relative L2 to train_video.sample_latents(first=...) {error:.2e}"
    assert result.ui["13"]["videos"][0]["frames"] == 5


def test_t2v_cache_skips_blocks_and_never_skipping_is_exact(engine):
    plain = engine.run(graph("shapes-t2v", steps=6), targets=["5"]).raise_for_status().output("5").samples
    summaries: list[dict] = []
    remove = hooks.add_listener(summaries.append)
    try:
        cached = engine.run(graph("shapes-t2v-cache", steps=6), targets=["5", "7"]).raise_for_status()
        never = graph("shapes-t2v-cache", steps=6)
        never["nodes"]["8"]["inputs"]["interval"] = 1
        exact = engine.run(never, targets=["5"]).raise_for_status().output("5").samples
    finally:
        remove()
    assert summaries[0]["blocks_skipped"] > 0
    assert rel_l2(exact, plain) <= 1e-6
    assert 0 < rel_l2(cached.output("5").samples, plain) < 0.5
    assert cached.ui["7"]["videos"][0]["filename"].startswith("shapes-t2v-cache")


def test_the_evaluator_scores_the_saved_clips(engine, tmp_path):
    from PIL import Image

    from training import evaluate_video

    t2v = engine.run(graph("shapes-t2v", 128, 17, steps=1)).raise_for_status().ui["7"]["videos"][0]["filename"]
    i2v = engine.run(graph("shapes-i2v", 128, 17, steps=1), targets=["6", "13"]).raise_for_status()
    Image.fromarray((i2v.output("6")[0].clamp(0, 1) * 255).round().byte().numpy()).resize((128, 128)).save(
        tmp_path / "out" / "given.png")
    rows = [{"file": t2v, "caption": T2V_PROMPT},
            {"file": i2v.ui["13"]["videos"][0]["filename"], "caption": T2V_PROMPT, "given": "given.png"}]
    (tmp_path / "out" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = evaluate_video.evaluate_path(str(tmp_path / "out"))
    assert summary["n"] == 2 and not [s for s in summary["skipped"] if s["file"].endswith(".mp4")]
    assert 0 <= summary["object_accuracy"] <= 1 and 0 <= summary["temporal_stability"] <= 1
    assert summary["i2v_psnr_mean"] > 0


def test_ditgraph_run_shapes_t2v_by_name(models_root, tmp_path, capsys, monkeypatch):
    """`ditgraph run shapes-t2v` finds the shipped workflow by name, draws the step bar, writes an MP4."""
    code, terminal = run_cli_on_a_terminal(["run", "shapes-t2v", "--device", "cpu", "--set", "4.width=32", "--set",
                                            "4.height=32", "--set", "4.frames=5", "--set", "5.steps=2"],
                                           tmp_path, monkeypatch, models=models_root)
    assert code == 0
    assert any(re.search(r"\] 2/2", line) for line in terminal.lines() if "Sampler" in line)
    out = capsys.readouterr().out
    assert re.search(r"saved .*shapes-t2v_\d+\.mp4 \(video: 5 frames at 8 fps, 32x32\)", out), out


def test_a_folder_without_its_transformer_names_what_is_missing(models_root, tmp_path, monkeypatch):
    """The bundled folder before training ends (ditgraph.json, vae/, scheduler/): validation passes,
    loading says the transformer is missing."""
    import shutil

    root = tmp_path / "models"
    shutil.copytree(models_root / "checkpoints" / "shapes-video", root / "checkpoints" / "shapes-video",
                    ignore=shutil.ignore_patterns("transformer"))
    monkeypatch.setitem(paths._overrides, "models", root)
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(graph("shapes-t2v"))
    assert result.error and "missing transformer/" in result.error["message"]
