"""The shapes world of shapes-dit, exactly as /shared/shapes-spec.md defines it.

Everything here is vectorised in torch so one call renders a whole batch (GPU for on-the-fly
training data, CPU for tests and evaluation).

Conventions
- Pixel (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5); the image spans [0, 128].
- Anti-aliasing: coverage = clamp(0.5 - d, 0, 1) where d is the (approximate) signed distance
  in pixels from the pixel centre to the shape edge (negative inside).
- A batch of scenes is a `SceneBatch` of tensors, up to MAX_OBJECTS objects per scene (`valid`).
- Cells are numbered row-major 0..8 (0 = top left, 4 = center, 8 = bottom right).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

SIZE = 128
MAX_OBJECTS = 2
COLOUR_NAMES = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
PALETTE = torch.tensor(
    [
        (220, 40, 40),
        (40, 180, 60),
        (40, 70, 220),
        (235, 210, 40),
        (140, 50, 170),
        (245, 140, 30),
        (245, 245, 245),
        (20, 20, 20),
    ],
    dtype=torch.float32,
)
BLACK, WHITE = 7, 6
SHAPE_NAMES = ["circle", "square", "triangle"]
SIZE_NAMES = ["small", "large"]
SIZE_RADII = [11.0, 19.0]
RADIUS_JITTER = 1.6
CENTRE_JITTER = 4.0
POSITION_NAMES = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
CELL = SIZE / 3.0
# shape geometry in units of the radius (the spec's): a square's half-side; a triangle's apex at
# cy - r, base at cy + TRI_BASE r (height TRI_HEIGHT r), half-width TRI_SLOPE px per px below the apex
SQUARE_HALF = 0.9
TRI_BASE = 0.85
TRI_HEIGHT = 1.85
TRI_SLOPE = 0.55


def cell_centre(cell: int) -> tuple[float, float]:
    """(x, y) of the centre of a grid cell."""
    r, c = divmod(cell, 3)
    return (2 * c + 1) / 6 * SIZE, (2 * r + 1) / 6 * SIZE


def cell_bounds(cell: int) -> tuple[int, int, int, int]:
    """Pixel index bounds (y0, y1, x0, x1), end exclusive, of the pixels whose centre is in the cell."""
    r, c = divmod(cell, 3)
    # pixel centre j + 0.5 lies in [c*CELL, (c+1)*CELL)
    x0, x1 = math.ceil(c * CELL - 0.5), math.ceil((c + 1) * CELL - 0.5)
    y0, y1 = math.ceil(r * CELL - 0.5), math.ceil((r + 1) * CELL - 0.5)
    return y0, y1, x0, x1


def nominal_area(shape: int, radius: float) -> float:
    """Area in px² of a shape of the given radius (the evaluator's 'expected area')."""
    if shape == 0:
        return math.pi * radius * radius
    if shape == 1:
        return (2 * SQUARE_HALF * radius) ** 2
    height = TRI_HEIGHT * radius
    return TRI_SLOPE * height * height  # half-width TRI_SLOPE*h at the base: area = 0.5 * (2*TRI_SLOPE*h) * h


# --------------------------------------------------------------------------------------------
# scenes


@dataclass
class SceneObject:
    shape: int  # index into SHAPE_NAMES
    colour: int  # index into COLOUR_NAMES
    size: int  # index into SIZE_NAMES
    cell: int | None  # 0..8, or None when the caption does not name a position
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0


@dataclass
class Scene:
    background: int
    objects: list[SceneObject] = field(default_factory=list)


@dataclass
class SceneBatch:
    """B scenes as tensors (all on one device)."""

    background: torch.Tensor  # (B,) long
    shape: torch.Tensor  # (B, K) long
    colour: torch.Tensor  # (B, K) long
    size: torch.Tensor  # (B, K) long
    cell: torch.Tensor  # (B, K) long, -1 when off-grid
    cx: torch.Tensor  # (B, K) float
    cy: torch.Tensor  # (B, K) float
    radius: torch.Tensor  # (B, K) float
    valid: torch.Tensor  # (B, K) bool
    name_position: torch.Tensor  # (B,) bool: caption names positions

    def __len__(self) -> int:
        return int(self.background.shape[0])

    def to(self, device) -> SceneBatch:
        return SceneBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def scenes(self) -> list[Scene]:
        d = {k: v.cpu().tolist() for k, v in self.__dict__.items()}
        out = []
        for b in range(len(self)):
            objs = []
            for k in range(self.shape.shape[1]):
                if not d["valid"][b][k]:
                    continue
                cell = d["cell"][b][k]
                objs.append(
                    SceneObject(
                        shape=d["shape"][b][k], colour=d["colour"][b][k], size=d["size"][b][k],
                        cell=(cell if cell >= 0 and d["name_position"][b] else None),
                        cx=d["cx"][b][k], cy=d["cy"][b][k], radius=d["radius"][b][k],
                    )
                )
            out.append(Scene(background=d["background"][b], objects=objs))
        return out


def scenes_to_batch(scenes: list[Scene], device="cpu") -> SceneBatch:
    """Pack Scene objects (with geometry filled in) into a SceneBatch."""
    B, K = len(scenes), MAX_OBJECTS
    t = {n: torch.zeros(B, K, dtype=torch.long) for n in ("shape", "colour", "size")}
    cell = torch.full((B, K), -1, dtype=torch.long)
    f = {n: torch.zeros(B, K) for n in ("cx", "cy", "radius")}
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b, s in enumerate(scenes):
        for k, o in enumerate(s.objects[:K]):
            t["shape"][b, k], t["colour"][b, k], t["size"][b, k] = o.shape, o.colour, o.size
            cell[b, k] = -1 if o.cell is None else o.cell
            f["cx"][b, k], f["cy"][b, k], f["radius"][b, k] = o.cx, o.cy, o.radius
            valid[b, k] = True
    bg = torch.tensor([s.background for s in scenes], dtype=torch.long)
    name_pos = torch.tensor([all(o.cell is not None for o in s.objects) for s in scenes])
    return SceneBatch(background=bg, cell=cell, valid=valid, name_position=name_pos, **t, **f).to(device)


def _generator(seed_or_gen, device) -> torch.Generator:
    if isinstance(seed_or_gen, torch.Generator):
        return seed_or_gen
    g = torch.Generator(device=device)
    g.manual_seed(int(seed_or_gen))
    return g


def sample_scenes(n: int, seed=0, device="cpu", control: bool = False, p_two: float = 0.5,
                  p_name_position: float = 0.5) -> SceneBatch:
    """Sample n random scenes, deterministic given `seed` (an int or a torch.Generator on `device`).

    control=False: the on-grid world (1 or 2 objects in distinct cells).
    control=True: control-training scenes: centres anywhere (non-overlapping, inside the image);
    `cell` is the cell containing the centre, and captions name positions with probability
    `p_name_position` (per scene).
    """
    g = _generator(seed, device)
    dev = torch.device(device)
    K = MAX_OBJECTS
    u = lambda *shape: torch.rand(*shape, generator=g, device=dev)  # noqa: E731
    ri = lambda hi, *shape: torch.randint(0, hi, shape, generator=g, device=dev)  # noqa: E731
    bg = ri(8, n)
    n_obj = 1 + (u(n) < p_two).long()
    valid = torch.arange(K, device=dev)[None, :] < n_obj[:, None]
    # colour != background: draw from the 7 others
    colour = ri(7, n, K)
    colour = colour + (colour >= bg[:, None]).long()
    shape = ri(3, n, K)
    size = ri(2, n, K)
    radius = torch.tensor(SIZE_RADII, device=dev)[size] + (u(n, K) * 2 - 1) * RADIUS_JITTER
    if not control:
        # two distinct cells: a random permutation of 9 per scene, take the first K
        cell = torch.argsort(u(n, 9), dim=1)[:, :K]
        col, row = cell % 3, cell // 3
        cx = (2 * col + 1).float() / 6 * SIZE + (u(n, K) * 2 - 1) * CENTRE_JITTER
        cy = (2 * row + 1).float() / 6 * SIZE + (u(n, K) * 2 - 1) * CENTRE_JITTER
        name_pos = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        margin = radius + 2.0
        cx = margin + u(n, K) * (SIZE - 2 * margin)
        cy = margin + u(n, K) * (SIZE - 2 * margin)
        # resample the second object until it does not overlap the first (bounded tries)
        for _ in range(20):
            d = torch.hypot(cx[:, 1] - cx[:, 0], cy[:, 1] - cy[:, 0])
            bad = d < (radius[:, 0] + radius[:, 1] + 3.0)
            if not bool(bad.any()):
                break
            m1 = margin[:, 1]
            new_x = m1 + u(n) * (SIZE - 2 * m1)
            new_y = m1 + u(n) * (SIZE - 2 * m1)
            cx[:, 1] = torch.where(bad, new_x, cx[:, 1])
            cy[:, 1] = torch.where(bad, new_y, cy[:, 1])
        d = torch.hypot(cx[:, 1] - cx[:, 0], cy[:, 1] - cy[:, 0])
        valid[:, 1] &= d >= (radius[:, 0] + radius[:, 1] + 3.0)
        col = (cx / CELL).long().clamp(0, 2)
        row = (cy / CELL).long().clamp(0, 2)
        cell = row * 3 + col
        name_pos = u(n) < p_name_position
        # two objects in one cell cannot both be named by position
        same = (cell[:, 0] == cell[:, 1]) & valid[:, 1]
        name_pos &= ~same
    return SceneBatch(background=bg, shape=shape, colour=colour, size=size, cell=cell,
                      cx=cx, cy=cy, radius=radius, valid=valid, name_position=name_pos)


# --------------------------------------------------------------------------------------------
# captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(o: SceneObject) -> str:
    colour = COLOUR_NAMES[o.colour]
    text = f"a {SIZE_NAMES[o.size]} {colour} {SHAPE_NAMES[o.shape]}"
    if o.cell is not None:
        text += " in the center" if o.cell == 4 else f" at the {POSITION_NAMES[o.cell]}"
    return text


def caption(scene: Scene) -> str:
    """'a large red circle at the top left and a small blue square in the center on a white background'."""
    bg = COLOUR_NAMES[scene.background]
    return " and ".join(object_phrase(o) for o in scene.objects) + f" on {_article(bg)} {bg} background"


def captions(batch: SceneBatch) -> list[str]:
    return [caption(s) for s in batch.scenes()]


_OBJ_RE = re.compile(
    r"^an? (small|large) (" + "|".join(COLOUR_NAMES) + r") (circle|square|triangle)"
    r"(?: (?:at the (" + "|".join(POSITION_NAMES) + r")|(in the center)))?$"
)
_BG_RE = re.compile(r"^(.*) on an? (" + "|".join(COLOUR_NAMES) + r") background$")


def parse_caption(text: str) -> Scene:
    """Parse a caption of the world's grammar into a Scene (geometry = nominal: cell centre, radius).

    Raises ValueError for text outside the grammar.
    """
    t = " ".join(text.strip().lower().rstrip(".").split())
    m = _BG_RE.match(t)
    if not m:
        raise ValueError(f"caption has no 'on a <colour> background' ending: {text!r}")
    objs = []
    for part in m.group(1).split(" and "):
        om = _OBJ_RE.match(part)
        if not om:
            raise ValueError(f"cannot parse object phrase {part!r} in caption {text!r}")
        size = SIZE_NAMES.index(om.group(1))
        cell = 4 if om.group(5) else (POSITION_NAMES.index(om.group(4)) if om.group(4) else None)
        cx, cy = cell_centre(cell) if cell is not None else (SIZE / 2, SIZE / 2)
        objs.append(SceneObject(shape=SHAPE_NAMES.index(om.group(3)), colour=COLOUR_NAMES.index(om.group(2)),
                                size=size, cell=cell, cx=cx, cy=cy, radius=SIZE_RADII[size]))
    return Scene(background=COLOUR_NAMES.index(m.group(2)), objects=objs)


# --------------------------------------------------------------------------------------------
# rendering


def signed_distance(batch: SceneBatch, size: int = SIZE) -> torch.Tensor:
    """(B, K, H, W) approximate signed distance in px to each object's edge (negative inside)."""
    dev = batch.cx.device
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, 1, size)
    y = coords.view(1, 1, size, 1)
    cx, cy, r = (t.float()[:, :, None, None] for t in (batch.cx, batch.cy, batch.radius))
    dx, dy = x - cx, y - cy
    d_circle = torch.sqrt(dx * dx + dy * dy) - r
    d_square = torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF * r
    top = cy - r
    k = TRI_SLOPE
    d_side = (dx.abs() - k * (y - top)) / math.sqrt(1 + k * k)
    d_base = y - (cy + TRI_BASE * r)
    d_tri = torch.maximum(d_side, d_base)
    shp = batch.shape[:, :, None, None]
    d = torch.where(shp == 0, d_circle, torch.where(shp == 1, d_square, d_tri))
    return torch.where(batch.valid[:, :, None, None], d, torch.full_like(d, 1e4))


