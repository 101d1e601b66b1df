"""train_video (training/train_video.py): per-token timesteps, i2v sampling, the --tiny smoke run."""

import json
import time

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file

from training import train_video as tv
from training import video_world as vw
from training import world


def test_token_timesteps_zero_on_given_first_frame():
    s = torch.tensor([0.5, 0.25])
    t = tv.token_timesteps(s, torch.tensor([True, False]), (2, 4, 5, 16, 16))
    assert t.shape == (2, 5 * 8 * 8)
    assert (t[0, :64] == 0).all() and (t[0, 64:] == 500).all() and (t[1] == 250).all()


def test_i2v_sampling_keeps_the_given_latent():
    model = WanTransformer3DModel(**tv.TINY_TRANSFORMER).eval()
    hidden, uncond = torch.randn(2, 40, 384), torch.zeros(1, 40, 384)
    first = torch.randn(2, 4, 16, 16)
    z = tv.sample_latents(model, hidden, uncond, (4, 5, 16, 16), steps=2, first=first)
    assert torch.equal(z[:, :, 0], first) and not torch.equal(z[:, :, 1], z[:, :, 0])
    free = tv.sample_latents(model, hidden, uncond, (4, 5, 16, 16), steps=2)
    assert not torch.equal(free[:, :, 0], first)


def test_gaussian_kl_is_per_latent_element():
    # mean 1, log-variance 0: KL = 0.5 per element. diffusers' .kl() sums dims 1-3 only, so call 1's
    # ".kl().mean() / numel" gave 0.5 / 16 for (B, 8, 5, 16, 16) latents.
    post = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 8, 5, 16, 16), torch.zeros(2, 8, 5, 16, 16)], 1))
    assert tv.gaussian_kl(post).item() == pytest.approx(0.5)


def test_fresh_vae_starts_with_a_narrow_posterior():
    # diffusers' default init gives a posterior std ~1, which drowns the encoder's signal (call 1)
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        std = tv.build_vae(tv.TINY_VAE, -6.0).encode(x).latent_dist.std
        default_std = AutoencoderKLWan(**tv.TINY_VAE).encode(x).latent_dist.std
        mean = tv.build_vae(tv.TINY_VAE, -6.0, calibrate=x).encode(x).latent_dist.mean  # unit-scale latents
    assert std.max() < 0.2 and default_std.mean() > 0.5
    assert mean.std().item() == pytest.approx(1.0, rel=1e-3)


