"""Text encoding -> CONDITIONING, per family.

shapes-dit: MiniLM (all-MiniLM-L6-v2), 40 tokens, padded positions zeroed, masked-mean pooled.
SD3: CLIP-L + CLIP-G (penultimate layer, pooled) + T5; Flux: CLIP-L pooled + T5;
PixArt-Σ: T5 with mask; Sana / Lumina 2: Gemma with mask; Qwen-Image: Qwen2.5-VL, which also
sees the input images of an edit (TextEncodeImageEdit). The real families reuse the
``encode_prompt`` code of their diffusers pipelines (built with only the text components),
so the embeddings are exactly those the pipelines compute. Each family's recipe lives in its
module in app/models/families/ (``encode_text`` / ``encode_negative``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import torch

from app.core.registry import Link, node
from app.core.types import CONDITIONING, IMAGE, LATENT, TEXT_ENCODER, VAE, Spec
from app.models import families
from app.models.families.base import references_of
from app.models.handles import TextEncoders

FAMILY_CHOICES = ["auto", *families.FAMILIES]
EDIT_MODES = ["auto", *dict.fromkeys(m for f in families.FAMILIES.values() for m in f.edit_modes)]


@dataclass(eq=False)
class Conditioning:
    """The CONDITIONING value: what the transformer attends to for one prompt batch.

    ``embeds`` (B, L, D) token embeddings; ``pooled`` (B, P) pooled vector (SD3, Flux,
    shapes-dit) or None; ``mask`` (B, L) attention mask (PixArt, Sana, Lumina 2) or None;
    ``extras`` family-specific values (Flux: "guidance"; edit models: "reference_latents", a
    tuple of input images' latents); ``texts`` the prompts.
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
def encode(encoders: TextEncoders, prompts: list[str], family: str, max_length: int = 0) -> Conditioning:
    """Encode ``prompts`` the way ``family``'s pipeline does."""
    return _conditioning(encoders, prompts, family, max_length, negative=False)


@torch.no_grad()
def encode_negative(encoders: TextEncoders, prompts: list[str], family: str, max_length: int = 0) -> Conditioning:
    """The unconditional/negative side. Differs from :func:`encode` only where the family's
    pipeline encodes negatives differently (Sana: no complex human instruction; Lumina 2: no
    system prompt)."""
    return _conditioning(encoders, prompts, family, max_length, negative=True)


def _conditioning(encoders: TextEncoders, prompts: list[str], family: str, max_length: int, negative: bool) -> Conditioning:
    fam = families.get(family)
    recipe = fam.encode_negative if negative else fam.encode_text
    encoders.ensure_device()
    try:
        embeds, pooled, mask = recipe(encoders, prompts, max_length)
    finally:
        encoders.release()
    return Conditioning(embeds, pooled, mask, family, tuple(prompts))


@torch.no_grad()
def encode_pair(encoders: TextEncoders, positive: str, negative: str, family: str) -> tuple[Conditioning, Conditioning]:
    """Both sides of classifier-free guidance, in one batched text-encoder pass where the
    family's pipeline encodes them alike (both padded to the same length). On a GPU, T5-XXL's
    forward is bound by Python overhead, so two prompts in one batch take about the time of one
    (H100: 51 ms for the pair, 48 + 48 ms as two calls; bench/results/gpu_parity_profile.json)."""
    fam = families.get(family)
    if fam.negative_differs or fam.own_length_prompts:  # e.g. negatives skip an instruction prefix: two passes
        return encode(encoders, [positive], family), encode_negative(encoders, [negative], family)
    both = encode(encoders, [positive, negative], family)

    def row(i: int) -> Conditioning:
        pick = lambda t: None if t is None else t[i:i + 1]  # noqa: E731
        return replace(both, embeds=pick(both.embeds), pooled=pick(both.pooled), mask=pick(both.mask),
                       texts=(both.texts[i],))

    return row(0), row(1)


def _family(encoders: TextEncoders, choice: str) -> str:
    if choice != "auto":
        return choice
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
def TextEncodeImageEdit(
    text_encoder: TEXT_ENCODER,
    text: Annotated[str, Spec(multiline=True, tooltip="The edit instruction (or, on the negative's node, the negative prompt).")] = "",
    image: Link(IMAGE, "The image to edit (Picture 1); none: plain text encoding.", optional=True) = None,
    image2: Link(IMAGE, "edit-plus: a second image (Picture 2).", optional=True) = None,
    image3: Link(IMAGE, "edit-plus: a third image (Picture 3).", optional=True) = None,
    vae: Link(VAE, "Also attach the images' latents as reference tokens, as the edit pipelines do "
                   "(give the negative's node the same images and VAE).", optional=True) = None,
    mode: Annotated[str, Spec(choices=EDIT_MODES, tooltip="edit: Qwen-Image-Edit (one image); edit-plus: Edit-2509/2511 "
                                                          "(1-3 images); auto: the checkpoint's, else edit-plus.")] = "auto",
    family: Annotated[str, Spec(choices=FAMILY_CHOICES)] = "auto",
) -> Conditioning:
    """Encode an edit instruction that sees the input image(s) (Qwen-Image-Edit): the text encoder
    reads them with the prompt; with a VAE their latents become reference tokens too."""
    fam = families.get(_family(text_encoder, family))
    images = [i for i in (image, image2, image3) if i is not None]
    text_encoder.ensure_device()
    try:
        with torch.no_grad():
            embeds, pooled, mask = fam.encode_text_with_images(text_encoder, _prompts(text), images, mode)
    finally:
        text_encoder.release()
    conditioning = Conditioning(embeds, pooled, mask, fam.name, (text,))
    if vae is None or not images:
        return conditioning
    latents = [vae.encode(pixels) for pixels in fam.reference_images(images, mode)]
    return conditioning.with_extras(reference_latents=tuple(latents))


@node(category="conditioning", outputs={"conditioning": CONDITIONING})
def ReferenceLatent(conditioning: CONDITIONING, latent: LATENT) -> Conditioning:
    """Attach an image's latent (VAEEncode) for in-context editing models (Flux.1 Kontext, Flux.2,
    Qwen-Image-Edit); each ReferenceLatent adds one more image, up to the number the model takes."""
    out = conditioning.with_extras(reference_latents=(*references_of(conditioning), latent.samples))
    if conditioning.family:
        fam = families.get(conditioning.family)
        if not fam.reference_latents:
            kinds = ", ".join(f.name for f in families.FAMILIES.values() if f.reference_latents)
            raise ValueError(f"{conditioning.family} models take no reference image ({kinds} do)")
        fam.references(out)  # refuses one beyond the family's count (Kontext: 1)
    return out


@node(category="conditioning", outputs={"conditioning": CONDITIONING})
def ConditioningZeroOut(conditioning: CONDITIONING) -> Conditioning:
    """The same conditioning with every embedding set to zero (an 'empty' negative for some models)."""
    zero = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
    return replace(conditioning, embeds=zero(conditioning.embeds), pooled=zero(conditioning.pooled))
