"""The shapes-video world, exactly as /shared/shapes-video-spec.md defines it.

It is the shapes world of `training/world.py` (palette, shapes, sizes, grid, jitter,
anti-aliasing, renderer: all reused from there) plus one motion per object:
- 17 frames, 128×128, 8 fps; the background is constant.
- motion "left"/"right"/"up"/"down": the centre moves linearly from its start position to the same
  position one cell over (frame k at fraction k/16), so it reaches the adjacent cell's centre (plus
  the object's jitter, drawn once per object) on the last frame; "still": it stays.
- only motions that stay inside the 3×3 grid are drawn; two objects never have their centres in one
  cell on any frame; read strictly: the cells the two centres visit during the clip are disjoint
  (no swapping or following between frames; such a scene is redrawn, see `_conflicts`).
- caption: "a {size} {colour} {shape} moving {direction} from the {position}" or "... staying at
  the {position}" ("in the center"), objects joined with " and ", then " on a {colour} background".

A batch of clips is a `ClipBatch`: the frame-0 `SceneBatch` of world.py plus a (B, K) motion index.
Rendering is batched torch (GPU for on-the-fly training data, CPU for tests and evaluation).
Image-to-video: the given image is frame 0 (`first_frames`), the caption says how it moves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import torch

from training import world

FRAMES = 17
FPS = 8
MOTION_NAMES = ["left", "right", "up", "down", "still"]
STILL = 4
# (columns, rows) moved over the clip, by motion index
MOTION_STEP = torch.tensor([(-1, 0), (1, 0), (0, -1), (0, 1), (0, 0)], dtype=torch.float32)


def allowed_motions() -> torch.Tensor:
    """(9, 5) bool: motion m from cell c stays inside the 3×3 grid."""
    r, c = torch.arange(9) // 3, torch.arange(9) % 3
    end_c = c[:, None] + MOTION_STEP[None, :, 0].long()
    end_r = r[:, None] + MOTION_STEP[None, :, 1].long()
    return (end_c >= 0) & (end_c <= 2) & (end_r >= 0) & (end_r <= 2)


def end_cell(cell: int, motion: int) -> int:
    """The cell an object starting in `cell` reaches on the last frame (ValueError if off-grid)."""
    if not bool(allowed_motions()[cell, motion]):
        raise ValueError(f"moving {MOTION_NAMES[motion]} from the {world.POSITION_NAMES[cell]} leaves the grid")
    dc, dr = (int(v) for v in MOTION_STEP[motion])
    return cell + dr * 3 + dc


# --------------------------------------------------------------------------------------------
# clips


@dataclass
class ClipBatch:
    """B clips as tensors: the frame-0 scenes (world.SceneBatch) and each object's motion."""

    scenes: world.SceneBatch
    motion: torch.Tensor  # (B, K) long, index into MOTION_NAMES

    def __len__(self) -> int:
        return len(self.scenes)

    def to(self, device) -> ClipBatch:
        return ClipBatch(self.scenes.to(device), self.motion.to(device))

    def clips(self) -> list[Clip]:
        motions = self.motion.cpu().tolist()
        valid = self.scenes.valid.cpu().tolist()
        return [Clip(s, [m for m, v in zip(ms, vs, strict=True) if v])
                for s, ms, vs in zip(self.scenes.scenes(), motions, valid, strict=True)]


@dataclass
class Clip:
    """One clip: its frame-0 scene and one motion index per object."""

    scene: world.Scene
    motions: list[int] = field(default_factory=list)


def _take(sb: world.SceneBatch, idx: torch.Tensor) -> world.SceneBatch:
    return world.SceneBatch(**{f.name: getattr(sb, f.name)[idx] for f in fields(sb)})


def _put(sb: world.SceneBatch, idx: torch.Tensor, other: world.SceneBatch) -> None:
    for f in fields(sb):
        getattr(sb, f.name)[idx] = getattr(other, f.name)


