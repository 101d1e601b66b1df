"""Text encoding -> CONDITIONING, per family.

shapes-dit: MiniLM (all-MiniLM-L6-v2), 40 tokens, padded positions zeroed, masked-mean pooled.
SD3: CLIP-L + CLIP-G (penultimate layer, pooled) + T5; Flux: CLIP-L pooled + T5;
PixArt-Σ: T5 with mask; Sana / Lumina 2: Gemma with mask. The real families reuse the
``encode_prompt`` code of their diffusers pipelines (built with only the text components),
so the embeddings are exactly those the pipelines compute.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Annotated, Any

import torch

from app.models import families
from app.models.handles import TextEncoders
from app.core.registry import node
from app.core.types import CONDITIONING, TEXT_ENCODER, Spec

FAMILY_CHOICES = ["auto", *families.FAMILIES]


@dataclass(eq=False)
class Conditioning:
    """The CONDITIONING value: what the transformer attends to for one prompt batch.

    ``embeds`` (B, L, D) token embeddings; ``pooled`` (B, P) pooled vector (SD3, Flux,
    shapes-dit) or None; ``mask`` (B, L) attention mask (PixArt, Sana, Lumina 2) or None;
    ``extras`` family-specific values (Flux: "guidance"); ``texts`` the prompts.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    family: str = ""
    texts: tuple[str, ...] = ()
    extras: dict = field(default_factory=dict)

    def with_extras(self, **values: Any) -> Conditioning:
        return replace(self, extras={**self.extras, **values})


# ---------------------------------------------------------------------------------------------


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


def _pipeline_for(family: str, encoders: TextEncoders):
    """A diffusers pipeline object holding only the text components (no weights copied)."""
    import diffusers

    cls = getattr(diffusers, families.get(family).pipeline_class)
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    kwargs: dict[str, Any] = {n: None for n in names}
    for slot, component in families.PIPELINE_TEXT_SLOTS[family].items():
        if slot in encoders.slots:
            tokenizer, model = encoders.slots[slot]
            kwargs[component] = model
            kwargs[component.replace("text_encoder", "tokenizer")] = tokenizer
    missing = [s for s in families.get(family).text_slots if s not in encoders.slots and not (family == "sd3" and s == "t5")]
    if missing:
        raise ValueError(f"{family} needs text encoder(s) {', '.join(missing)}; this TEXT_ENCODER has "
                         f"{', '.join(encoders.slots) or 'none'} (load them with TextEncoderLoader)")
    return cls(**kwargs)


@torch.no_grad()
def encode(encoders: TextEncoders, prompts: list[str], family: str, max_length: int = 0) -> Conditioning:
    """Encode ``prompts`` the way ``family``'s pipeline does."""
    try:
        return _encode(encoders, prompts, family, max_length)
    finally:
        encoders.release()


def _encode(encoders: TextEncoders, prompts: list[str], family: str, max_length: int) -> Conditioning:
    encoders.ensure_device()
    device = encoders.device
    if family == "shapes-dit":
        if "minilm" not in encoders.slots:
            raise ValueError(f"shapes-dit needs the MiniLM text encoder; got {', '.join(encoders.slots) or 'none'}")
        tokenizer, model = encoders.slots["minilm"]
        length = max_length or int(encoders.options.get("max_length", 40))
        hidden, pooled = encode_minilm(tokenizer, model, prompts, length)
        return Conditioning(hidden, pooled, None, family, tuple(prompts))
    pipe = _pipeline_for(family, encoders)
    if family == "sd3":
        kw = {"max_sequence_length": max_length} if max_length else {}
        if "t5" not in encoders.slots:  # the pipeline pads with zeros as wide as the transformer's text input
            width = int(encoders.options.get("joint_attention_dim", 4096))
            object.__setattr__(pipe, "transformer", SimpleNamespace(config=SimpleNamespace(joint_attention_dim=width)))
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                  do_classifier_free_guidance=False, **kw)
        return Conditioning(embeds, pooled, None, family, tuple(prompts))
    if family == "flux":
        kw = {"max_sequence_length": max_length} if max_length else {}
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, **kw)
        return Conditioning(embeds, pooled, None, family, tuple(prompts))
    if family in ("pixart", "sana", "lumina2"):
        kw: dict[str, Any] = {"max_sequence_length": max_length} if max_length else {}
        if family == "sana":  # the pipeline's __call__ prefixes its "complex human instruction"
            kw["complex_human_instruction"] = _call_default(pipe, "complex_human_instruction")
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device, **kw)
        return Conditioning(embeds, None, mask, family, tuple(prompts))
    raise ValueError(f"no text encoding for family {family!r}")


@torch.no_grad()
def encode_negative(encoders: TextEncoders, prompts: list[str], family: str, max_length: int = 0) -> Conditioning:
    """The unconditional/negative side. Differs from :func:`encode` only where the family's
    pipeline encodes negatives differently (Sana: no complex human instruction; Lumina 2: no
    system prompt)."""
    if family in ("sana", "lumina2"):
        try:
            return _encode_negative_gemma(encoders, prompts, family, max_length)
        finally:
            encoders.release()
    return encode(encoders, prompts, family, max_length)


