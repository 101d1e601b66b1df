"""TeaCache: accumulate a rescaled change of block 0's modulated input; skip while it is small."""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import CacheMethod, register, setting
from app.models.accelerators.runtime import IDENTITY_POLY, Plan, modulated_input, parse_numbers, poly, rel_l1

# Rescaling polynomials (highest power first), fitted per model on (rel-L1 of the modulated
# input, rel-L1 of the output) pairs. Flux: the TeaCache authors' Flux-dev fit.
# shapes-dit: fitted by `python -m bench.cache calibrate-teacache` on the bundled model.
# Families without one use the identity (raw rel-L1); calibrate with the same command.
TEACACHE_COEFFICIENTS: dict[str, list[float]] = {
    "flux": [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01],
    # 12 prompts x 50 steps, cfg 2 (588 pairs, x in 0.016..0.114); the final weights
    "shapes-dit": [-1.11061087e+04, 2.48867652e+03, -1.57846179e+02, 4.43062789e+00, -2.52294575e-02],
}
# Where a fit's data ended: beyond it the polynomial is extended linearly through the origin
# (a quartic can turn negative outside its data and would then hide large changes).
TEACACHE_DOMAIN: dict[str, float] = {"shapes-dit": 0.1136}


def teacache_coefficients(family: str, text: str = "auto") -> tuple:
    """"auto" -> the family's fitted polynomial (identity when none); else comma-separated numbers."""
    text = (text or "auto").strip()
    if text.lower() == "auto":
        return tuple(TEACACHE_COEFFICIENTS.get(family, IDENTITY_POLY))
    return parse_numbers(text, "coefficients")


def teacache_domain(family: str, text: str = "auto") -> float:
    """The fitted range's end for the family's own polynomial (0 for user-given ones)."""
    return TEACACHE_DOMAIN.get(family, 0.0) if (text or "auto").strip().lower() == "auto" else 0.0


@register
@dataclass(frozen=True)
class TeaCache(CacheMethod):
    """TeaCache: accumulate a polynomial of the relative change of block 0's timestep-modulated
    input; while it stays under the threshold, reuse the whole stack's residual."""

    threshold: float = setting(0.4, min=0.0, max=10.0, step=0.01, tooltip=(
        "Accumulated rescaled input change allowed before recomputing (Flux: 0.4 ~1.8x, 0.6 ~2x); "
        "0 = never skip."))
    coefficients: tuple = setting((), widget=(str, "auto"), tooltip=(
        "Rescaling polynomial, highest power first, comma separated; 'auto' = the family's fit "
        "(python -m bench.cache calibrate-teacache fits one)."))
    domain: float = 0.0  # the fit's largest input (0: trust the polynomial everywhere)
    name = "teacache"
    node_name = "TeaCache"
    display_name = "TeaCache"

    @classmethod
    def from_widgets(cls, family, coefficients="auto", **widgets):
        return cls(coefficients=teacache_coefficients(family, coefficients),
                   domain=teacache_domain(family, coefficients), **widgets)

    def rescale(self, x: float) -> float:
        coefficients = self.coefficients or IDENTITY_POLY
        if self.domain > 0 and x > self.domain:
            return max(0.0, poly(coefficients, self.domain)) * x / self.domain
        # a fitted polynomial can dip below zero near its ends: never let it pay back
        return max(0.0, poly(coefficients, x))

    def plan(self, rt, slot, block0, args, kwargs):
        modulated = modulated_input(block0, args, kwargs)
        prev = slot.m.get("mod")
        slot.m["mod"] = modulated
        full = (0, rt.n)
        if prev is None or full not in slot.residuals:
            slot.m["acc"] = 0.0
            return Plan(track=full)
        slot.m["acc"] = slot.m.get("acc", 0.0) + self.rescale(rel_l1(modulated, prev))
        if rt.may_skip(slot) and slot.m["acc"] < self.threshold:
            return self.skip(full, slot.residuals[full])
        slot.m["acc"] = 0.0
        return Plan(track=full)
