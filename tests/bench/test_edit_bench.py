"""bench/edit.py stays runnable: a 2-edit, 2-step run on whatever shapes-dit is available
(the bundled weights, else a random-weight model of the same config). No timing asserted."""

from __future__ import annotations

import json

import torch


def test_edit_bench_smoke(tmp_path):
    from bench import edit as bench

    threads = torch.get_num_threads()
    try:
        data = bench.main(["--n", "2", "--steps", "2", "--threads", "1", "--out", str(tmp_path / "edit.json"),
                           "--methods", "inpaint_cell,rf_edit_masked,flowedit"])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "edit.json").read_text())
    assert written["n"] == 2 and set(written["methods"]) == {"vae_reconstruction", "inpaint_cell", "rf_edit_masked", "flowedit"}
    for row in written["methods"].values():
        assert 0 <= row["success"] <= 1 and row["psnr_outside_mean"] > 0
    assert data["best"]["method"] in written["methods"]


def test_edit_cases_change_one_attribute():
    from bench.edit import make_cases

    cases, images = make_cases(8, seed=3)
    assert images.shape == (8, 128, 128, 3) and images.dtype == torch.uint8
    for i, case in enumerate(cases):
        before, after = case.source.objects[case.index], case.target.objects[case.index]
        if case.kind == "colour":
            assert after.colour != before.colour and after.colour != case.source.background and after.shape == before.shape
        else:
            assert after.shape != before.shape and after.colour == before.colour
        assert case.kind == ("colour" if i % 2 == 0 else "shape")
        others = [o for k, o in enumerate(case.target.objects) if k != case.index]
        assert others == [o for k, o in enumerate(case.source.objects) if k != case.index]
