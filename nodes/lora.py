"""LoRA loaders: patch a MODEL with one or more LoRAs (see app/models/patches/lora.py for formats and
the patch design). The returned MODEL is a view: the cached input MODEL and its shared
transformer are never changed; the LoRA is active only while a sampler runs.
"""

from __future__ import annotations

import logging
from typing import Annotated

from app.core import paths
from app.core import vocabulary as vocab
from app.models.patches.lora import LoraFile, lora_patch, read_lora, vae_with_lora
from app.core.registry import NodeResult, node
from app.core.types import LORA, MODEL, VAE, Spec

log = logging.getLogger(__name__)


def _lora_choices() -> list[str]:
    bundled = sorted(p.relative_to(paths.BUNDLED_MODELS).as_posix()
                     for p in paths.BUNDLED_MODELS.glob("*lora*/*.safetensors"))
    return paths.list_files("loras") + bundled


STRENGTH = vocab.weight("LoRA weight; negative pushes away from the LoRA, 0 = off.")
FUSE = Spec(tooltip="Merge into copies of the weights for each run: base speed, but one extra copy of the "
                    "targeted weights in memory while sampling. Off: applied on the fly (little memory).")


def _apply(model, lora: LoraFile, strength: float, fuse: bool) -> NodeResult:
    patch = lora_patch(lora, model, strength, fuse)
    summary = patch.report.summary()
    if patch.report.unmatched or patch.report.wrong_shape:
        log.warning("%s", summary)
    return NodeResult((model.with_patch(patch),), {"text": [summary]})


@node(category="loaders", outputs={"model": MODEL})
def LoraLoader(
    model: MODEL,
    lora: Annotated[str, Spec(file="loras", choices=_lora_choices,
                              tooltip="A LoRA .safetensors file (diffusers/peft, kohya, XLabs; Flux, SD3, PixArt, "
                                      "Sana, Lumina 2, shapes-dit) or a peft adapter folder.")],
    strength: STRENGTH = 1.0,
    fuse: Annotated[bool, FUSE] = False,
) -> NodeResult:
    """Apply a LoRA to the diffusion model. Chain several for a stack, each with its own strength.
    The node shows how many of the LoRA's layers matched; a LoRA that matches nothing is an error."""
    return _apply(model, read_lora(lora), strength, fuse)


@node(category="loaders", outputs={"lora": LORA})
def LoadLora(
    lora: Annotated[str, Spec(file="loras", choices=_lora_choices, tooltip="A LoRA .safetensors file or peft folder.")],
) -> LoraFile:
    """Read a LoRA file once (for ApplyLora: changing the strength then does not re-read the file)."""
    return read_lora(lora)


@node(category="loaders", outputs={"model": MODEL})
def ApplyLora(
    model: MODEL,
    lora: LORA,
    strength: STRENGTH = 1.0,
    fuse: Annotated[bool, FUSE] = False,
) -> NodeResult:
    """Apply a LORA (from LoadLora) to the diffusion model at a strength."""
    return _apply(model, lora, strength, fuse)


@node(category="loaders", outputs={"vae": VAE})
def VAELoraLoader(
    vae: VAE,
    lora: Annotated[str, Spec(file="loras", choices=_lora_choices,
                              tooltip="A LoRA file with VAE-decoder layers ('vae.' keys), e.g. the shapes-dit "
                                      "outlined style.")],
    strength: STRENGTH = 1.0,
) -> NodeResult:
    """Apply the VAE-decoder part of a LoRA: returns a merged copy of the VAE (the input VAE is
    not changed; costs one more VAE in memory). Use with LoraLoader on the same file when a
    style needs decoder changes the base VAE cannot reproduce."""
    patched, report = vae_with_lora(vae, read_lora(lora), strength)
    text = f"{report.name}: {report.matched}/{report.total} VAE-decoder LoRA layers matched"
    return NodeResult((patched,), {"text": [text]})
