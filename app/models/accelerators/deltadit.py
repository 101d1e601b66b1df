"""Δ-DiT: cache the rear blocks' deviation early, the front blocks' late."""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import CacheMethod, register, setting
from app.models.accelerators.runtime import Plan


@register
@dataclass(frozen=True)
class DeltaDiT(CacheMethod):
    """Δ-DiT: reuse the deviation (output - input) of a block range: the rear blocks early
    (outline phase), the front blocks late (detail phase)."""

    interval: int = setting(2, min=1, max=100, tooltip="Recompute the cached blocks every N steps (1 = never skip).")
    cached_blocks: float = setting(0.5, min=0.0, max=1.0, step=0.05,
                                   tooltip="Fraction of the blocks whose deviation is cached.")
    boundary: float = setting(0.5, min=0.0, max=1.0, step=0.01, tooltip=(
        "Before this fraction of the steps cache the rear blocks, after it the front blocks."))
    name = "deltadit"
    node_name = "DeltaDiT"
    display_name = "Δ-DiT"

    name = "deltadit"

    def plan(self, rt, slot, block0, args, kwargs):
        k = max(1, min(rt.n, round(self.cached_blocks * rt.n)))
        frac = rt.step_fraction(slot)
        rear = frac is not None and frac < self.boundary
        rng = (rt.n - k, rt.n) if rear else (0, k)
        if slot.m.get("phase") != rear:
            slot.m["phase"] = rear
            slot.m["count"] = 0
        count = slot.m["count"]
        slot.m["count"] = count + 1
        if self.interval <= 1 or rng not in slot.residuals or not rt.may_skip(slot) or count % self.interval == 0:
            return Plan(track=rng)
        return self.skip(rng, slot.residuals[rng], "rear" if rear else "front")
