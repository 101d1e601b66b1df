"""RF-Edit feature sharing (Wang et al. 2024) as a MODEL patch: record the attention values V of
late blocks during inversion and substitute them during the first editing steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from app.models.handles import ModelPatch, SamplingRun


def attention_value_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The value projections (``to_v``) of every block's self/joint attention, in depth order.

    SD3/shapes-dit/Flux double blocks: ``transformer_blocks.i.attn``; Flux single blocks:
    ``single_transformer_blocks.i.attn``; PixArt/Sana: ``transformer_blocks.i.attn1`` (self);
    Lumina 2: ``layers.i.attn``.
    """
    found = []
    for attr in ("transformer_blocks", "single_transformer_blocks", "layers"):
        blocks = getattr(transformer, attr, None)
        if blocks is None:
            continue
        for index, block in enumerate(blocks):
            attn = getattr(block, "attn1", None) or getattr(block, "attn", None)
            to_v = getattr(attn, "to_v", None) if attn is not None else None
            if isinstance(to_v, torch.nn.Module):
                found.append((f"{attr}.{index}", to_v))
    return found


def late_blocks(transformer: torch.nn.Module, count: int = 0) -> tuple[str, ...]:
    """Names of the last ``count`` attention blocks (0: the later half)."""
    names = [name for name, _ in attention_value_modules(transformer)]
    if not names:
        raise ValueError(f"{type(transformer).__name__}: no attention value projections found for RF-Edit")
    if count <= 0:
        count = max(1, math.ceil(len(names) / 2))
    return tuple(names[-count:])


class AttentionValuePatch(ModelPatch):
    """RF-Edit feature sharing as a MODEL patch.

    mode "record": while ``run.extras["value_key"]`` is set, every output of the chosen blocks'
    value projections is stored under (key, block) in a fresh per-run dict (left in
    ``run.extras["attention_values"]``). mode "inject": the stored tensor replaces the output
    for the same key (repeated along the batch when the editing batch is larger, e.g. CFG).
    """

    def __init__(self, mode: str, blocks: tuple[str, ...], store: dict | None = None):
        if mode not in ("record", "inject"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode, self.blocks, self.store = mode, tuple(blocks), store
        self.key = f"rf-edit-{mode}({len(self.blocks)} blocks)"

    def begin_run(self, run: SamplingRun) -> dict:
        modules = dict(attention_value_modules(run.transformer))
        missing = [b for b in self.blocks if b not in modules]
        if missing:
            raise ValueError(f"RF-Edit: the model has no attention block(s) {', '.join(missing)}; "
                             "invert and edit with the same model")
        state: dict[str, Any] = {"store": {} if self.mode == "record" else (self.store or {}), "handles": [], "hits": 0}
        for name in self.blocks:
            state["handles"].append(modules[name].register_forward_hook(self._hook(run, state, name)))
        if self.mode == "record":
            run.extras["attention_values"] = state["store"]
        return state

    def end_run(self, run: SamplingRun, state: dict) -> None:
        for handle in state["handles"]:
            handle.remove()
        run.extras["attention_value_hits"] = state["hits"]

    def _hook(self, run: SamplingRun, state: dict, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            key = run.extras.get("value_key")
            if key is None:
                return None
            store = state["store"]
            if self.mode == "record":
                store[(key, name)] = output.detach().clone()
                return None
            recorded = store.get((key, name))
            if recorded is None:
                recorded = store.get(((key[0], 0), name))
            if recorded is None:
                return None
            recorded = recorded.to(output.device, output.dtype)
            if recorded.shape != output.shape:
                n, m = recorded.shape[0], output.shape[0]
                if recorded.shape[1:] != output.shape[1:]:
                    return None
                if n > m and n % m == 0:  # recorded with CFG (negative, positive): keep the positive rows
                    recorded = recorded[-m:]
                elif m % n == 0:  # editing with CFG: the same values for every half
                    recorded = recorded.repeat(m // n, *([1] * (recorded.dim() - 1)))
                else:
                    return None
            state["hits"] += 1
            return recorded

        return hook
