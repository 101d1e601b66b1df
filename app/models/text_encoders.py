"""The TEXT_ENCODER value: (tokenizer, model) per slot plus the family they were loaded for."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from app.models import families
from app.models.residency import Resident


@dataclass(eq=False)
class TextEncoders(Resident):
    """The TEXT_ENCODER value: text encoders by slot ("clip_l", "clip_g", "t5", "gemma",
    "minilm"), each a (tokenizer, model) pair, plus the family they were loaded for (if known)."""

    slots: dict[str, tuple[Any, torch.nn.Module]]
    family: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)  # e.g. shapes-dit max_length
    source: str = ""
    residency: str = "resident"
    memory: list = field(default_factory=list)  # the VRAM plan's placements (app/models/budget.py place)

    def _modules(self) -> list[torch.nn.Module]:
        return [model for _, model in self.slots.values()]

    def merged(self, other: TextEncoders) -> TextEncoders:
        # one value for both: it moves off after use if either part was planned to
        residency = "offload" if "offload" in (self.residency, other.residency) else self.residency
        return replace(self, slots={**self.slots, **other.slots}, family=self.family or other.family,
                       options={**other.options, **self.options}, residency=residency,
                       memory=[*self.memory, *other.memory])

    def guess_family(self) -> str | None:
        if self.family:
            return self.family
        candidates = families.families_for_text_slots(set(self.slots))
        return candidates[0] if len(candidates) == 1 else None  # e.g. Gemma: Sana or Lumina 2, must be told
