"""MagCache: skip while the accumulated error of calibrated residual magnitude ratios is small."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.models import families
from app.models.accelerators.method import CacheMethod, register, setting
from app.models.accelerators.runtime import Plan, parse_numbers, resample_nearest

log = logging.getLogger(__name__)

# MagCache magnitude ratios per model (one calibration sample each, resampled to the step
# count by nearest neighbour). Flux-dev: the MagCache authors' (via diffusers).
MAGCACHE_RATIOS: dict[str, list[float]] = {
    # one prompt, 50 steps, cfg 2 (python -m bench.cache calibrate-magcache)
    "shapes-dit": [1.0, 1.03676, 1.04197, 1.01942, 1.01822, 0.99515, 0.99176, 0.99261, 0.99103, 1.00264, 0.99099,
                   0.99186, 0.98995, 0.99318, 0.99785, 0.99481, 0.9919, 0.99101, 1.00022, 0.98348, 1.00122,
                   0.99104, 0.99364, 0.9942, 0.99043, 0.98852, 0.99192, 0.99131, 0.9876, 0.98701, 0.98755, 0.98904,
                   0.98428, 0.98495, 0.98582, 0.97948, 0.98147, 0.981, 0.97529, 0.97567, 0.9728, 0.96861, 0.9661,
                   0.95941, 0.95277, 0.94331, 0.93048, 0.90974, 0.87617, 0.81144],
}


def magcache_ratios(family: str, text: str = "auto") -> tuple:
    """"auto" -> the family's calibrated ratios (shapes-dit's curve when the family has none)."""
    text = (text or "auto").strip()
    if text.lower() != "auto":
        return parse_numbers(text, "ratios")
    ratios = MAGCACHE_RATIOS.get(family)
    if ratios is None and (info := families.FAMILIES.get(family)) is not None:
        ratios = info.magcache_ratios()
    if ratios is None:
        log.warning("MagCache: no calibrated ratios for family %r; using shapes-dit's curve "
                    "(connect MagCache Calibrate for this model's own)", family)
        ratios = MAGCACHE_RATIOS.get("shapes-dit")
    return tuple(ratios or ())


_RESAMPLED: dict = {}


@register
@dataclass(frozen=True)
class MagCache(CacheMethod):
    """MagCache: skip while the accumulated error |1 - prod(gamma)| of the calibrated residual
    magnitude ratios stays under the threshold, at most K steps in a row."""

    threshold: float = setting(0.06, min=0.0, max=10.0, step=0.01, tooltip=(
        "Accumulated magnitude error allowed (0.06 default; 0.12-0.24 faster); 0 = never skip."))
    ratios: tuple = setting((), widget=(str, "auto"), tooltip=(
        "Calibrated magnitude ratios, comma separated (MagCache Calibrate makes them); 'auto' = the family's own."))
    start: float = setting(0.2, min=0.0, max=1.0, step=0.01,
                           tooltip="Retention: no skipping before this fraction of the steps.")
    max_skips: int = setting(3, min=0, max=1000, tooltip="K: most steps skipped in a row (0 = no limit).")
    name = "magcache"
    node_name = "MagCache"
    display_name = "MagCache"

    @classmethod
    def from_widgets(cls, family, ratios="auto", **widgets):
        values = magcache_ratios(family, ratios)
        if not values and widgets.get("threshold", cls.threshold) > 0:
            raise ValueError(f"MagCache has no calibrated ratios for family {family!r}: connect MagCache "
                             "Calibrate's ratios, or paste a ratio list")
        return cls(ratios=values, **widgets)

    def _gamma(self, rt, step: int) -> float:
        total = rt.run.total_steps
        table = _RESAMPLED.get((self.ratios, total))
        if table is None:
            table = _RESAMPLED[(self.ratios, total)] = resample_nearest(self.ratios, total)
        return table[step] if step < len(table) else 1.0

    def plan(self, rt, slot, block0, args, kwargs):
        full = (0, rt.n)
        if not self.ratios or full not in slot.residuals or not rt.may_skip(slot):
            slot.m.update(ratio=1.0, err=0.0, count=0)
            return Plan(track=full)
        ratio = slot.m.get("ratio", 1.0) * self._gamma(rt, slot.step)
        err = slot.m.get("err", 0.0) + abs(1.0 - ratio)
        count = slot.m.get("count", 0) + 1
        if err < self.threshold and (self.max_skips <= 0 or count <= self.max_skips):
            slot.m.update(ratio=ratio, err=err, count=count)
            return self.skip(full, slot.residuals[full])
        slot.m.update(ratio=1.0, err=0.0, count=0)
        return Plan(track=full)
