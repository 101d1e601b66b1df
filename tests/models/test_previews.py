"""Latent previews of progress events: a video latent previews as a strip of a few frames."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from app.models.sampling.previews import STRIP_FRAMES, STRIP_GAP, Previewer, _preview_latent, preview_image

MODEL = SimpleNamespace(preview_projection=lambda: None, defaults={}, family="wan")


def _video_latent(frames: int) -> torch.Tensor:
    latent = torch.zeros(1, 16, frames, 8, 8)
    for f in range(frames):
        latent[0, :, f, :, f % 8] = 1.0 + f  # a bright column that moves (and brightens) frame by frame
    return latent


def test_video_latent_previews_as_a_strip_of_frames():
    strip = preview_image(MODEL, _video_latent(9))
    assert strip.shape == (8, STRIP_FRAMES * 8 + (STRIP_FRAMES - 1) * STRIP_GAP, 3)
    frames = [strip[:, i * (8 + STRIP_GAP): i * (8 + STRIP_GAP) + 8] for i in range(STRIP_FRAMES)]
    gaps = [strip[:, i * (8 + STRIP_GAP) + 8: (i + 1) * (8 + STRIP_GAP)] for i in range(STRIP_FRAMES - 1)]
    assert all((gap == 255).all() for gap in gaps)
    assert len({frame.tobytes() for frame in frames}) == STRIP_FRAMES  # frames 0, 3, 5, 8: all different
    two = preview_image(MODEL, _video_latent(2))
    assert two.shape == (8, 2 * 8 + STRIP_GAP, 3)
    assert preview_image(MODEL, _video_latent(1)).shape == (8, 8, 3)
    assert preview_image(MODEL, torch.randn(1, 16, 8, 8)).shape == (8, 8, 3)  # images unchanged


def test_previewer_sends_the_strip_and_subsamples_large_frames():
    latent = torch.randn(1, 16, 21, 60, 104)  # Wan 480p x 81 frames
    image = Previewer(MODEL, interval=0.0, max_size=64)(1, 10, latent)
    assert isinstance(image, np.ndarray) and image.shape[0] == 30 and image.shape[1] == 4 * 52 + 3 * STRIP_GAP


def test_a_video_preview_takes_no_tensor_from_the_host():
    """Picking the strip's frames builds no index tensor on the host: on a GPU that tensor is
    copied in with a synchronisation, which would stall the sampler at every preview."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    latent = _video_latent(9)
    ops = Ops()
    with ops:
        picked = _preview_latent(latent, 64)
    assert not [n for n in ops.names if "lift_fresh" in n or n.startswith("aten.index.")], ops.names
    assert torch.equal(picked, latent[0, :, [0, 3, 5, 8]])
