"""Latent previews for progress events (a cheap linear projection of the latent channels); a video
latent previews as a strip of a few of its frames side by side (first to last)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from app.models.handles import ModelHandle

PREVIEW_INTERVAL = 0.25  # seconds between latent previews
STRIP_FRAMES = 4  # latent frames in a video's preview strip
STRIP_GAP = 2  # white pixels between them

_PREVIEW_CACHE: dict[tuple, torch.Tensor] = {}


def _preview_latent(x0: torch.Tensor, max_size: int) -> torch.Tensor:
    """The first item of ``x0``, subsampled to at most ``max_size`` pixels a side (on its device):
    (c, h, w) for an image; (c, k, h, w) for a video, k <= STRIP_FRAMES frames evenly spaced."""
    step = max(1, math.ceil(max(x0.shape[-2:]) / max_size))
    if x0.dim() == 4:
        return x0[0, :, ::step, ::step].float()
    frames = x0.shape[2]
    picked = torch.linspace(0, frames - 1, min(frames, STRIP_FRAMES)).round().long().unique().tolist()
    # slices joined, not x0[..., picked, ...]: a list index is a host tensor that a GPU copies in
    # with a synchronisation, stalling the sampler at every preview
    return torch.cat([x0[0, :, i:i + 1, ::step, ::step] for i in picked], dim=1).float()


def _to_rgb(model: ModelHandle, latent: torch.Tensor) -> np.ndarray:
    """RGB uint8 of a small CPU latent: an image (c, h, w), or a strip of video frames (c, k, h, w)
    projected together (one colour scale) and laid side by side with white gaps."""
    if latent.dim() == 3:
        return _preview_rgb(model, latent)
    c, k, h, w = latent.shape
    joined = _preview_rgb(model, latent.permute(0, 2, 1, 3).reshape(c, h, k * w))
    if k == 1:
        return joined
    strip = np.full((h, k * w + (k - 1) * STRIP_GAP, 3), 255, np.uint8)
    for i in range(k):
        strip[:, i * (w + STRIP_GAP): i * (w + STRIP_GAP) + w] = joined[:, i * w: (i + 1) * w]
    return strip


def _preview_rgb(model: ModelHandle, latent: torch.Tensor) -> np.ndarray:
    """RGB uint8 (h, w, 3) of a small CPU latent (c, h, w); see :func:`preview_image`."""
    c = latent.shape[0]
    fitted = model.preview_projection()
    if fitted is not None:
        flat = torch.cat([latent.reshape(c, -1), torch.ones(1, latent[0].numel())]).T
        rgb = (flat @ fitted).reshape(latent.shape[1], latent.shape[2], 3).clamp(0, 1)
    else:
        matrix = model.defaults.get("preview_rgb")
        if matrix is not None:
            proj = torch.tensor(matrix, dtype=torch.float32)
        else:
            key = (model.family, c)
            if key not in _PREVIEW_CACHE:
                g = torch.Generator().manual_seed(c)
                q, _ = torch.linalg.qr(torch.randn(c, max(c, 3), generator=g))
                _PREVIEW_CACHE[key] = q[:, :3] if c >= 3 else torch.eye(c, 3)
            proj = _PREVIEW_CACHE[key]
        rgb = torch.einsum("chw,cd->hwd", latent, proj)
        lo, hi = rgb.amin(dim=(0, 1)), rgb.amax(dim=(0, 1))
        rgb = (rgb - lo) / (hi - lo).clamp(min=1e-6)
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def preview_image(model: ModelHandle, x0: torch.Tensor, max_size: int = 64) -> np.ndarray:
    """A cheap RGB preview of a latent: a fixed linear projection of the channels (uint8 HxWx3;
    a video's is a strip of up to STRIP_FRAMES of its frames).

    The projection is fitted once per model from its VAE (``ModelHandle.preview_projection``,
    when the checkpoint came with one), else a manifest's ``preview_rgb`` matrix, else a fixed
    pseudo-random orthogonal projection (normalised per image) so colours are at least stable.
    """
    return _to_rgb(model, _preview_latent(x0, max_size).cpu())


class Previewer:
    """Latent previews for progress events that never make the GPU wait.

    At most one preview per ``interval`` seconds, plus the last step. A synchronous copy to the
    host would drain the GPU's queue at every preview, leaving it idle while the CPU launches
    the next transformer call. So on CUDA the copy goes to pinned memory without blocking, and
    its image is made at a later step, once the copy's event has completed. The last step's
    preview is made at once (the sampler synchronises there anyway).
    """

    def __init__(self, model: ModelHandle, enabled: bool = True, interval: float = PREVIEW_INTERVAL, max_size: int = 64):
        self.model, self.enabled, self.interval, self.max_size = model, enabled, interval, max_size
        self._last = -math.inf
        self._pending: tuple[torch.Tensor, Callable[[], bool]] | None = None

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> np.ndarray | None:
        """The preview to send with step ``step`` of ``total`` (1-based), or None."""
        if not self.enabled:
            return None
        if step >= total:
            self._pending = None
            return preview_image(self.model, x0, self.max_size)
        image = None
        if self._pending is not None and self._pending[1]():
            image = _to_rgb(self.model, self._pending[0])
            self._pending = None
        now = time.perf_counter()
        if self._pending is None and now - self._last >= self.interval:
            self._last = now
            host, ready = self._start_copy(_preview_latent(x0, self.max_size))
            if ready():
                image = _to_rgb(self.model, host)
            else:
                self._pending = (host, ready)
        return image

    @staticmethod
    def _start_copy(latent: torch.Tensor) -> tuple[torch.Tensor, Callable[[], bool]]:
        """Start copying ``latent`` to the host: (host tensor, has the copy landed?)."""
        if latent.device.type != "cuda":
            return latent.cpu(), lambda: True
        host = torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)
        host.copy_(latent, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done.query
