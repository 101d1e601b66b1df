"""training/train_video_turbo.py: the evaluator filter, the reflow loss on image-to-video pairs, the
8-step sigma grid, and the CPU smoke run (a loadable guidance-free student that resumes)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.shapes_video import save_tiny_shapes_video


def _keep_one_object(item) -> bool:
    """A stand-in scorer (module level: the worker processes unpickle it by name)."""
    return " and " not in item[1]


def _reject_all(item) -> bool:
    return False


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_shapes_video(tmp_path_factory.mktemp("teacher") / "shapes-video")


@pytest.fixture(scope="module")
def student(tiny_base, tmp_path_factory):
    from training import train_video_turbo as tvt

    out = tmp_path_factory.mktemp("student") / "shapes-video"
    assert tvt.main(["--tiny", "--steps", "2", "--base", str(tiny_base), "--out", str(out)]) == 0
    return out


def test_the_filter_scores_ground_truth_right_and_a_blank_clip_wrong():
    from training import train_video_turbo as tvt
    from training import video_world as vw

    batch = vw.sample_clips(2, torch.Generator().manual_seed(3), torch.device("cpu"))
    clips = vw.render_clips(batch).permute(0, 1, 3, 4, 2).numpy()
    captions = vw.captions(batch)
    assert tvt._score((clips[0], captions[0])) and tvt._score((clips[1], captions[1]))
    assert not tvt._score((clips[0] * 0 + 255, captions[0]))  # all white: no object anywhere


def test_reflow_loss_skips_given_first_frames():
    """Image-to-video pairs: frame 0 is the clean given latent with timestep 0 and carries no loss, so the
    noise drawn for it changes nothing; for text-to-video pairs it does."""
    from diffusers import WanTransformer3DModel

    from training import train_video as tv
    from training import train_video_turbo as tvt

    torch.manual_seed(0)
    model = WanTransformer3DModel(**tv.TINY_TRANSFORMER).eval()
    z, x0 = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    hidden, s = torch.randn(2, 40, 384), torch.tensor([0.3, 0.8])
    other = z.clone()
    other[:, :, 0] += 1.0
    for given, same in ((torch.tensor([True, True]), True), (torch.tensor([False, False]), False)):
        a, b = (tvt.reflow_loss(model, noise, x0, hidden, given, s) for noise in (z, other))
        assert torch.equal(a, b) is same, given


def test_half_the_sigmas_sit_on_the_8_step_grid():
    from training import sample as sampler
    from training import train_video_turbo as tvt
    from training.train_turbo import draw_sigmas

    grid = tvt.step_points(torch.device("cpu"))
    assert torch.allclose(grid, sampler.sigmas(8, 3.0)[:-1]) and len(grid) == 8
    s = draw_sigmas(4000, grid, 0.5, torch.Generator().manual_seed(0))
    on_grid = (s[:, None] == grid[None]).any(1).float().mean()
    assert 0.45 < on_grid < 0.55 and bool(((s > 0) & (s <= 1)).all())


def test_cfg_1_sampling_is_the_conditional_pass_alone():
    """train_video.sample_latents at cfg 1 (the student's) skips the unconditional pass and equals CFG at 1."""
    from diffusers import WanTransformer3DModel

    from training import train_video as tv

    torch.manual_seed(0)
    model = WanTransformer3DModel(**tv.TINY_TRANSFORMER).eval()
    hidden, uncond = torch.randn(1, 40, 384), torch.randn(1, 40, 384)
    calls = []
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(len(kwargs["hidden_states"])), with_kwargs=True)
    fast = tv.sample_latents(model, hidden, uncond, (4, 2, 4, 4), steps=3, cfg=1.0)
    assert calls == [1, 1, 1]
    guided = tv.sample_latents(model, hidden, uncond, (4, 2, 4, 4), steps=3, cfg=1.0 + 1e-7)
    assert torch.allclose(fast, guided, atol=1e-5)


def test_student_folder_record_and_card(student, tiny_base):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    manifest = json.loads((student / "ditgraph.json").read_text())
    assert manifest["family"] == "shapes-video"
    assert manifest["defaults"]["cfg"] == 1.0 and manifest["defaults"]["guidance_distilled"] is True
    state = json.loads((student / "train_state.json").read_text())
    assert state["tiny"] is True  # the teacher's record is kept
    record = state["distillation"]
    assert record["steps"] == 2 and len(record["runs"]) == 1
    assert record["runs"][0]["pool"]["generated"] == record["runs"][0]["pool"]["kept"] == 6  # --tiny keeps all
    assert [(r["model"], r["mode"], r["steps"]) for r in record["eval"]] == [
        ("student", "t2v", 8), ("student", "t2v", 28), ("student", "i2v", 8), ("teacher", "t2v", 8)]
    assert (student / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    trained = WanTransformer3DModel.from_pretrained(student / "transformer")
    teacher = WanTransformer3DModel.from_pretrained(tiny_base / "transformer")
    saved = load_file(student / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), teacher.parameters(), strict=True))
    card = (student / "README.md").read_text()
    assert "guidance-distilled" in card and "## Distillation" in card and "6 kept" in card


def test_resume_continues_the_record(student, tiny_base, tmp_path):
    from training import train_video_turbo as tvt

    again = tmp_path / "again"
    assert tvt.main(["--tiny", "--steps", "1", "--base", str(tiny_base), "--resume", str(student),
                     "--out", str(again)]) == 0
    record = json.loads((again / "train_state.json").read_text())["distillation"]
    assert record["steps"] == 3 and [r["steps"] for r in record["runs"]] == [2, 1]


def test_the_pool_keeps_only_what_the_scorer_passes(tiny_base, tmp_path, monkeypatch):
    from training import train_video_turbo as tvt

    monkeypatch.setattr(tvt, "_score", _keep_one_object)
    out = tmp_path / "filtered"
    assert tvt.main(["--tiny", "--keep", "prompt", "--pool", "12", "--p-two", "0.5", "--steps", "1",
                     "--base", str(tiny_base), "--out", str(out)]) == 0
    pool = json.loads((out / "train_state.json").read_text())["distillation"]["runs"][0]["pool"]
    assert pool["generated"] == 12 and 0 < pool["kept"] < 12, pool

    monkeypatch.setattr(tvt, "_score", _reject_all)
    with pytest.raises(SystemExit, match="rejected every teacher clip"):
        tvt.main(["--tiny", "--keep", "prompt", "--steps", "1", "--base", str(tiny_base), "--out", str(tmp_path / "none")])
