"""Calibration runs: methods that never skip and record what a fit needs, and the fits.

MagCache's ratios come from one uncached sample (:class:`MagCacheCalibration` +
:func:`magcache_ratios_from_records`); TeaCache's polynomial from (input change, output
change) pairs (:class:`TeaCacheCalibration` + :func:`fit_teacache`). The calibrate nodes and
``python -m bench.cache calibrate-*`` run them.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import CacheMethod
from app.models.accelerators.runtime import Plan, modulated_input, rel_l1


@dataclass(frozen=True)
class MagCacheCalibration(CacheMethod):
    """Never skips; records the residual magnitude of every computed call (one sample)."""

    name = "magcache-calibration"

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        norm = float(residual[0].float().norm(dim=-1).mean())
        rt.records.append({"slot": id(slot), "step": slot.step, "norm": norm})
        slot.residuals[rng] = residual


def magcache_ratios_from_records(records: list[dict]) -> list[float]:
    """Per-step magnitude ratios |r_t| / |r_{t-1}| from a calibration run (first = 1), averaged
    over the run's slots (CFG branches)."""
    by_slot: dict[int, list[tuple[int, float]]] = {}
    for r in records:
        by_slot.setdefault(r["slot"], []).append((r["step"], r["norm"]))
    per_step: dict[int, list[float]] = {}
    for seq in by_slot.values():
        seq.sort()
        for (s0, n0), (s1, n1) in zip(seq, seq[1:], strict=False):
            if s1 == s0 + 1:
                per_step.setdefault(s1, []).append(n1 / max(n0, 1e-12))
    steps = max((r["step"] for r in records), default=-1) + 1
    return [1.0] + [sum(per_step.get(s, [1.0])) / len(per_step.get(s, [1.0])) for s in range(1, steps)]


@dataclass(frozen=True)
class TeaCacheCalibration(CacheMethod):
    """Never skips; records TeaCache's (input rel-L1, output rel-L1) pair for every call."""

    name = "teacache-calibration"

    def plan(self, rt, slot, block0, args, kwargs):
        modulated = modulated_input(block0, args, kwargs)
        prev = slot.m.get("mod")
        slot.m["mod"] = modulated
        slot.m["x"] = None if prev is None else rel_l1(modulated, prev)
        return Plan(track=(0, rt.n))

    def store(self, rt, slot, rng, residual, h_entry, h_exit):
        prev = slot.m.get("out")
        slot.m["out"] = h_exit
        if prev is not None and slot.m.get("x") is not None:
            rt.records.append({"step": slot.step, "x": slot.m["x"], "y": rel_l1(h_exit, prev)})
        slot.residuals[rng] = residual


def fit_teacache(records: list[dict], degree: int = 4) -> list[float]:
    """Least-squares polynomial y = P(x) (highest power first) through calibration pairs."""
    import numpy as np

    x = np.array([r["x"] for r in records], dtype=np.float64)
    y = np.array([r["y"] for r in records], dtype=np.float64)
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} calibration pairs, got {len(x)} (sample more steps or prompts)")
    return [float(c) for c in np.polyfit(x, y, degree)]
