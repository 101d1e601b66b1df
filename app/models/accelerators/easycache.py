"""EasyCache: an online transformation-rate estimate of the output change, no calibration."""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import CacheMethod, register, setting
from app.models.accelerators.runtime import Plan, block_arg


@register
@dataclass(frozen=True)
class EasyCache(CacheMethod):
    """EasyCache: estimate the output change online from the transformation rate k of the last
    computed steps (no calibration) and reuse the transformation while the sum stays small."""

    threshold: float = setting(0.05, min=0.0, max=10.0, step=0.005, tooltip=(
        "Accumulated estimated output change allowed (relative); 0 = never skip."))
    start: float = setting(0.1, min=0.0, max=1.0, step=0.01,
                           tooltip="Warm-up: no skipping before this fraction of the steps.")
    name = "easycache"
    node_name = "EasyCache"
    display_name = "EasyCache"

    def plan(self, rt, slot, block0, args, kwargs):
        x = block_arg(block0, "hidden_states", args, kwargs)
        full = (0, rt.n)
        m = slot.m
        prev_x = m.get("x")
        m["x"] = x
        k = m.get("k")
        if prev_x is None or k is None or full not in slot.residuals or not rt.may_skip(slot):
            m["acc"] = 0.0
            return Plan(track=full)
        out_norm = m["y_norm"]
        m["acc"] = m.get("acc", 0.0) + k * float((x - prev_x).norm()) / max(out_norm, 1e-12)
        if m["acc"] < self.threshold:
            # the estimate of this call's output norm stays the last computed one
            return self.skip(full, slot.residuals[full])
        m["acc"] = 0.0
        return Plan(track=full)

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        m = slot.m
        last = m.get("last")  # (input, output) of the previous computed call
        if last is not None:
            dx = float((h_entry - last[0]).norm())
            dy = float((h_exit - last[1]).norm())
            m["k"] = dy / max(dx, 1e-12)
        m["last"] = (h_entry, h_exit)
        m["y_norm"] = float(h_exit.norm())
        slot.residuals[rng] = residual

