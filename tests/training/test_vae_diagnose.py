"""vae_diagnose (training/vae_diagnose.py): the V3-style breakdown on ground truth and on known damage."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import train_video as tv
from training import vae_diagnose as vd
from training import video_world as vw
from training.train import HELD_OUT_SEED


def _clips(n=6, seed=5):
    batch = vw.sample_clips(n, seed=seed)
    return batch, vw.render_clips(batch).permute(0, 1, 3, 4, 2)  # (n, T, H, W, 3) uint8


def _blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (..., H, W, 3) uint8 frames."""
    k = torch.exp(-torch.arange(-8, 9).float() ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    x = frames.float().movedim(-1, -3).reshape(-1, 1, *frames.shape[-3:-1])
    x = F.conv2d(F.pad(x, (8, 8, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, 8, 8), mode="replicate"), k.view(1, 1, -1, 1))
    return x.view(*frames.shape[:-3], 3, *frames.shape[-3:-1]).movedim(-3, -1).round().clamp(0, 255).to(torch.uint8)


def test_profile_width_of_a_linear_ramp():
    centres = np.arange(-vd.PROFILE_RANGE, vd.PROFILE_RANGE, vd.PROFILE_BIN) + vd.PROFILE_BIN / 2
    p = np.clip(0.5 - (centres - 0.5) / 2.0, 0, 1)  # 1 -> 0 over 2 px, centred 0.5 px outside the edge
    w = vd.profile_width(p * 10, np.full_like(p, 10))
    assert w == {"width_10_90": 1.6, "offset_50": 0.5}


def test_ground_truth_is_clean():
    batch, gt = _clips()
    r = vd.diagnose(gt, batch)
    assert r["scores"]["object_accuracy"] == 1.0 and r["i2v_at_least_30db"] == 1.0
    assert r["wrong_objects"]["total"] == 0 and set(r["shape_rule_by_frame"]) == {1.0}
    assert r["edge"]["recon"] == r["edge"]["renders"] and r["edge"]["renders"]["width_10_90"] < 1.0
    assert r["lost_object_pixels"]["total_lost_fraction"] == 0.0


def test_blur_widens_edges_and_loses_vertex_pixels_first():
    batch, gt = _clips()
    r = vd.diagnose(_blur(gt, 1.0), batch)
    assert 2.3 < r["edge"]["recon"]["width_10_90"] < 3.0 and abs(r["edge"]["recon"]["offset_50"]) < 0.2
    lost = r["lost_object_pixels"]
    assert lost["vertex"]["lost_rate"] > 1.5 * lost["edge"]["lost_rate"] and lost["inside"]["lost_rate"] == 0.0


def test_damage_on_frame_0_only_is_counted_as_frame_0_only():
    batch, gt = _clips(8, seed=11)
    rec = gt.clone()
    rec[:, 0] = _blur(gt[:, 0], 3.0)  # rounds squares' corners and triangles on frame 0
    r = vd.diagnose(rec, batch)
    w = r["wrong_objects"]
    assert w["frame0_only"] > 0 and w["last_only"] == 0 and w["both"] == 0
    assert r["shape_rule_by_frame"][1:] == [1.0] * (vw.FRAMES - 1) and r["shape_rule_by_frame"][0] < 1.0
    assert r["edge"]["recon_frame0"]["width_10_90"] > r["edge"]["recon"]["width_10_90"]


def test_command_reads_its_cache_of_held_out_reconstructions(tmp_path, capsys):
    batch, _ = tv.render_batch(4, torch.Generator().manual_seed(HELD_OUT_SEED), torch.device("cpu"))
    path = str(tmp_path / "rec.npz")
    np.savez_compressed(path, videos=vw.render_clips(batch).permute(0, 1, 3, 4, 2).numpy())
    out = str(tmp_path / "r.json")
    r = vd.main(["no-model-needed", "--n", "4", "--cache", path, "--json", out])
    assert r["scores"]["object_accuracy"] == 1.0 and json.load(open(out)) == json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        vd.main(["no-model-needed", "--n", "5", "--cache", path])