def centres(batch: ClipBatch, frames: int = FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, T) x and y of every object's centre on every frame."""
    sb = batch.scenes
    frac = torch.arange(frames, device=sb.cx.device, dtype=torch.float32) / (frames - 1)
    step = MOTION_STEP.to(sb.cx.device)[batch.motion] * world.CELL  # (B, K, 2) px over the clip
    cx = sb.cx.float()[..., None] + step[..., 0:1] * frac
    cy = sb.cy.float()[..., None] + step[..., 1:2] * frac
    return cx, cy


def frame_cells(batch: ClipBatch) -> torch.Tensor:
    """(B, K, T) the cell holding each object's centre on each frame."""
    cx, cy = centres(batch)
    col = (cx / world.CELL).floor().long().clamp(0, 2)
    row = (cy / world.CELL).floor().long().clamp(0, 2)
    return row * 3 + col


def _draw_motions(sb: world.SceneBatch, g: torch.Generator) -> torch.Tensor:
    """Uniform over the motions that keep each object inside the grid."""
    ok = allowed_motions().to(sb.cell.device)[sb.cell.clamp(min=0)]  # (B, K, 5)
    u = torch.rand(ok.shape, generator=g, device=sb.cell.device)
    return (u * ok).argmax(-1)


def _conflicts(batch: ClipBatch) -> torch.Tensor:
    """(B,) bool: the two objects' centres visit a common cell during the clip.

    Stricter than "one cell on one frame": two objects that swap cells between two frames, or one
    that enters the cell the other is leaving, would pass through or touch each other (seen: an
    occluded object lost for 6 frames; two same-coloured objects merging). Such scenes are redrawn too.
    """
    cells = frame_cells(batch)
    v = batch.scenes.valid
    if cells.shape[1] < 2:
        return torch.zeros(len(batch), dtype=torch.bool, device=cells.device)
    shared = (cells[:, 0, :, None] == cells[:, 1, None, :]).flatten(1).any(-1)
    return shared & v[:, 0] & v[:, 1]


def sample_clips(n: int, seed=0, device="cpu", p_two: float = 0.5, max_redraws: int = 100) -> ClipBatch:
    """Sample n random clips, deterministic given `seed` (an int or a torch.Generator on `device`)."""
    g = world._generator(seed, device)

    def draw(m: int) -> ClipBatch:
        sb = world.sample_scenes(m, g, device, p_two=p_two)
        return ClipBatch(sb, _draw_motions(sb, g))

    batch = draw(n)
    for _ in range(max_redraws):
        bad = torch.nonzero(_conflicts(batch)).flatten()
        if bad.numel() == 0:
            return batch
        new = draw(bad.numel())
        _put(batch.scenes, bad, new.scenes)
        batch.motion[bad] = new.motion
    raise RuntimeError("could not draw conflict-free clips")  # practically unreachable


def frame_scenes(batch: ClipBatch, frames: int = FRAMES) -> world.SceneBatch:
    """The B*T per-frame scenes (clip-major) with moved centres, for world.render."""
    cx, cy = centres(batch, frames)
    rep = _take(batch.scenes, torch.arange(len(batch), device=cx.device).repeat_interleave(frames))
    rep.cx = cx.permute(0, 2, 1).reshape(-1, cx.shape[1])
    rep.cy = cy.permute(0, 2, 1).reshape(-1, cy.shape[1])
    return rep


def render_clips(batch: ClipBatch, out: str = "uint8", frames: int = FRAMES) -> torch.Tensor:
    """Render clips to (B, T, 3, 128, 128): "uint8" (0..255) or "float" ([-1, 1], what the VAE sees)."""
    img = world.render(frame_scenes(batch, frames), out=out)
    return img.view(len(batch), frames, *img.shape[1:])


def first_frames(batch: ClipBatch, out: str = "uint8") -> torch.Tensor:
    """(B, 3, 128, 128) frame 0 of each clip: the given image of an image-to-video pair."""
    return world.render(batch.scenes, out=out)


