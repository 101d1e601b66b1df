"""Calling one node function: its run context, async functions, out-of-memory recovery,
output normalising."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import traceback
from typing import Any

import torch

from app.core.context import RunCancelled, RunContext, reset_current, set_current
from app.core.memo import MemoCache
from app.core.registry import Expansion, NodeDef, NodeResult
from app.core.runstate import NodeFailed

Returned = tuple[tuple | Expansion, dict | None]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def call_node(nd: NodeDef, kwargs: dict, ctx: RunContext, cache: MemoCache) -> Returned:
    """Run a synchronous node once; returns (outputs or an Expansion, ui). On out-of-memory,
    move the memo cache's GPU entries to CPU and try once more; any failure becomes NodeFailed
    naming the node."""
    token = set_current(ctx)
    try:
        for attempt in (1, 2):
            try:
                return normalise(nd, nd.function(**kwargs), mapped=ctx.list_index is not None)
            except RunCancelled:
                raise
            except Exception as exc:
                if is_oom(exc) and attempt == 1:
                    free_device_memory(cache)
                    continue
                raise _failed(nd, ctx, exc) from None
    finally:
        reset_current(token)
    raise AssertionError("unreachable")


async def call_async_node(nd: NodeDef, kwargs: dict, ctx: RunContext) -> Returned:
    """Run an ``async def`` node once, on the engine's event loop."""
    token = set_current(ctx)
    try:
        return normalise(nd, await nd.function(**kwargs), mapped=ctx.list_index is not None)
    except RunCancelled:
        raise
    except Exception as exc:
        raise _failed(nd, ctx, exc) from None
    finally:
        reset_current(token)


async def call_async_elements(nd: NodeDef, calls: list[tuple[dict, RunContext]]) -> list[Returned]:
    """Several calls of an async node (list elements), concurrently."""
    return list(await asyncio.gather(*(call_async_node(nd, kwargs, ctx) for kwargs, ctx in calls)))


def element_ctx(ctx: RunContext, index: int, count: int) -> RunContext:
    """The context of the call for list element ``index`` of ``count``."""
    return dataclasses.replace(ctx, list_index=index, list_size=count)


def _failed(nd: NodeDef, ctx: RunContext, exc: Exception) -> NodeFailed:
    if is_oom(exc):
        message = (f"out of memory on {ctx.device} even after freeing cached GPU results: {exc}. "
                   "Lower the resolution or batch size, or run with --device cpu.")
    else:
        message = f"{type(exc).__name__}: {exc}"
    return NodeFailed(ctx.node_id, nd.type, message, traceback.format_exc())


def free_device_memory(cache: MemoCache) -> None:
    """Free what the memo cache holds on the GPU (it stays cached, on CPU)."""
    cache.spill_all()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def normalise(nd: NodeDef, returned: Any, mapped: bool = False) -> Returned:
    """A node's return value as (outputs tuple in declaration order, ui data or None), or
    (Expansion, None) for a node that returned a graph."""
    if isinstance(returned, Expansion):
        if mapped:
            raise TypeError(f"{nd.type} returned an Expansion while mapped over a list; expand once and map inside")
        return returned, None
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
