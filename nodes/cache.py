"""Cache accelerators: training-free MODEL patches that skip transformer blocks between steps.

Each node takes a MODEL and returns a new MODEL view carrying one cache patch (the input is
never changed). The machinery is in app/models/accelerators/: diffusers-style hooks on the block
stack of every family (SD3/shapes-dit, Flux, PixArt, Sana, Lumina 2, Wan with both Wan 2.2
experts, LTX-Video; attention methods also on the blocks' attention), per-run state made fresh
for every sampling run. Common widgets: ``start``/``end`` (fraction of the steps where skipping
is allowed), ``max_skips`` (most calls skipped in a row; 0 = no limit). After a run the
sampler's node gets a ``cache`` event with the number of skipped calls and blocks.

Thresholds at 0 (dynamic methods) or interval 1 (static ones, PAB, FasterCache) never skip and
give exactly the uncached result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from app.core import vocabulary as vocab
from app.core.registry import Link, node
from app.core.types import CONDITIONING, LATENT, MODEL, STRING
from app.models import accelerators as hooks
from app.models.handles import ModelHandle

CATEGORY = "model_patches/cache"


def _cache_node(method: type[hooks.CacheMethod]) -> Callable:
    """The node of one cache method: a MODEL input, then the method's settings as widgets
    (declared once, as field metadata of the method's dataclass)."""

    def patch_model(model: ModelHandle, **widgets: Any) -> ModelHandle:
        hooks.stack_blocks(model.transformer)  # fail now, not mid-run, on a model we cannot hook
        if method.name in model.info.cache_refused:
            usable = [m.display_name for m in hooks.METHODS.values() if m.name not in model.info.cache_refused]
            raise ValueError(f"{method.display_name} does not support {model.family} models yet "
                             f"(these do: {', '.join(usable)})")
        return model.with_patch(hooks.CachePatch(method.from_widgets(model.family, **widgets)))

    model_param = inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=MODEL)
    patch_model.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [model_param, *hooks.widget_parameters(method)], return_annotation=ModelHandle)
    patch_model.__name__ = patch_model.__qualname__ = method.node_name
    patch_model.__doc__ = method.__doc__
    return node(category=CATEGORY, outputs={"model": MODEL}, display_name=method.display_name)(patch_model)


# one node per registered method: FirstBlockCache, TeaCache, MagCache, EasyCache, TaylorSeer, ...
for _method in hooks.METHODS.values():
    globals()[_method.node_name] = _cache_node(_method)


def _calibration_run(model: ModelHandle, method: hooks.CacheMethod, positive, negative, latent, seed: int,
                     steps: int, cfg: float) -> list:
    from app.models.sampling import compute_sigmas, sample

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
    seed: vocab.SEED = 0,
    steps: vocab.steps(minimum=2) = 28,
    cfg: vocab.CFG = 4.0,
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
    seed: vocab.SEED = 0,
    steps: vocab.steps(minimum=6) = 50,
    cfg: vocab.CFG = 4.0,
) -> str:
    """Sample uncached and fit TeaCache's rescaling polynomial (degree 4) for this model from
    (input change, output change) pairs; a batch of several prompts gives a better fit."""
    records = _calibration_run(model, hooks.TeaCacheCalibration(), positive, negative, latent, seed, steps, cfg)
    return ", ".join(f"{c:.8g}" for c in hooks.fit_teacache(records))
