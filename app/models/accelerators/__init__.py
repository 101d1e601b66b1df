"""Training-free cache accelerators as block-level hooks, generic over our DiT families.

One runtime (:mod:`.runtime`: block discovery, per-run state, the diffusers block hook, the
MODEL patch) serves every method; each method is one module holding one frozen dataclass: its
settings (with the node's widget ranges and tooltips as field metadata) and its skip decisions.

  fbc        First-Block Cache: run block 0, skip the rest if its residual barely moved
  teacache   accumulate poly(rel-L1 of block 0's timestep-modulated input) < delta
  magcache   accumulated |1 - prod(gamma)| <= delta with calibrated magnitude ratios gamma
  easycache  online transformation-rate estimate k*|dx|/|y| accumulated < tau
  taylorseer full compute every N calls, Taylor forecast (order m) of the residual between
  cgtaylor   forecast block 0 and the residual; skip the rest if block 0's forecast error < gate
  deltadit   Δ-DiT: cache the rear blocks' deviation early, the front blocks' late
  fora       static: recompute every N calls, reuse the residual between
  pab        Pyramid Attention Broadcast: reuse self/cross attention outputs for N/M calls
  fastercache  FasterCache's attention reuse: extrapolate self attention from its last two outputs

Block methods skip whole blocks; attention methods (subclasses of :class:`AttentionMethod`) run
every block and reuse attention outputs inside them. Every method works on the image families
and on the video transformers (Wan 2.1/2.2 with both experts, LTX-Video). Attention methods keep
one output (FasterCache: two) per attention module and CFG branch: on a large video model that
is several GB.

Adding an accelerator
---------------------
1. Write ``app/models/accelerators/<name>.py`` with one ``@register``-ed frozen dataclass
   subclassing :class:`CacheMethod`; set ``name`` (the bench/summary key), ``node_name`` and
   ``display_name`` (the node). Declare each setting with
   ``setting(default, min=..., max=..., tooltip=...)``: that is the node's widget.
2. Decide in ``plan(rt, slot, block0, args, kwargs)`` before block 0 runs: return
   ``Plan(track=(a, b))`` to compute and record blocks [a, b), or ``self.skip((a, b), residual)``
   to skip them. Keep history in ``slot.m`` (per run, per CFG branch), never on ``self``.
   Override ``store`` to keep more than the residual; subclass :class:`HeadGatedMethod` and
   override ``after_head`` to decide after block 0 ran. ``rt.may_skip(slot)`` applies the
   common start/end/max_skips gates. A method acting inside the blocks subclasses
   :class:`AttentionMethod` and implements ``attention(rt, slot, key, module, args, kwargs,
   forward)`` instead, returning (output, reused?); ``rt.in_window(slot)`` is its start/end gate.
3. A text widget resolved per family (like TeaCache's coefficients) uses
   ``setting(..., widget=(str, "auto"))`` and a ``from_widgets`` classmethod.
4. Add a never-skip and an aggressive setting to ``METHODS`` in ``tests/fixtures/cache_models.py``
   (tests/models/test_cache*.py run them on every image and video family).
This package discovers the module; ``nodes/cache.py`` makes its node from the dataclass.
"""

from __future__ import annotations

import importlib
import pkgutil

from app.models.accelerators.calibration import (
    MagCacheCalibration,
    TeaCacheCalibration,
    fit_teacache,
    magcache_ratios_from_records,
)
from app.models.accelerators.method import (
    METHODS,
    AttentionMethod,
    CacheMethod,
    HeadGatedMethod,
    register,
    setting,
    widget_parameters,
)
from app.models.accelerators.runtime import (
    HOOK_PREFIX,
    CachePatch,
    CacheRun,
    Plan,
    Slot,
    add_listener,
    block_arg,
    modulated_input,
    poly,
    rel_l1,
    resample_nearest,
    stack_blocks,
)

_INFRASTRUCTURE = {"calibration", "method", "runtime"}


def _discover() -> None:
    """Import every method module so its ``@register`` runs; expose each class here."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{__name__}.{info.name}")
    for cls in METHODS.values():
        globals()[cls.__name__] = cls


_discover()

from app.models.accelerators.magcache import magcache_ratios  # noqa: E402 (after discovery, like the classes)
from app.models.accelerators.teacache import teacache_coefficients, teacache_domain  # noqa: E402

__all__ = [
    "HOOK_PREFIX", "METHODS", "AttentionMethod", "CacheMethod", "CachePatch", "CacheRun", "HeadGatedMethod", "MagCacheCalibration",
    "Plan", "Slot", "TeaCacheCalibration", "add_listener", "block_arg", "fit_teacache", "magcache_ratios",
    "magcache_ratios_from_records", "modulated_input", "poly", "register", "rel_l1", "resample_nearest", "setting",
    "stack_blocks", "teacache_coefficients", "teacache_domain", "widget_parameters",
    *(cls.__name__ for cls in METHODS.values()),
]
