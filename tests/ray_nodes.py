"""Cheap deterministic nodes for the Ray tests: a "model" that takes a while to load, a renderer
with progress steps (a place to kill a worker mid-run), and a marker of finished renders."""

from __future__ import annotations

import time
from typing import Annotated

import torch

from app.context import current
from app.registry import node
from app.types import IMAGE, LATENT, Spec


@node(category="test/ray", outputs={"model": LATENT})
def FakeModelLoad(size: Annotated[int, Spec(min=1, max=512)] = 32, load_seconds: float = 0.3) -> torch.Tensor:
    """Stands in for loading weights: slow, and worth keeping in a worker's cache."""
    time.sleep(load_seconds)
    return torch.randn(size, 3, generator=torch.Generator().manual_seed(size))


@node(category="test/ray", outputs={"image": IMAGE})
def FakeRender(model: LATENT, seed: int = 0, steps: int = 4, step_seconds: float = 0.0,
               width: int = 24, height: int = 16) -> torch.Tensor:
    """A seeded image refined in ``steps`` (each a progress event and a cancellation point)."""
    ctx = current()
    image = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))
    tint = torch.sigmoid(model.mean(dim=0))
    for step in range(1, steps + 1):
        image = 0.8 * image + 0.2 * tint
        time.sleep(step_seconds)
        ctx.progress(step, steps)
    (ctx.output_dir).mkdir(parents=True, exist_ok=True)
    with open(ctx.output_dir / "renders.txt", "a") as marker:  # one line per finished render
        marker.write(f"{ctx.run_id}\n")
    return image.clamp(0, 1)
