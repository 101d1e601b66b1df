"""vae_probe (training/vae_probe.py): resuming a parameter subset's AdamW moments from train_video's file."""

import pytest
import torch

from training import train_video as tv
from training import vae_probe


def test_resume_moments_picks_the_decoders_state_out_of_the_whole_vae_file(tmp_path):
    vae = tv.build_vae(tv.TINY_VAE, -6.0)
    opt = torch.optim.AdamW(vae.parameters())
    for p in vae.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    tv.save_opt_state(opt, str(tmp_path / tv.OPT_FILE))
    saved = torch.load(tmp_path / tv.OPT_FILE)
    dec = list(vae.decoder.parameters())
    sub = torch.optim.AdamW(dec)
    vae_probe.resume_moments(sub, vae, dec, saved)
    for p in dec:
        assert torch.allclose(sub.state[p]["exp_avg"], opt.state[p]["exp_avg"], rtol=1e-2)
    other = tv.build_vae(dict(tv.TINY_VAE, num_res_blocks=2), -6.0)
    with pytest.raises(SystemExit, match="parameter tensors"):
        vae_probe.resume_moments(torch.optim.AdamW(other.decoder.parameters()), other,
                                 list(other.decoder.parameters()), saved)