def i2v_pairs(batch: ClipBatch, out: str = "uint8"):
    """Image-to-video pairs: (first frames (B, 3, H, W), clips (B, T, 3, H, W), captions)."""
    clips = render_clips(batch, out=out)
    return clips[:, 0], clips, captions(batch)


# --------------------------------------------------------------------------------------------
# captions


def object_phrase(obj: world.SceneObject, motion: int) -> str:
    base = world.object_phrase(world.SceneObject(obj.shape, obj.colour, obj.size, cell=None))
    if motion == STILL:
        where = "in the center" if obj.cell == 4 else f"at the {world.POSITION_NAMES[obj.cell]}"
        return f"{base} staying {where}"
    return f"{base} moving {MOTION_NAMES[motion]} from the {world.POSITION_NAMES[obj.cell]}"


def caption(clip: Clip) -> str:
    """'a large red circle moving right from the left and a small blue square staying at the top
    right on a white background'."""
    bg = world.COLOUR_NAMES[clip.scene.background]
    phrases = [object_phrase(o, m) for o, m in zip(clip.scene.objects, clip.motions, strict=True)]
    return " and ".join(phrases) + f" on {world._article(bg)} {bg} background"


def captions(batch: ClipBatch) -> list[str]:
    return [caption(c) for c in batch.clips()]


_POS = "|".join(world.POSITION_NAMES)
_OBJ_RE = re.compile(
    r"^an? (small|large) (" + "|".join(world.COLOUR_NAMES) + r") (circle|square|triangle) "
    r"(?:moving (left|right|up|down) from the (" + _POS + r")|staying (?:at the (" + _POS + r")|(in the center)))$"
)


def parse_caption(text: str) -> Clip:
    """Parse a caption of the video grammar into a Clip (geometry = nominal: cell centre, radius).

    Raises ValueError for text outside the grammar or a motion that would leave the grid.
    """
    t = " ".join(text.strip().lower().rstrip(".").split())
    m = world._BG_RE.match(t)
    if not m:
        raise ValueError(f"caption has no 'on a <colour> background' ending: {text!r}")
    objs, motions = [], []
    for part in m.group(1).split(" and "):
        om = _OBJ_RE.match(part)
        if not om:
            raise ValueError(f"cannot parse object phrase {part!r} in caption {text!r}")
        size = world.SIZE_NAMES.index(om.group(1))
        if om.group(4):
            motion, cell = MOTION_NAMES.index(om.group(4)), world.POSITION_NAMES.index(om.group(5))
            end_cell(cell, motion)  # raises for motions off the grid
        else:
            motion = STILL
            cell = 4 if om.group(7) else world.POSITION_NAMES.index(om.group(6))
        cx, cy = world.cell_centre(cell)
        objs.append(world.SceneObject(shape=world.SHAPE_NAMES.index(om.group(3)),
                                      colour=world.COLOUR_NAMES.index(om.group(2)), size=size, cell=cell,
                                      cx=cx, cy=cy, radius=world.SIZE_RADII[size]))
        motions.append(motion)
    return Clip(world.Scene(background=world.COLOUR_NAMES.index(m.group(2)), objects=objs), motions)


def clips_to_batch(clips: list[Clip], device="cpu") -> ClipBatch:
    """Pack Clip objects (geometry filled in) into a ClipBatch."""
    sb = world.scenes_to_batch([c.scene for c in clips], device)
    motion = torch.full(sb.shape.shape, STILL, dtype=torch.long)
    for b, c in enumerate(clips):
        motion[b, : len(c.motions)] = torch.tensor(c.motions[: world.MAX_OBJECTS], dtype=torch.long)
    return ClipBatch(sb, motion.to(device))


def render_clip(clip: Clip):
    """One Clip -> (17, 128, 128, 3) uint8 numpy video."""
    return render_clips(clips_to_batch([clip]))[0].permute(0, 2, 3, 1).numpy()
