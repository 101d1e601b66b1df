"""bench/cache.py helpers: image metrics, target check, the Pareto plot (no model runs)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from bench import cache as bench


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8)
    assert bench.psnr(a, a) == 100.0 and abs(bench.ssim(a, a) - 1.0) < 1e-9
    noisy = (a.int() + torch.randint(-3, 4, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    assert 35 < bench.psnr(noisy, a) < 50 and 0.5 < bench.ssim(noisy, a) < 1.0
    assert bench.ssim(torch.zeros_like(a), a) < 0.1


def _report():
    runs = [{"method": m, "label": f"{m}(x)", "speedup": s, "psnr": p, "ssim": 0.99, "prompt_accuracy_drop": d}
            for m, s, p, d in (("fora", 3.0, 41.0, 0.0), ("teacache", 2.7, 29.0, 0.0), ("fbc", 1.5, 55.0, 0.0),
                               ("taylorseer", 4.0, 35.0, 0.05))]
    return {"steps": {"50": {"runs": runs}, "28": {"runs": runs[:2]}}}


def test_targets_pick_the_fastest_run_within_the_quality_bounds():
    targets = bench.check_targets(_report())
    assert targets["50"]["met"] and targets["50"]["best"]["label"] == "fora(x)"
    assert targets["28"]["met"] and targets["28"]["best"]["speedup"] == 3.0


def test_pareto_png(tmp_path):
    path = tmp_path / "pareto.png"
    bench.pareto_png(_report(), path)
    with Image.open(path) as img:
        assert img.size[0] == 2 * 560 and img.getextrema() != ((255, 255), (255, 255), (255, 255))


def test_pareto_front_marks_the_undominated_rows():
    rows = [{"speedup": 2.0, "rel_l2": 0.01}, {"speedup": 1.5, "rel_l2": 0.02}, {"speedup": 3.0, "rel_l2": 0.05},
            {"error": "boom"}]
    bench.pareto_front(rows)
    assert [r.get("pareto") for r in rows] == [True, False, True, None]


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_video_rows_on_tiny_models():
    result = bench.video_family("wan", torch.device("cpu"), torch.float32, tiny=True, steps=4,
                                settings=[("fora", {"interval": 2}), ("pab", {"start": 0.0, "end": 1.0}), ("fora", {"nope": 1})])
    fora, pab, bad = result["runs"]
    assert fora["skipped_calls"] > 0 and fora["predicted_speedup"] > 1 and 0 < fora["rel_l2"] < 0.2
    assert pab["attention_reused"] > 0 and pab["blocks_skipped"] == 0
    assert "error" in bad and result["tokens"] == 5 * 8 * 8 and result["uncached_s"] > 0
