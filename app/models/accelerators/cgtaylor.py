"""CG-Taylor: TaylorSeer gated by how well block 0's own forecast matched."""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import HeadGatedMethod, register, setting
from app.models.accelerators.runtime import rel_l1
from app.models.accelerators.taylorseer import taylor_forecast, taylor_update


@register
@dataclass(frozen=True)
class CGTaylor(HeadGatedMethod):
    """Confidence-gated TaylorSeer: run block 0, compare it with its Taylor forecast, and when
    the forecast was good (within ``gate``, relative L1), trust the forecast of the remaining
    blocks too."""

    gate: float = setting(0.13, min=0.0, max=2.0, step=0.01, tooltip=(
        "Skip the other blocks when block 0's Taylor forecast is within this relative error (Flux 0.13); "
        "0 = never skip."))
    order: int = setting(1, min=0, max=4, tooltip="Taylor order of the forecasts.")
    name = "cgtaylor"
    node_name = "CGTaylor"
    display_name = "CG-Taylor"

    def after_head(self, rt, slot, h_in, h_out):
        head, rest = slot.m.get("head"), slot.m.get("rest")
        r0 = h_out - h_in
        slot.m["r0"] = r0
        if head is None or rest is None or rt.n < 2 or not rt.may_skip(slot) or len(head["d"]) < min(2, self.order + 1):
            return
        forecast = taylor_forecast(head, slot.sigma)[0]
        if rel_l1(r0, forecast) < self.gate:
            slot.plan = self.skip((1, rt.n), taylor_forecast(rest, slot.sigma))

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        taylor_update(slot.m.setdefault("rest", {}), residual, slot.sigma, self.order)
        taylor_update(slot.m.setdefault("head", {}), (slot.m["r0"], None), slot.sigma, self.order)
        slot.residuals[rng] = residual
