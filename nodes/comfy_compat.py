"""Small nodes that give imported ComfyUI workflows their utility nodes' capabilities.

ManualSigmas (a typed-in schedule), StringConcatenate, MathExpression, ImageSize,
ScaleToMegapixels, ImageScale, ImageScaleBy, Canny, ScaleToSide, FluxKontextImageScale,
ImageStitch, ResolutionSelector and ImageFromBatch: each is what the ComfyUI node of (nearly) the
same name does, on our types (the image logic: app/models/images.py). (ComfyUI's switch maps onto
the lazy ``If`` of nodes/core.py.)
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Annotated, Any

import torch

from app.core.registry import Link, node
from app.core.types import ANY, BOOLEAN, FLOAT, IMAGE, INT, SIGMAS, STRING, Spec
from app.models import images


@node(category="sampling", outputs={"sigmas": SIGMAS})
def ManualSigmas(sigmas: Annotated[str, Spec(tooltip="Comma-separated noise levels, highest first, e.g. '1, 0.75, 0.4, 0'.")]
                 = "1, 0.5, 0") -> torch.Tensor:
    """A schedule typed in by hand (flow sigmas in [0, 1], decreasing)."""
    try:
        values = [float(part) for part in sigmas.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"sigmas {sigmas!r}: expected numbers separated by commas") from None
    if len(values) < 2 or any(b > a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"sigmas {sigmas!r}: need at least two values, highest first")
    return torch.tensor(values, dtype=torch.float32)


@node(category="core/utility", outputs={"string": STRING})
def StringConcatenate(string_a: Annotated[str, Spec(multiline=True)] = "", string_b: Annotated[str, Spec(multiline=True)] = "",
                      delimiter: str = "") -> str:
    """``string_a + delimiter + string_b``."""
    return f"{string_a}{delimiter}{string_b}"


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
              ast.UAdd: operator.pos, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
              ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FUNCTIONS = {"min": min, "max": max, "abs": abs, "round": round, "sqrt": math.sqrt, "ceil": math.ceil,
              "floor": math.floor, "log": math.log, "log2": math.log2, "log10": math.log10, "sin": math.sin,
              "cos": math.cos, "tan": math.tan, "int": int, "float": float, "pow": pow}


def _evaluate(tree: ast.AST, names: dict[str, float]) -> Any:
    """Numbers, a..h, + - * / // % **, comparisons, x if c else y and the functions above; nothing else."""
    match tree:
        case ast.Expression(body=body):
            return _evaluate(body, names)
        case ast.Constant(value=value) if isinstance(value, (int, float)):
            return value
        case ast.Name(id=name) if name in names:
            return names[name]
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _OPERATORS:
            if isinstance(op, ast.Pow) and abs(_evaluate(right, names)) > 1000:
                raise ValueError("exponent too large")
            return _OPERATORS[type(op)](_evaluate(left, names), _evaluate(right, names))
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _OPERATORS:
            return _OPERATORS[type(op)](_evaluate(operand, names))
        case ast.Compare(left=left, ops=[op], comparators=[right]) if type(op) in _OPERATORS:
            return _OPERATORS[type(op)](_evaluate(left, names), _evaluate(right, names))
        case ast.IfExp(test=test, body=body, orelse=orelse):
            return _evaluate(body if _evaluate(test, names) else orelse, names)
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            return _FUNCTIONS[name](*(_evaluate(arg, names) for arg in args))
    raise ValueError(f"not allowed in an expression: {ast.unparse(tree) if isinstance(tree, ast.expr) else tree}")


_NUMBER = Link(ANY, "A number (integer or float).", optional=True)


@node(category="core/primitives", outputs={"float": FLOAT, "int": INT, "bool": BOOLEAN})
def MathExpression(expression: str = "a + b", a: _NUMBER = None, b: _NUMBER = None, c: _NUMBER = None, d: _NUMBER = None,
                   e: _NUMBER = None, f: _NUMBER = None, g: _NUMBER = None, h: _NUMBER = None) -> tuple:
    """Evaluate an arithmetic expression of the connected numbers a..h (e.g. 'max(a, b) * 2')."""
    names = {k: v for k, v in {"a": a, "b": b, "c": c, "d": d, "e": e, "f": f, "g": g, "h": h}.items() if v is not None}
    try:
        result = _evaluate(ast.parse(expression, mode="eval"), names)
    except SyntaxError as exc:
        raise ValueError(f"expression {expression!r}: {exc.msg}") from None
    return float(result), int(result), bool(result)


