"""Cache accelerators: training-free MODEL patches that skip transformer blocks between steps.

Each node takes a MODEL and returns a new MODEL view carrying one cache patch (the input is
never changed). The machinery is in app/models/accelerators/: diffusers-style hooks on the block
stack of every family (SD3/shapes-dit, Flux, PixArt, Sana, Lumina 2), per-run state made fresh
for every sampling run. Common widgets: ``start``/``end`` (fraction of the steps where skipping
is allowed), ``max_skips`` (most calls skipped in a row; 0 = no limit). After a run the
sampler's node gets a ``cache`` event with the number of skipped calls and blocks.

Thresholds at 0 (dynamic methods) or interval 1 (static ones) never skip and give exactly the
uncached result.
"""

from __future__ import annotations

from typing import Annotated

from app.models import accelerators as hooks
from app.models.handles import ModelHandle
from app.core.registry import Link, node
from app.core.types import CONDITIONING, LATENT, MODEL, STRING, Spec

START = Spec(min=0.0, max=1.0, step=0.01, tooltip="No skipping before this fraction of the steps.")
END = Spec(min=0.0, max=1.0, step=0.01, tooltip="No skipping from this fraction of the steps on.")
MAX_SKIPS = Spec(min=0, max=1000, tooltip="Most steps skipped in a row (0 = no limit).")
CATEGORY = "model_patches/cache"


def _patch(model: ModelHandle, method: hooks.CacheMethod) -> ModelHandle:
    if not 0.0 <= method.start <= method.end <= 1.0:
        raise ValueError(f"start ({method.start}) must not exceed end ({method.end}); both within 0..1")
    hooks.stack_blocks(model.transformer)  # fail now, not mid-run, on a model we cannot hook
    return model.with_patch(hooks.CachePatch(method))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="First-Block Cache")
def FirstBlockCache(
    model: MODEL,
    threshold: Annotated[float, Spec(min=0.0, max=2.0, step=0.01, tooltip="Skip the other blocks while block 0's residual changed by less than this (relative L1); Flux 0.08-0.12; 0 = never skip.")] = 0.08,
    start: Annotated[float, START] = 0.0,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, MAX_SKIPS] = 0,
) -> ModelHandle:
    """First-Block Cache: always run the first block; when its residual barely moved since the
    last full step, reuse the cached residual of all the other blocks."""
    return _patch(model, hooks.FirstBlockCache(threshold=threshold, start=start, end=end, max_skips=max_skips))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="TeaCache")
def TeaCache(
    model: MODEL,
    threshold: Annotated[float, Spec(min=0.0, max=10.0, step=0.01, tooltip="Accumulated rescaled input change allowed before recomputing (Flux: 0.4 ~1.8x, 0.6 ~2x); 0 = never skip.")] = 0.4,
    coefficients: Annotated[str, Spec(tooltip="Rescaling polynomial, highest power first, comma separated; 'auto' = the family's fit (python -m bench.cache calibrate-teacache fits one).")] = "auto",
    start: Annotated[float, START] = 0.0,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, MAX_SKIPS] = 0,
) -> ModelHandle:
    """TeaCache: accumulate a polynomial of the relative change of block 0's timestep-modulated
    input; while it stays under the threshold, reuse the whole stack's residual."""
    coeffs = hooks.teacache_coefficients(model.family, coefficients)
    domain = hooks.teacache_domain(model.family, coefficients)
    return _patch(model, hooks.TeaCache(threshold=threshold, coefficients=coeffs, domain=domain, start=start,
                                        end=end, max_skips=max_skips))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="MagCache")
def MagCache(
    model: MODEL,
    threshold: Annotated[float, Spec(min=0.0, max=10.0, step=0.01, tooltip="Accumulated magnitude error allowed (0.06 default; 0.12-0.24 faster); 0 = never skip.")] = 0.06,
    ratios: Annotated[str, Spec(tooltip="Calibrated magnitude ratios, comma separated (MagCache Calibrate makes them); 'auto' = the family's own.")] = "auto",
    start: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Retention: no skipping before this fraction of the steps.")] = 0.2,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, Spec(min=0, max=1000, tooltip="K: most steps skipped in a row (0 = no limit).")] = 3,
) -> ModelHandle:
    """MagCache: skip while the accumulated error |1 - prod(gamma)| of the calibrated residual
    magnitude ratios stays under the threshold, at most K steps in a row."""
    values = hooks.magcache_ratios(model.family, ratios)
    if not values and threshold > 0:
        raise ValueError(f"MagCache has no calibrated ratios for family {model.family!r}: connect MagCache "
                         "Calibrate's ratios, or paste a ratio list")
    return _patch(model, hooks.MagCache(threshold=threshold, ratios=values, start=start, end=end, max_skips=max_skips))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="EasyCache")
def EasyCache(
    model: MODEL,
    threshold: Annotated[float, Spec(min=0.0, max=10.0, step=0.005, tooltip="Accumulated estimated output change allowed (relative); 0 = never skip.")] = 0.05,
    start: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Warm-up: no skipping before this fraction of the steps.")] = 0.1,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, MAX_SKIPS] = 0,
) -> ModelHandle:
    """EasyCache: estimate the output change online from the transformation rate k of the last
    computed steps (no calibration) and reuse the transformation while the sum stays small."""
    return _patch(model, hooks.EasyCache(threshold=threshold, start=start, end=end, max_skips=max_skips))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="TaylorSeer")
