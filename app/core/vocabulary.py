"""The shared widget vocabulary: one ``Annotated`` spec per common widget (seed, steps, cfg, ...).

Nodes declare ``seed: SEED = 0`` instead of repeating ranges; the default stays on the node
(each node keeps its own visible default). The functions give the same spec with a node-specific
tooltip or lower bound, so ranges are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

from app.core.types import Spec

SEED_MAX = 2**63 - 1

# Choice lists owned by a higher layer (the sampler registry in app/models/sampling) are
# provided at its import; core only declares the widgets, so importing this stays cheap.
_CHOICES: dict[str, Callable[[], Sequence[str]]] = {}


def provide_choices(kind: str, source: Callable[[], Sequence[str]]) -> None:
    """Register where the choices of ``kind`` ("sampler", "scheduler", "guidance") come from."""
    _CHOICES[kind] = source


def _choices(kind: str) -> Callable[[], list[str]]:
    return lambda: list(_CHOICES[kind]()) if kind in _CHOICES else []


def seed(tooltip: str = "Same seed, same image.") -> type:
    return Annotated[int, Spec(min=0, max=SEED_MAX, seed=True, tooltip=tooltip)]


def steps(tooltip: str = "", minimum: int = 1) -> type:
    return Annotated[int, Spec(min=minimum, max=1000, tooltip=tooltip)]


def cfg(tooltip: str = "Guidance scale (1 = no guidance).") -> type:
    return Annotated[float, Spec(min=0.0, max=100.0, step=0.1, tooltip=tooltip)]


def fraction(tooltip: str = "", minimum: float = 0.0) -> type:
    """A value in [minimum, 1] in steps of 0.01 (denoise, strength, start/end of a range of steps)."""
    return Annotated[float, Spec(min=minimum, max=1.0, step=0.01, tooltip=tooltip)]


def shift(tooltip: str = "Timestep shift; 0 = the model's default.") -> type:
    return Annotated[float, Spec(min=0.0, max=100.0, step=0.05, tooltip=tooltip)]


def size(tooltip: str = "") -> type:
    """An image width or height in pixels (multiples of 16)."""
    return Annotated[int, Spec(min=16, max=16384, step=16, tooltip=tooltip)]


def grow_pixels(tooltip: str = "Grow the mask by this many (image) pixels.", minimum: int = 0) -> type:
    return Annotated[int, Spec(min=minimum, max=512, tooltip=tooltip)]


def feather(tooltip: str = "Feather the mask edge (pixels).") -> type:
    return Annotated[float, Spec(min=0.0, max=256.0, step=0.5, tooltip=tooltip)]


def sampler(tooltip: str = "") -> type:
    return Annotated[str, Spec(choices=_choices("sampler"), tooltip=tooltip)]


def scheduler(tooltip: str = "auto: the model's own (shifted, dynamic or discrete).") -> type:
    return Annotated[str, Spec(choices=_choices("scheduler"), tooltip=tooltip)]


def guidance(tooltip: str = "How cond and uncond are combined.") -> type:
    return Annotated[str, Spec(choices=_choices("guidance"), tooltip=tooltip)]


def weight(tooltip: str) -> type:
    """A patch strength in [-10, 10] (LoRA weight, ControlNet strength)."""
    return Annotated[float, Spec(min=-10.0, max=10.0, step=0.05, tooltip=tooltip)]


SEED = seed()
STEPS = steps()
CFG = cfg()
DENOISE = fraction("< 1: keep part of the input latent (img2img).")
STRENGTH = fraction("How much of the input is replaced: 0 keeps it, 1 starts from pure noise.")
SHIFT = shift()
SIZE = size()
GROW = grow_pixels()
FEATHER = feather()
SAMPLER = sampler()
SCHEDULER = scheduler()
GUIDANCE_METHOD = guidance()