def vertex_distance(batch: SceneBatch, size: int = SIZE) -> torch.Tensor:
    """(B, K, H, W) distance in px from each pixel centre to the object's nearest vertex (a square's 4
    corners, a triangle's apex and 2 base corners; circles and absent objects: 1e4)."""
    dev = batch.cx.device
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    cx, cy, r = (t.float() for t in (batch.cx, batch.cy, batch.radius))
    h = SQUARE_HALF * r
    sq = [(cx - h, cy - h), (cx + h, cy - h), (cx - h, cy + h), (cx + h, cy + h)]
    hw = TRI_SLOPE * TRI_HEIGHT * r  # the triangle's half-width at its base
    tri = [(cx, cy - r), (cx - hw, cy + TRI_BASE * r), (cx + hw, cy + TRI_BASE * r), (cx, cy - r)]
    vx = torch.stack([torch.where(batch.shape == 1, s[0], t[0]) for s, t in zip(sq, tri, strict=True)], -1)
    vy = torch.stack([torch.where(batch.shape == 1, s[1], t[1]) for s, t in zip(sq, tri, strict=True)], -1)
    d = torch.hypot(coords.view(1, 1, 1, size, 1) - vx[:, :, None, None, :],
                    coords.view(1, 1, size, 1, 1) - vy[:, :, None, None, :]).amin(-1)
    keep = (batch.valid & (batch.shape != 0))[:, :, None, None]
    return torch.where(keep, d, torch.full_like(d, 1e4))