@node(category="image", outputs={"width": INT, "height": INT, "batch_size": INT})
def ImageSize(image: IMAGE) -> tuple:
    """Width, height and batch size of an image batch."""
    return int(image.shape[2]), int(image.shape[1]), int(image.shape[0])


_METHOD = Annotated[str, Spec(choices=images.METHODS)]


@node(category="image", outputs={"image": IMAGE})
def ScaleToMegapixels(
    image: IMAGE,
    method: _METHOD = "bicubic",
    megapixels: Annotated[float, Spec(min=0.01, max=64.0, step=0.01, tooltip="Target size in megapixels (1 = 1024x1024).")] = 1.0,
    resolution_steps: Annotated[int, Spec(min=1, max=256, tooltip="Width and height become multiples of this.")] = 1,
) -> torch.Tensor:
    """Resize keeping the aspect ratio so the image has about ``megapixels`` x 1024² pixels."""
    height, width = image.shape[1:3]
    scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
    height, width = (max(resolution_steps, round(side * scale / resolution_steps) * resolution_steps) for side in (height, width))
    return images.resize(image, method, width, height)


@node(category="image", outputs={"image": IMAGE})
def ImageScale(
    image: IMAGE,
    method: _METHOD = "bicubic",
    width: Annotated[int, Spec(min=0, max=16384, tooltip="0: keep the aspect ratio from height.")] = 512,
    height: Annotated[int, Spec(min=0, max=16384, tooltip="0: keep the aspect ratio from width.")] = 512,
    crop: Annotated[str, Spec(choices=["disabled", "center"], tooltip="center: crop to the target aspect first.")] = "disabled",
) -> torch.Tensor:
    """Resize to width x height (stretching, or cropping the centre to the target aspect ratio)."""
    old_h, old_w = image.shape[1:3]
    if width == 0 and height == 0:
        return image
    width = width or max(1, round(old_w * height / old_h))
    height = height or max(1, round(old_h * width / old_w))
    return images.resize(image, method, width, height, crop)


@node(category="image", outputs={"image": IMAGE})
def ImageScaleBy(
    image: IMAGE,
    method: _METHOD = "bicubic",
    scale_by: Annotated[float, Spec(min=0.01, max=8.0, step=0.01)] = 1.0,
) -> torch.Tensor:
    """Resize by a factor, keeping the aspect ratio."""
    height, width = (max(1, round(side * scale_by)) for side in image.shape[1:3])
    return images.resize(image, method, width, height)