def TaylorSeer(
    model: MODEL,
    interval: Annotated[int, Spec(min=1, max=100, tooltip="Compute fully every N steps, forecast between (1 = never skip). Long intervals at few steps extrapolate too far.")] = 3,
    order: Annotated[int, Spec(min=0, max=4, tooltip="Taylor order of the forecast (0 = reuse, 1 linear, 2 quadratic).")] = 2,
    start: Annotated[float, START] = 0.0,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, MAX_SKIPS] = 0,
) -> ModelHandle:
    """TaylorSeer: compute every N steps and forecast the block stack's residual in between
    with a Taylor series of its finite differences."""
    return _patch(model, hooks.TaylorSeer(interval=interval, order=order, start=start, end=end, max_skips=max_skips))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="CG-Taylor")
def CGTaylor(
    model: MODEL,
    gate: Annotated[float, Spec(min=0.0, max=2.0, step=0.01, tooltip="Skip the other blocks when block 0's Taylor forecast is within this relative error (Flux 0.13); 0 = never skip.")] = 0.13,
    order: Annotated[int, Spec(min=0, max=4, tooltip="Taylor order of the forecasts.")] = 1,
    start: Annotated[float, START] = 0.0,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, MAX_SKIPS] = 0,
) -> ModelHandle:
    """Confidence-gated TaylorSeer: run block 0, compare it with its Taylor forecast, and when
    the forecast was good, trust the forecast of the remaining blocks too."""
    return _patch(model, hooks.CGTaylor(gate=gate, order=order, start=start, end=end, max_skips=max_skips))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="Δ-DiT")
def DeltaDiT(
    model: MODEL,
    interval: Annotated[int, Spec(min=1, max=100, tooltip="Recompute the cached blocks every N steps (1 = never skip).")] = 2,
    cached_blocks: Annotated[float, Spec(min=0.0, max=1.0, step=0.05, tooltip="Fraction of the blocks whose deviation is cached.")] = 0.5,
    boundary: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Before this fraction of the steps cache the rear blocks, after it the front blocks.")] = 0.5,
    start: Annotated[float, START] = 0.0,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, MAX_SKIPS] = 0,
) -> ModelHandle:
    """Δ-DiT: reuse the deviation (output - input) of a block range: the rear blocks early
    (outline phase), the front blocks late (detail phase)."""
    return _patch(model, hooks.DeltaDiT(interval=interval, cached_blocks=cached_blocks, boundary=boundary,
                                        start=start, end=end, max_skips=max_skips))


@node(category=CATEGORY, outputs={"model": MODEL}, display_name="FORA Cache")
def FORACache(
    model: MODEL,
    interval: Annotated[int, Spec(min=1, max=100, tooltip="Recompute every N steps, reuse the cached blocks' residual between (1 = never skip).")] = 3,
    start: Annotated[float, START] = 0.0,
    end: Annotated[float, END] = 1.0,
    max_skips: Annotated[int, MAX_SKIPS] = 0,
) -> ModelHandle:
    """FORA-style static cache: a fixed schedule, full compute every N steps."""
    return _patch(model, hooks.FORA(interval=interval, start=start, end=end, max_skips=max_skips))


def _calibration_run(model: ModelHandle, method: hooks.CacheMethod, positive, negative, latent, seed: int,
                     steps: int, cfg: float) -> list:
    from nodes.sampling import compute_sigmas, sample

    found: list = []
    patched = model.without_patches().with_patch(hooks.CachePatch(method, sink=lambda _s, records: found.extend(records)))
    h, w = latent.samples.shape[-2:]
    sigmas = compute_sigmas(model, "auto", steps, 0.0, (h, w))
    sample(patched, latent, positive, negative, sigmas, seed, cfg)
    return found


@node(category=CATEGORY, outputs={"ratios": STRING}, display_name="MagCache Calibrate")
def MagCacheCalibrate(
    model: MODEL,
    positive: CONDITIONING,
    latent: LATENT,
    negative: Link(CONDITIONING, optional=True) = None,
    seed: Annotated[int, Spec(min=0, max=2**63 - 1, seed=True)] = 0,
    steps: Annotated[int, Spec(min=2, max=1000)] = 28,
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 4.0,
) -> str:
    """Sample once uncached and measure the residual magnitude ratio of every step (MagCache's
    one-sample calibration); connect the result to MagCache's ratios."""
    records = _calibration_run(model, hooks.MagCacheCalibration(), positive, negative, latent, seed, steps, cfg)
    return ", ".join(f"{r:.5f}" for r in hooks.magcache_ratios_from_records(records))


@node(category=CATEGORY, outputs={"coefficients": STRING}, display_name="TeaCache Calibrate")
def TeaCacheCalibrate(
    model: MODEL,
    positive: CONDITIONING,
    latent: LATENT,
    negative: Link(CONDITIONING, optional=True) = None,
    seed: Annotated[int, Spec(min=0, max=2**63 - 1, seed=True)] = 0,
    steps: Annotated[int, Spec(min=6, max=1000)] = 50,
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 4.0,
) -> str:
    """Sample uncached and fit TeaCache's rescaling polynomial (degree 4) for this model from
    (input change, output change) pairs; a batch of several prompts gives a better fit."""
    records = _calibration_run(model, hooks.TeaCacheCalibration(), positive, negative, latent, seed, steps, cfg)
    return ", ".join(f"{c:.8g}" for c in hooks.fit_teacache(records))