def coverage(batch: SceneBatch, size: int = SIZE) -> torch.Tensor:
    """(B, K, H, W) anti-aliased coverage in [0, 1] of each object."""
    return (0.5 - signed_distance(batch, size)).clamp(0, 1)


def render(batch: SceneBatch, style: str = "plain", out: str = "uint8") -> torch.Tensor:
    """Render scenes to images (B, 3, 128, 128).

    style: "plain" (the base world) or "outlined" (3 px outline centred on each shape edge,
    black (20,20,20), white on black objects).
    out: "uint8" (0..255 uint8) or "float" ([-1, 1] float32, what the VAE sees).
    """
    dev = batch.cx.device
    pal = PALETTE.to(dev)
    B = len(batch)
    img = pal[batch.background][:, :, None, None].expand(B, 3, SIZE, SIZE).clone()
    d = signed_distance(batch)
    for k in range(batch.shape.shape[1]):
        colour = pal[batch.colour[:, k]][:, :, None, None]
        dk = d[:, k : k + 1]
        if style == "outlined":
            outline_idx = torch.where(batch.colour[:, k] == BLACK, WHITE, BLACK)
            outline = pal[outline_idx][:, :, None, None]
            a_shape = (0.5 - (dk - 1.5)).clamp(0, 1)  # the shape grown by 1.5 px
            img = img * (1 - a_shape) + outline * a_shape
            a_fill = (0.5 - (dk + 1.5)).clamp(0, 1)  # the shape shrunk by 1.5 px
            img = img * (1 - a_fill) + colour * a_fill
        elif style == "plain":
            a = (0.5 - dk).clamp(0, 1)
            img = img * (1 - a) + colour * a
        else:
            raise ValueError(f"unknown style {style!r}")
    if out == "float":
        return img / 127.5 - 1.0
    return img.round().clamp(0, 255).to(torch.uint8)


def outline_map(batch: SceneBatch) -> torch.Tensor:
    """(B, 1, 128, 128) float control map: 1 on each shape's outline (2 px band centred on the edge)."""
    d = signed_distance(batch)
    band = (1.5 - d.abs()).clamp(0, 1)  # |d| <= 1 fully on, anti-aliased to 0 at |d| = 1.5
    return band.amax(dim=1, keepdim=True)


def object_masks(batch: SceneBatch) -> torch.Tensor:
    """(B, K, 128, 128) bool: pixels with coverage >= 0.5 of each object."""
    return signed_distance(batch) <= 0


def render_scene(scene: Scene, style: str = "plain"):
    """One Scene -> (128, 128, 3) uint8 numpy image."""
    return render(scenes_to_batch([scene]), style=style)[0].permute(1, 2, 0).numpy()
