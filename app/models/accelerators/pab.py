"""Pyramid Attention Broadcast (PAB): reuse each attention's output for several steps, cross
attention longer than self attention (arXiv 2408.12588).

The rule is diffusers' ``PyramidAttentionBroadcastHook``: an attention module computes on its
first call, outside the reuse window and every N-th call, and returns its previous output
otherwise. Here the count and the cached output are kept per slot, so with CFG evaluated as two
calls (Wan) the conditional branch never gets the unconditional branch's attention (diffusers'
hook keeps one state per module and would mix them).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.models.accelerators.method import AttentionMethod, register, setting
from app.models.accelerators.runtime import is_cross_attention


@register
@dataclass(frozen=True)
class PyramidAttentionBroadcast(AttentionMethod):
    """PAB: compute self attention every N steps and cross attention every M steps, and
    broadcast (reuse) each one's output in between; the feed-forward layers always run."""

    self_interval: int = setting(2, min=1, max=100, tooltip=(
        "Compute self attention every N steps, reuse it between (1 = never reuse)."))
    cross_interval: int = setting(6, min=1, max=100, tooltip=(
        "Compute cross (text) attention every M steps, reuse it between (1 = never reuse)."))
    start: float = setting(0.2, min=0.0, max=1.0, step=0.01, tooltip="No attention broadcast before this fraction of the steps.")
    end: float = setting(0.9, min=0.0, max=1.0, step=0.01, tooltip="No attention broadcast from this fraction of the steps on.")
    name = "pab"
    node_name = "PyramidAttentionBroadcast"
    display_name = "Pyramid Attention Broadcast"

    def attention(self, rt, slot, key, module, args, kwargs, forward):
        state = slot.m.setdefault(("pab", key), {"iteration": 0, "output": None})
        interval = self.cross_interval if is_cross_attention(module, args, kwargs) else self.self_interval
        compute = (state["output"] is None or state["iteration"] == 0 or not rt.in_window(slot)
                   or state["iteration"] % interval == 0)
        output = forward(*args, **kwargs) if compute else state["output"]
        state["output"] = output
        state["iteration"] += 1
        return output, not compute