def test_save_model_leaves_the_trained_weights_in_fp32(tmp_path):
    # saved every 150 s mid-training: converting the live module to fp16 and back rounded its weights
    vae = tv.build_vae(tv.TINY_VAE, -6.0)
    with torch.no_grad():
        vae.quant_conv.bias.fill_(1 + 1e-5)  # not representable in fp16
    tv.save_model(str(tmp_path / "m"), vae, None, {"vae_steps": 0})
    assert (vae.quant_conv.bias == 1 + 1e-5).all() and vae.quant_conv.bias.dtype == torch.float32
    saved = load_file(tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors")
    assert saved["quant_conv.bias"].dtype == torch.float16 and not (tmp_path / "m" / "transformer").exists()


def test_tiny_smoke_run_vae_only_then_transformer_then_resume(tmp_path):
    out = tmp_path / "sv"
    state = tv.main(["--tiny", "--steps", "2", "--vae-only", "--out", str(out)])
    assert state["vae_steps"] == 2 and not (out / "transformer").exists()
    vae = AutoencoderKLWan.from_pretrained(out / "vae")
    assert len(vae.config.latents_std) == vae.config.z_dim
    state = tv.main(["--tiny", "--steps", "3", "--out", str(out), "--eval-seed", "24680"])  # resumes the VAE
    assert state["dit_steps"] == 3 and state["vae_steps"] == 2
    assert {r["mode"] for r in state["final_eval"]} == {"t2v", "i2v"}
    assert {r["seed"] for r in state["final_eval"]} == {24680}  # steering evaluations keep off the held-out set
    assert "caption seed 24680: a validation seed" in (out / "README.md").read_text()
    manifest = json.loads((out / "ditgraph.json").read_text())
    assert manifest["family"] == "shapes-video" and manifest["defaults"]["frames"] == 17
    assert (out / "README.md").exists()
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert WanTransformer3DModel.from_pretrained(out / "transformer").config.num_layers == 2
    with pytest.raises(SystemExit, match="decoder-minutes"):  # the transformer depends on the encoder
        tv.main(["--tiny", "--steps", "1", "--out", str(out), "--vae-minutes", "1"])
    state = tv.main(["--tiny", "--steps", "1", "--out", str(out), "--final-cfgs", "", "--decoder-minutes", "1"])
    assert state["dit_steps"] == 4 and state["decoder_finetunes"][0]["steps"] == 1


def test_edge_weights_mark_only_pixels_near_object_edges():
    batch, _ = tv.render_batch(2, torch.Generator().manual_seed(3), torch.device("cpu"))
    w = tv.edge_weights(batch, 9.0)
    assert w.shape == (2, 1, tv.FRAMES, tv.SIZE, tv.SIZE) and set(w.unique().tolist()) == {1.0, 10.0}
    assert 0.005 < (w > 1).float().mean() < 0.15  # a thin band (4.3% of the pixels on held-out clips)
    cx, cy = batch.scenes.cx[0, 0].item(), batch.scenes.cy[0, 0].item()
    assert w[0, 0, 0, int(cy), int(cx)] == 1  # an object's centre is interior, not edge


def test_corner_weights_add_only_near_square_and_triangle_vertices():
    batch, _ = tv.render_batch(4, torch.Generator().manual_seed(3), torch.device("cpu"))
    base, w = tv.edge_weights(batch, 9.0), tv.edge_weights(batch, 9.0, 30.0)
    assert torch.equal(tv.edge_weights(batch, 9.0, 0.0), base)  # off by default: V1-V3 reproduce
    extra = w - base
    assert set(extra.unique().tolist()) == {0.0, 30.0} and 0 < (extra > 0).float().mean() < 0.02
    near = (world.vertex_distance(vw.frame_scenes(batch)) <= tv.CORNER_RADIUS).any(1).view_as(extra[:, 0])
    assert torch.equal(extra[:, 0] > 0, near)
    batch.scenes.shape[:] = 0  # all circles: no vertices, no corner weight
    assert torch.equal(tv.edge_weights(batch, 9.0, 30.0), tv.edge_weights(batch, 9.0))


def test_first_frame_weight_scales_frame_0_only():
    batch, _ = tv.render_batch(2, torch.Generator().manual_seed(3), torch.device("cpu"))
    base, w = tv.edge_weights(batch, 9.0, 30.0), tv.edge_weights(batch, 9.0, 30.0, first=4.0)
    assert torch.equal(w[:, :, 0], 4 * base[:, :, 0]) and torch.equal(w[:, :, 1:], base[:, :, 1:])


def test_vae_loss_edge_weight_keeps_the_scale_and_moves_the_focus():
    torch.manual_seed(0)
    batch, x = tv.render_batch(1, torch.Generator().manual_seed(4), torch.device("cpu"))
    x = x[:, :, :5]
    vae = tv.build_vae(tv.TINY_VAE, -6.0, x)
    w = tv.edge_weights(batch, 9.0)[:, :, :5]
    assert (w > 1).any()

    def loss(weight):
        torch.manual_seed(1)  # the same posterior sample
        return tv.vae_loss(vae, x, 0.0, weight)[0].item()

    assert loss(torch.ones_like(w)) == pytest.approx(loss(None), rel=1e-5)
    assert loss(w) != pytest.approx(loss(None), rel=1e-3)


def test_vae_optimizer_state_round_trips_in_bf16(tmp_path):
    vae = tv.build_vae(tv.TINY_VAE, -6.0)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tv.save_opt_state(opt, str(tmp_path / tv.OPT_FILE))
    fresh = torch.optim.AdamW(params)
    tv.load_opt_state(fresh, torch.load(tmp_path / tv.OPT_FILE))
    a, b = opt.state[params[0]], fresh.state[params[0]]
    assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=1e-2) and b["exp_avg"].dtype == torch.float32
    assert b["step"] == a["step"]
    with pytest.raises(SystemExit, match="parameter tensors"):  # e.g. a decoder-only optimizer
        tv.load_opt_state(torch.optim.AdamW(list(vae.decoder.parameters())), torch.load(tmp_path / tv.OPT_FILE))


