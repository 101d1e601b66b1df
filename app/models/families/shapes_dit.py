"""shapes-dit: the bundled small SD3-type model (MiniLM text, 4-channel VAE, 128 px)."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.sd3 import SD3


class ShapesDiT(SD3):
    name = "shapes-dit"
    pipeline_class = None
    latent_channels = 4
    text_slots = ("minilm",)
    optional_text_slots = ()
    pipeline_text_slots = {"minilm": "text_encoder"}
    manifest_text_encoder = True  # ditgraph.json names the MiniLM package or folder
    default_cfg = 4.0
    default_size = 128
    detect_priority = 30  # an SD3 transformer config: asked before sd3
    state_dict_aliases = ("sd3",)

    def matches_config(self, config: dict) -> bool:
        # MiniLM-sized text inputs: the bundled model (even before its manifest is written)
        return super().matches_config(config) and config.get("joint_attention_dim") == 384 == config.get("pooled_projection_dim")

    def matches_pipeline(self, class_name: str) -> bool:
        return False

    def matches_state_dict(self, joined_keys: str) -> bool:
        return False  # indistinguishable from sd3 by names (accepted through state_dict_aliases)

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        if "minilm" not in encoders.slots:
            raise ValueError(f"shapes-dit needs the MiniLM text encoder; got {', '.join(encoders.slots) or 'none'}")
        tokenizer, model = encoders.slots["minilm"]
        length = max_length or int(encoders.options.get("max_length", 40))
        hidden, pooled = encode_minilm(tokenizer, model, prompts, length)
        return hidden, pooled, None

    def text_options(self, transformer: torch.nn.Module) -> dict:
        return {}


@torch.no_grad()
def encode_minilm(tokenizer, model, prompts: list[str], max_length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """shapes-dit convention (training/text.py): hidden states with padding zeroed, mean pooled."""
    device = next(model.parameters()).device
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = tok["attention_mask"].to(device)
    token_types = tok.get("token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(tok["input_ids"])
    out = model(input_ids=tok["input_ids"].to(device), attention_mask=mask, token_type_ids=token_types.to(device))
    hidden = out.last_hidden_state
    m = mask[..., None].to(hidden.dtype)
    hidden = hidden * m
    pooled = hidden.sum(1) / m.sum(1).clamp(min=1)
    return hidden, pooled


FAMILY = ShapesDiT()
