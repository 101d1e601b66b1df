"""Calling one node function: its run context, out-of-memory recovery, output normalising."""

from __future__ import annotations

import gc
import traceback
from typing import Any

import torch

from app.core.context import RunCancelled, RunContext, reset_current, set_current
from app.core.memo import MemoCache
from app.core.registry import NodeDef, NodeResult
from app.core.runstate import NodeFailed


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def call_node(nd: NodeDef, kwargs: dict, ctx: RunContext, cache: MemoCache) -> tuple[tuple, dict | None]:
    """Run ``nd`` with ``kwargs`` under ``ctx``; returns (outputs, ui). On out-of-memory,
    move the memo cache's GPU entries to CPU and try once more; any failure becomes NodeFailed."""
    token = set_current(ctx)
    try:
        for attempt in (1, 2):
            try:
                return normalise(nd, nd.function(**kwargs))
            except RunCancelled:
                raise
            except Exception as exc:
                if is_oom(exc) and attempt == 1:
                    free_device_memory(cache)
                    continue
                raise NodeFailed(ctx.node_id, nd.type, _failure_message(exc, ctx), traceback.format_exc()) from None
    finally:
        reset_current(token)
    raise AssertionError("unreachable")


def free_device_memory(cache: MemoCache) -> None:
    """Free what the memo cache holds on the GPU (it stays cached, on CPU)."""
    cache.spill_all()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _failure_message(exc: Exception, ctx: RunContext) -> str:
    if is_oom(exc):
        return (f"out of memory on {ctx.device} even after freeing cached GPU results: {exc}. "
                "Lower the resolution or batch size, or run with --device cpu.")
    return f"{type(exc).__name__}: {exc}"


def normalise(nd: NodeDef, returned: Any) -> tuple[tuple, dict | None]:
    """A node's return value as (outputs tuple in declaration order, ui data or None)."""
    ui = None
    if isinstance(returned, NodeResult):
        ui, returned = returned.ui, returned.outputs
    count = len(nd.outputs)
    if isinstance(returned, dict) and count and set(returned) == {o.name for o in nd.outputs}:
        outputs = tuple(returned[o.name] for o in nd.outputs)
    elif count == 1 and not (isinstance(returned, tuple) and len(returned) == 1):
        outputs = (returned,)
    elif count == 0:
        outputs = ()
    else:
        outputs = tuple(returned)
    if len(outputs) != count:
        raise TypeError(f"{nd.type} returned {len(outputs)} values for {count} outputs")
    return outputs, ui
