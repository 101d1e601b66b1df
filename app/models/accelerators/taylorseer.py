"""TaylorSeer: full compute every N calls, a Taylor forecast of the stack's residual between."""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.models.accelerators.method import CacheMethod, register, setting
from app.models.accelerators.runtime import Plan

ORDER_TIP = "Taylor order of the forecast (0 = reuse, 1 linear, 2 quadratic)."


def taylor_update(history: dict, value: tuple, x: float, order: int) -> None:
    """Recursive finite differences: D0 = value, D(k+1) = (Dk - Dk_prev) / (x - x_prev)."""
    prev, prev_x = history.get("d"), history.get("x")
    # differences of bf16 tensors divided by small sigma steps lose most of their digits: keep
    # the series in float32 and cast the forecast back
    history["dtypes"] = tuple(None if v is None else v.dtype for v in value)
    derivs = [tuple(None if v is None else v.float() for v in value)]
    if prev is not None and prev_x is not None and abs(x - prev_x) > 1e-12:
        dx = x - prev_x
        for k in range(min(order, len(prev))):
            cur, old = derivs[k], prev[k]
            derivs.append(tuple(None if (c is None or o is None) else (c - o) / dx for c, o in zip(cur, old, strict=True)))
    history["d"], history["x"] = derivs, x


def taylor_forecast(history: dict, x: float) -> tuple:
    derivs, x0 = history["d"], history["x"]
    dx = x - x0
    out = list(derivs[0])
    for k in range(1, len(derivs)):
        factor = dx**k / math.factorial(k)
        out = [None if (o is None or d is None) else o + factor * d for o, d in zip(out, derivs[k], strict=True)]
    return tuple(None if o is None else o.to(t) for o, t in zip(out, history["dtypes"], strict=True))


@register
@dataclass(frozen=True)
class TaylorSeer(CacheMethod):
    """TaylorSeer: compute every N steps and forecast the block stack's residual in between
    with a Taylor series of its finite differences."""

    # diffusers' TaylorSeerCacheConfig defaults (cache_interval=5, max_order=1)
    interval: int = setting(5, min=1, max=100, tooltip=(
        "Compute fully every N steps, forecast between (1 = never skip). Long intervals at few steps "
        "extrapolate too far."))
    order: int = setting(1, min=0, max=4, tooltip=ORDER_TIP)
    name = "taylorseer"
    node_name = "TaylorSeer"
    display_name = "TaylorSeer"

    def plan(self, rt, slot, block0, args, kwargs):
        full = (0, rt.n)
        hist = slot.m.get("taylor")
        if (self.interval <= 1 or hist is None or not rt.may_skip(slot)
                or slot.since_compute + 1 >= self.interval):
            return Plan(track=full)
        return self.skip(full, taylor_forecast(hist, slot.sigma))

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        taylor_update(slot.m.setdefault("taylor", {}), residual, slot.sigma, self.order)
        slot.residuals[rng] = residual
