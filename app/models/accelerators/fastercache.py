"""FasterCache's attention reuse: between computations, extrapolate each self attention's output
from its last two (arXiv 2410.19355).

The rule is diffusers' ``FasterCacheBlockHook``: inside the window, a self-attention module
computes every N-th call and otherwise returns ``o_t + w * (o_t - o_{t-1})`` from its last two
outputs (cross attention always runs). Diffusers applies the reuse only when its CFG-Cache has
dropped the unconditional half of a batched call (or for guidance-distilled models); here every
CFG branch has its own slot and history, so the reuse applies to each branch as diffusers applies
it to a guidance-distilled model. FasterCache's CFG-Cache itself (the unconditional output
estimated from the conditional one in frequency space) is not included: diffusers' version needs
CFG batched into one call with (B, C, F, H, W) outputs, which Wan (two calls) and LTX-Video
(packed tokens) do not give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.models.accelerators.method import AttentionMethod, register, setting
from app.models.accelerators.runtime import is_cross_attention


def _extrapolate(previous, last, weight: float):
    if isinstance(last, torch.Tensor):
        return last + (last - previous) * weight
    return type(last)(_extrapolate(p, o, weight) if o is not None else None for p, o in zip(previous, last, strict=True))


@register
@dataclass(frozen=True)
class FasterCache(AttentionMethod):
    """FasterCache (attention reuse): compute self attention every N steps; in between,
    extrapolate it linearly from its last two outputs."""

    interval: int = setting(2, min=1, max=100, tooltip=(
        "Compute self attention every N steps, extrapolate it between (1 = never reuse)."))
    weight: float = setting(0.5, min=0.0, max=2.0, step=0.05, tooltip=(
        "Extrapolation weight w: o_t + w * (o_t - o_{t-1}) (0 = reuse the last output as is)."))
    start: float = setting(0.3, min=0.0, max=1.0, step=0.01, tooltip="No extrapolated attention before this fraction of the steps.")
    end: float = setting(1.0, min=0.0, max=1.0, step=0.01, tooltip="No extrapolated attention from this fraction of the steps on.")
    name = "fastercache"
    node_name = "FasterCache"
    display_name = "FasterCache"

    def attention(self, rt, slot, key, module, args, kwargs, forward):
        if is_cross_attention(module, args, kwargs):
            return forward(*args, **kwargs), False
        state = slot.m.setdefault(("fastercache", key), {"iteration": 0, "outputs": None})
        computes = state["iteration"] > 0 and state["iteration"] % self.interval == 0
        reuse = rt.in_window(slot) and not computes and state["outputs"] is not None and self.interval > 1
        if reuse:
            previous, last = state["outputs"]
            output = _extrapolate(previous, last, self.weight)
        else:
            output = forward(*args, **kwargs)
        # diffusers keeps the last two outputs, computed or extrapolated, and starts with [o, o]
        state["outputs"] = (output, output) if state["outputs"] is None else (state["outputs"][1], output)
        state["iteration"] += 1
        return output, reuse