def _encode_negative_gemma(encoders: TextEncoders, prompts: list[str], family: str, max_length: int) -> Conditioning:
    if family == "sana":
        pipe = _pipeline_for(family, encoders)
        encoders.ensure_device()
        length = max_length or 300
        embeds, mask = pipe._get_gemma_prompt_embeds(prompts, device=encoders.device, dtype=encoders.dtype,
                                                     max_sequence_length=length, complex_human_instruction=False)
        return Conditioning(embeds, None, mask, family, tuple(prompts))
    if family == "lumina2":
        pipe = _pipeline_for(family, encoders)
        encoders.ensure_device()
        embeds, mask = pipe._get_gemma_prompt_embeds(prompts, device=encoders.device, max_sequence_length=max_length or 256)
        return Conditioning(embeds, None, mask, family, tuple(prompts))
    raise AssertionError(family)


@torch.no_grad()
def encode_pair(encoders: TextEncoders, positive: str, negative: str, family: str) -> tuple[Conditioning, Conditioning]:
    """Both sides of classifier-free guidance, in one batched text-encoder pass where the
    family's pipeline encodes them alike (both padded to the same length). On a GPU, T5-XXL's
    forward is bound by Python overhead, so two prompts in one batch take about the time of one
    (H100: 51 ms for the pair, 48 + 48 ms as two calls; bench/results/gpu_parity_profile.json)."""
    if family in ("sana", "lumina2"):  # their negatives skip the instruction prefix: two passes
        return encode(encoders, [positive], family), encode_negative(encoders, [negative], family)
    both = encode(encoders, [positive, negative], family)

    def row(i: int) -> Conditioning:
        pick = lambda t: None if t is None else t[i:i + 1]  # noqa: E731
        return replace(both, embeds=pick(both.embeds), pooled=pick(both.pooled), mask=pick(both.mask),
                       texts=(both.texts[i],))

    return row(0), row(1)


def _call_default(pipe: Any, name: str) -> Any:
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _family(encoders: TextEncoders, family: str) -> str:
    if family != "auto":
        return family
    guessed = encoders.guess_family()
    if guessed is None:
        raise ValueError(f"cannot tell the family from text encoders {', '.join(encoders.slots)}; "
                         "set the 'family' input (e.g. sana or lumina2 for Gemma)")
    return guessed


def _prompts(text: str) -> list[str]:
    return [text]


@node(category="conditioning", outputs={"conditioning": CONDITIONING})
def TextEncode(
    text_encoder: TEXT_ENCODER,
    text: Annotated[str, Spec(multiline=True, tooltip="The prompt.")] = "",
    family: Annotated[str, Spec(choices=FAMILY_CHOICES, tooltip="Whose conventions to encode with; auto: the checkpoint's.")] = "auto",
) -> Conditioning:
    """Encode a prompt into CONDITIONING for the positive input of a sampler."""
    fam = _family(text_encoder, family)
    return encode(text_encoder, _prompts(text), fam)


@node(category="conditioning", outputs={"conditioning": CONDITIONING})
def TextEncodeNegative(
    text_encoder: TEXT_ENCODER,
    text: Annotated[str, Spec(multiline=True, tooltip="What to steer away from; empty = unconditional.")] = "",
    family: Annotated[str, Spec(choices=FAMILY_CHOICES)] = "auto",
) -> Conditioning:
    """Encode the negative/unconditional prompt the way the family's pipeline does (Sana and
    Lumina 2 encode negatives without their instruction prefix)."""
    fam = _family(text_encoder, family)
    return encode_negative(text_encoder, _prompts(text), fam)


@node(category="conditioning", outputs={"positive": CONDITIONING, "negative": CONDITIONING})
def TextEncodePair(
    text_encoder: TEXT_ENCODER,
    prompt: Annotated[str, Spec(multiline=True, tooltip="The prompt.")] = "",
    negative_prompt: Annotated[str, Spec(multiline=True, tooltip="What to steer away from; empty = unconditional.")] = "",
    family: Annotated[str, Spec(choices=FAMILY_CHOICES)] = "auto",
) -> tuple[Conditioning, Conditioning]:
    """Encode the prompt and the negative prompt together: one text-encoder pass for both
    (about half the time of TextEncode + TextEncodeNegative on a GPU), the same conditionings.
    Editing either prompt re-encodes both."""
    fam = _family(text_encoder, family)
    return encode_pair(text_encoder, prompt, negative_prompt, fam)


@node(category="conditioning", outputs={"conditioning": CONDITIONING})
def FluxGuidance(
    conditioning: CONDITIONING,
    guidance: Annotated[float, Spec(min=0.0, max=100.0, step=0.1, tooltip="Flux-dev distilled guidance (embedded, not CFG).")] = 3.5,
) -> Conditioning:
    """Set the distilled guidance value Flux-dev embeds (guidance-distilled models only)."""
    return conditioning.with_extras(guidance=float(guidance))


@node(category="conditioning", outputs={"conditioning": CONDITIONING})
def ConditioningZeroOut(conditioning: CONDITIONING) -> Conditioning:
    """The same conditioning with every embedding set to zero (an 'empty' negative for some models)."""
    zero = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
    return replace(conditioning, embeds=zero(conditioning.embeds), pooled=zero(conditioning.pooled))
