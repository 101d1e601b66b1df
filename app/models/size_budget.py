"""Refuse a model whose config asks for more parameters than a budget, before allocating anything.

A config is data from the models folder: ``num_layers: 1000000`` would otherwise build a
million blocks. The count comes from the model class itself, built on the meta device (no
memory for weights) with each layer-count field at 1 and at 2: parameters grow linearly in
each, so two tiny builds per field give the exact total without building the large model.
"""

from __future__ import annotations

import os

import torch

# config fields that count repeated blocks, across diffusers' DiT classes and VAEs
LAYER_FIELDS = ("num_layers", "num_single_layers", "num_hidden_layers", "num_refiner_layers", "depth", "n_layers",
                "num_blocks", "layers_per_block")
DEFAULT_MAX_PARAMETERS = 40_000_000_000  # above every DiT ditgraph knows (Flux: 12 B)
MAX_LAYERS = 1024  # per field; real DiTs have tens (a million tiny blocks is cheap in weights, not in modules)


def max_parameters() -> int:
    """The budget: $DITGRAPH_MAX_PARAMETERS or 40 billion."""
    return int(os.environ.get("DITGRAPH_MAX_PARAMETERS") or DEFAULT_MAX_PARAMETERS)


def _count(cls, config: dict) -> int:
    with torch.device("meta"):
        model = cls.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate_parameters(cls, config: dict) -> int:
    """How many parameters ``cls.from_config(config)`` would have (built only with 1-2 layers per field)."""
    fields = [f for f in LAYER_FIELDS if isinstance(config.get(f), int) and not isinstance(config.get(f), bool)]
    base_config = {k: v for k, v in config.items() if not k.startswith("_")} | {f: 1 for f in fields}
    base = _count(cls, base_config)
    total = base
    for name in fields:
        per_layer = _count(cls, base_config | {name: 2}) - base
        total += per_layer * (config[name] - 1)
    return total


def check_parameter_budget(cls, config: dict, where: str, budget: int | None = None) -> int:
    """The parameter count; ValueError naming ``where`` when it is over the budget (nothing allocated)."""
    budget = max_parameters() if budget is None else budget
    for name in LAYER_FIELDS:
        value = config.get(name)
        if isinstance(value, int) and value > MAX_LAYERS:
            raise ValueError(f"{where}: its config asks for {name} = {value:,}, over the limit of {MAX_LAYERS}")
    count = estimate_parameters(cls, config)
    if count > budget:
        raise ValueError(f"{where}: its config asks for {count:,} parameters, over the budget of {budget:,} "
                         "(set DITGRAPH_MAX_PARAMETERS to allow more)")
    return count
