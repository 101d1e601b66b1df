"""Images: load from the input folder, save (PNG with the workflow embedded), preview, animations.

IMAGE values are float tensors (B, H, W, 3) in [0, 1] on CPU; MASK values (B, H, W).
Saved files are never overwritten: names are ``{prefix}_{counter:05d}.png`` with the next
free counter, claimed atomically (O_EXCL). A prefix may contain ``{item}`` (the element of a
list sweep this call saves, 0 outside a sweep) and ``{batch}`` (the image's index in its
batch); in a sweep a prefix without ``{item}`` gets ``_{item:03d}`` appended, so each
element's files are told apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from app.core import paths
from app.core.context import current
from app.core.images import open_image
from app.core.output_files import claim_path, split_prefix
from app.core.registry import NodeResult, node
from app.core.types import IMAGE, MASK, Spec


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def prompt_texts(workflow: dict) -> list[str]:
    """The prompts of the positive text-encode nodes of a workflow document (for PNG metadata),
    following a link to a primitive (e.g. one PrimitiveString feeding several encoders)."""
    nodes = workflow.get("nodes") or {}
    texts = []
    for inst in nodes.values():
        if not (isinstance(inst, dict) and inst.get("type") == "TextEncode"):
            continue
        value = (inst.get("inputs") or {}).get("text")
        for _ in range(8):  # follow primitive/reroute chains
            if not (isinstance(value, dict) and isinstance(value.get("from"), list) and value["from"]):
                break
            source = nodes.get(str(value["from"][0])) or {}
            inputs = source.get("inputs") or {}
            value = inputs.get("value", inputs.get("text"))
        if isinstance(value, str) and value and value not in texts:
            texts.append(value)
    return texts


def _png_info(extra_text: dict[str, str]) -> PngImagePlugin.PngInfo:
    ctx = current()
    info = PngImagePlugin.PngInfo()
    if ctx.workflow:
        info.add_text("workflow", json.dumps(ctx.workflow, separators=(",", ":")))
        texts = prompt_texts(ctx.workflow)
        if texts:
            info.add_text("prompt", texts[0] if len(texts) == 1 else json.dumps(texts))
    for key, value in extra_text.items():
        info.add_text(key, value)
    return info


def batch_prefix(prefix: str, batch: int) -> str:
    """``prefix`` with ``{item}`` (list sweep element) and ``{batch}`` (index in the batch) filled."""
    item = current().list_index
    if item is not None and "{item}" not in prefix:
        prefix = f"{prefix.rstrip()}_{item:03d}"
    return prefix.replace("{item}", f"{item or 0:03d}").replace("{batch}", f"{batch:02d}")


def _save_pngs(images: torch.Tensor, base: Path, prefix: str, kind: str, compress_level: int) -> list[dict]:
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE (B, H, W, 3), got shape {tuple(images.shape)}")
    info = _png_info({})
    saved = []
    for batch, array in enumerate(to_uint8(images)):
        if array.shape[-1] == 1:
            array = array[..., 0]
        folder, sub, stem = split_prefix(base, batch_prefix(prefix, batch))
        path = claim_path(folder, stem, ".png")
        Image.fromarray(array).save(path, pnginfo=info, compress_level=compress_level)
        saved.append({"filename": path.name, "subfolder": sub, "type": kind})
    return saved


@node(category="image", outputs={}, output_node=True)
def SaveImage(
    images: IMAGE,
    filename_prefix: Annotated[str, Spec(tooltip="File name prefix; may include a subfolder (e.g. shapes/run), "
                                                 "{item} (list sweep element) and {batch} (image in the batch).")] = "ditgraph",
) -> NodeResult:
    """Save images as PNG into the output folder, with the workflow embedded (drop the PNG on the
    editor to restore the workflow). Existing files are never overwritten."""
    saved = _save_pngs(images, current().output_dir, filename_prefix, "output", 4)
    return NodeResult((), {"images": saved})


@node(category="image", outputs={}, output_node=True)
def PreviewImage(images: IMAGE) -> NodeResult:
    """Show images on the node without keeping them (written to the temp folder)."""
    saved = _save_pngs(images, paths.temp_dir(), "preview", "temp", 1)
    return NodeResult((), {"images": saved})


@node(category="image", outputs={"image": IMAGE, "mask": MASK})
def LoadImage(
    image: Annotated[str, Spec(file="input", choices=lambda: paths.list_files("input", (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"), folders=False),
                               tooltip="An image in the input folder.")],
) -> tuple:
    """Load an image from the input folder; its alpha channel (if any) becomes the mask
    (1 where transparent, i.e. the area to fill)."""
    img = open_image(image)  # refuses decompression bombs before decoding
    rgba = img.convert("RGBA")
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    array = np.asarray(rgba).astype(np.float32) / 255.0
    pixels = torch.from_numpy(array[..., :3].copy())[None]
    if has_alpha:
        mask = 1.0 - torch.from_numpy(array[..., 3].copy())[None]
    else:
        mask = torch.zeros(1, *pixels.shape[1:3])
    return pixels, mask


@node(category="image", outputs={}, output_node=True)
def SaveAnimated(
    images: IMAGE,
    filename_prefix: str = "ditgraph",
    fps: Annotated[float, Spec(min=0.1, max=120.0, step=0.1)] = 8.0,
    format: Annotated[str, Spec(choices=["gif", "mp4"], tooltip="mp4: H.264 through imageio-ffmpeg.")] = "gif",
    loop: Annotated[bool, Spec(tooltip="GIF: loop forever.")] = True,
) -> NodeResult:
    """Save a batch of images as an animation (each batch item is a frame)."""
    import imageio.v3 as iio

    frames = to_uint8(images if images.dim() == 4 else images[None])
    folder, sub, stem = split_prefix(current().output_dir, filename_prefix)
    path = claim_path(folder, stem, f".{format}")
    try:
        if format == "gif":
            iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0 if loop else 1)
        else:
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                raise ValueError("mp4 output needs the imageio-ffmpeg package (pip install imageio-ffmpeg); "
                                 "choose gif otherwise") from None
            iio.imwrite(path, frames, extension=".mp4", fps=fps)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return NodeResult((), {"images": [{"filename": path.name, "subfolder": sub, "type": "output"}], "animated": [True]})


@node(category="image", outputs={"image": IMAGE})
def ImageBatch(first: IMAGE, second: IMAGE) -> torch.Tensor:
    """Concatenate two image batches (the second is resized to the first's size if needed)."""
    if first.shape[1:3] != second.shape[1:3]:
        second = torch.nn.functional.interpolate(second.permute(0, 3, 1, 2), size=first.shape[1:3],
                                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return torch.cat([first, second])