def test_vae_call_saves_and_resumes_its_optimizer(tmp_path, monkeypatch):
    out = tmp_path / "sv"
    tv.main(["--tiny", "--steps", "1", "--vae-only", "--vae-save-opt", "--vae-edge-weight", "9", "--vae-corner-weight", "30",
             "--vae-first-frame-weight", "4", "--out", str(out)])
    assert (out / tv.OPT_FILE).exists()
    loaded = []
    monkeypatch.setattr(tv, "load_opt_state", lambda opt, saved: loaded.append(saved["n_params"]))
    state = tv.main(["--tiny", "--steps", "1", "--vae-only", "--vae-minutes", "1", "--out", str(out)])
    assert state["vae_steps"] == 2 and loaded == [len(list(AutoencoderKLWan(**tv.TINY_VAE).parameters()))]


def test_dit_noised_draws_fresh_noise_and_drops_captions_to_unconditional():
    x0, h, uncond = torch.randn(4, 4, 5, 16, 16), torch.randn(4, 40, 384), torch.zeros(1, 40, 384)
    args = tv.parser().parse_args(["--out", "x", "--cfg-drop", "1.0"])
    g = torch.Generator().manual_seed(0)
    xt1, _, h1, _, _ = tv.dit_noised(args, x0, h, uncond, g, torch.device("cpu"))
    xt2, *_ = tv.dit_noised(args, x0, h, uncond, g, torch.device("cpu"))
    assert (h1 == 0).all() and not torch.equal(xt1, xt2)  # a reused batch still gets new noise


def test_latent_reuse_encodes_once_per_k_steps(tmp_path, monkeypatch):
    out = tmp_path / "sv"
    tv.main(["--tiny", "--steps", "1", "--vae-only", "--out", str(out)])
    calls = []
    clean = tv.dit_clean
    monkeypatch.setattr(tv, "dit_clean", lambda *a: calls.append(1) or clean(*a))
    state = tv.main(["--tiny", "--steps", "5", "--latent-reuse", "2", "--final-cfgs", "", "--out", str(out)])
    assert state["dit_steps"] == 5 and len(calls) == 3


def test_compile_cache_carries_the_kernels_to_a_fresh_process(tmp_path, monkeypatch):
    """--compile-cache: what one call compiled, saved at its end, is a cache hit for the next
    call's compile on an empty inductor cache (a fresh device machine), not a recompile."""
    from torch._dynamo.utils import counters

    from training.train_video import load_compile_cache, save_compile_cache

    class Tiny(torch.nn.Module):  # a forward of its own: dynamo skips torch.nn's Sequential called through .compile()
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x)))

    def step(model: torch.nn.Module) -> None:
        x = torch.randn(4, 8)
        model(x).square().mean().backward()

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "first"))
    torch._dynamo.reset()
    torch.compiler.reset()
    torch.manual_seed(0)
    model = Tiny()
    model.compile()
    step(model)
    path = tmp_path / "compile_cache.xz"
    assert save_compile_cache(str(path)) > 0 and path.stat().st_size > 0

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "fresh"))  # the next machine's empty cache
    torch._dynamo.reset()
    torch.compiler.reset()
    counters.clear()
    assert load_compile_cache(str(path)) > 0
    assert load_compile_cache(str(tmp_path / "none.xz")) == 0
    again = Tiny()
    again.compile()
    step(again)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0


def test_phase_timer_reports_each_phase_per_step_and_forgets_them():
    timer = tv.PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("render+encode"):
            time.sleep(0.02)
        with timer.phase("forward+backward"):
            pass
    report = timer.report(2)
    name, ms = report.split(",")[0].rsplit(" ", 1)
    assert name == "render+encode" and float(ms) >= 20, report  # sleep waits at least that long
    assert "forward+backward" in report and report.endswith(" ms/step")
    assert timer.report(1) == " ms/step"  # nothing since the last report


def test_render_batch_p_two_sets_the_share_of_two_object_clips():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    counts = [tv.render_batch(8, gen(), "cpu", p)[0].scenes.valid.sum(1).tolist() for p in (0.0, 1.0)]
    assert counts == [[1] * 8, [2] * 8]
