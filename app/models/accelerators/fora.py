"""FORA: a static schedule, recompute the stack every N calls and reuse its residual between."""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import CacheMethod, register, setting
from app.models.accelerators.runtime import Plan


@register
@dataclass(frozen=True)
class FORA(CacheMethod):
    """FORA-style static cache: a fixed schedule, full compute every N steps."""

    interval: int = setting(3, min=1, max=100, tooltip=(
        "Recompute every N steps, reuse the cached blocks' residual between (1 = never skip)."))
    name = "fora"
    node_name = "FORACache"
    display_name = "FORA Cache"


    def plan(self, rt, slot, block0, args, kwargs):
        full = (0, rt.n)
        if self.interval <= 1 or full not in slot.residuals or not rt.may_skip(slot) \
                or slot.since_compute + 1 >= self.interval:
            return Plan(track=full)
        return self.skip(full, slot.residuals[full])
