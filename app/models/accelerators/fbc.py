"""First-Block Cache: run block 0; skip the other blocks while its residual barely moved."""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import HeadGatedMethod, register, setting
from app.models.accelerators.runtime import rel_l1


@register
@dataclass(frozen=True)
class FirstBlockCache(HeadGatedMethod):
    """First-Block Cache: always run the first block; when its residual barely moved since the
    last full step, reuse the cached residual of all the other blocks."""

    threshold: float = setting(0.08, min=0.0, max=2.0, step=0.01, tooltip=(
        "Skip the other blocks while block 0's residual changed by less than this (relative L1); "
        "Flux 0.08-0.12; 0 = never skip."))
    name = "fbc"
    node_name = "FirstBlockCache"
    display_name = "First-Block Cache"

    def after_head(self, rt, slot, h_in, h_out):
        r0 = h_out - h_in
        prev = slot.m.get("r0")
        rng = (1, rt.n)
        if prev is not None and rng in slot.residuals and rt.n > 1 and rt.may_skip(slot):
            diff = rel_l1(r0, prev)
            if diff < self.threshold:
                slot.plan = self.skip(rng, slot.residuals[rng])
                return
        slot.m["r0"] = r0  # compared against the last *computed* call's head residual