@node(category="image", outputs={"image": IMAGE})
def Canny(
    image: IMAGE,
    low_threshold: Annotated[float, Spec(min=0.01, max=0.99, step=0.01, tooltip="Weak edges kept when touching strong ones.")] = 0.4,
    high_threshold: Annotated[float, Spec(min=0.01, max=0.99, step=0.01, tooltip="Strong edges.")] = 0.8,
) -> torch.Tensor:
    """Canny-style edge map (white edges on black) for edge ControlNets: Sobel gradients of the
    blurred luminance, thinned to local maxima, double threshold with hysteresis."""
    gray = (image[..., :3] * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True).movedim(-1, 1)
    blur = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    gray = torch.nn.functional.conv2d(torch.nn.functional.pad(gray, (2, 2, 2, 2), mode="replicate"),
                                      (blur[:, None] * blur[None, :])[None, None])
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = torch.nn.functional.conv2d(padded, sobel[None, None])
    gy = torch.nn.functional.conv2d(padded, sobel.T[None, None])
    magnitude = torch.sqrt(gx**2 + gy**2) / 4
    horizontal = gx.abs() >= gy.abs()  # thin across the gradient: compare with the two neighbours along it
    side = torch.nn.functional.pad(magnitude, (1, 1, 1, 1))
    along_x = torch.maximum(side[..., 1:-1, :-2], side[..., 1:-1, 2:])
    along_y = torch.maximum(side[..., :-2, 1:-1], side[..., 2:, 1:-1])
    thin = magnitude * (magnitude >= torch.where(horizontal, along_x, along_y))
    strong, weak = thin >= high_threshold, thin >= low_threshold
    edges = strong
    for _ in range(max(image.shape[1:3])):  # grow strong edges along weak ones until nothing changes
        grown = weak & (torch.nn.functional.max_pool2d(edges.float(), 3, 1, 1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.float().movedim(1, -1).expand(-1, -1, -1, 3).contiguous()


@node(category="image", outputs={"image": IMAGE})
def ScaleToSide(
    image: IMAGE,
    method: _METHOD = "bicubic",
    side: Annotated[str, Spec(choices=["longer", "shorter"])] = "longer",
    size: Annotated[int, Spec(min=1, max=16384, tooltip="The chosen side's length in pixels.")] = 1024,
) -> torch.Tensor:
    """Resize so the longer (or shorter) side is ``size`` pixels, keeping the aspect ratio."""
    height, width = images.side_size(image.shape[1], image.shape[2], side, size)
    return images.resize(image, method, width, height)


@node(category="image", outputs={"image": IMAGE})
def FluxKontextImageScale(image: IMAGE) -> torch.Tensor:
    """Crop and resize to the Flux.1 Kontext training size nearest in aspect ratio (as FluxKontextPipeline
    does with its input image)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    width, height = images.nearest_size(image.shape[2], image.shape[1], PREFERRED_KONTEXT_RESOLUTIONS)
    return images.resize(image, "bicubic", width, height, crop="center")


@node(category="image", outputs={"image": IMAGE})
def ImageStitch(
    image1: IMAGE,
    image2: Link(IMAGE, "Placed beside image1; none: image1 unchanged.", optional=True) = None,
    direction: Annotated[str, Spec(choices=["right", "down", "left", "up"], tooltip="Where image2 goes.")] = "right",
    match_image_size: Annotated[bool, Spec(tooltip="Resize image2 to image1's height (left/right) or width "
                                                   "(up/down); off: pad the smaller one.")] = True,
    spacing_width: Annotated[int, Spec(min=0, max=1024, step=2, tooltip="Pixels between the two.")] = 0,
    spacing_color: Annotated[str, Spec(choices=list(images.SPACING_COLOURS))] = "white",
) -> torch.Tensor:
    """Join two images side by side or one above the other (e.g. several reference images for
    an in-context editing model)."""
    if image2 is None:
        return image1
    return images.stitch(image1, image2, direction, match_image_size, spacing_width, spacing_color)


ASPECT_RATIOS = ["1:1 (Square)", "3:2 (Photo)", "4:3 (Standard)", "16:9 (Widescreen)", "21:9 (Ultrawide)",
                 "2:3 (Portrait Photo)", "3:4 (Portrait Standard)", "9:16 (Portrait Widescreen)"]


@node(category="core/utility", outputs={"width": INT, "height": INT})
def ResolutionSelector(
    aspect_ratio: Annotated[str, Spec(choices=ASPECT_RATIOS)] = "1:1 (Square)",
    megapixels: Annotated[float, Spec(min=0.1, max=16.0, step=0.1, tooltip="1 = about 1024x1024.")] = 1.0,
    multiple: Annotated[int, Spec(min=8, max=128, step=4, tooltip="Width and height become multiples of this.")] = 8,
) -> tuple:
    """Width and height for an aspect ratio and a pixel count (for an empty latent)."""
    ratio_w, ratio_h = (int(part) for part in aspect_ratio.split(" ")[0].split(":"))
    return images.aspect_size(ratio_w, ratio_h, megapixels, multiple)


@node(category="image", outputs={"image": IMAGE})
def ImageFromBatch(
    image: IMAGE,
    index: Annotated[int, Spec(min=0, max=4095, tooltip="First image; past the end: the last one.")] = 0,
    length: Annotated[int, Spec(min=1, max=4096)] = 1,
) -> torch.Tensor:
    """Images [index, index+length) of a batch (clipped to the batch, as ComfyUI does)."""
    index = min(image.shape[0] - 1, index)
    return image[index:index + length].clone()
