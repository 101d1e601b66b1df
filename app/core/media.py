"""Video values and files: the VIDEO value, writing MP4/WebM/WebP/GIF with the workflow embedded,
reading frames back, and reading the embedded workflow (what dropping a video on the editor uses).

Where the workflow goes: MP4/WebM in the container's ``comment`` tag (ffmpeg metadata), animated
WebP in EXIF ImageDescription as ``workflow:<json>`` (as ComfyUI does), GIF in its comment block.
MP4/WebM go through imageio-ffmpeg's bundled ffmpeg; WebP/GIF through Pillow.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

FORMATS = {"mp4": "libx264", "webm": "libvpx-vp9", "webp": None, "gif": None}
FFMPEG_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
EXIF_DESCRIPTION = 0x010E


@dataclass(eq=False)
class Video:
    """The VIDEO value: ``frames`` (F, H, W, C) float32 in [0, 1] on CPU, ``fps`` frames per second."""

    frames: torch.Tensor
    fps: float = 16.0

    def __post_init__(self) -> None:
        if self.frames.dim() != 4 or self.frames.shape[-1] not in (3, 4):
            raise ValueError(f"a VIDEO needs frames (F, H, W, 3), got shape {tuple(self.frames.shape)}")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def _ffmpeg() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ValueError("MP4/WebM need the imageio-ffmpeg package (pip install imageio-ffmpeg); "
                         "choose webp or gif otherwise") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def write_video(path: str | Path, video: Video, workflow: dict | None = None, quality: int = 85) -> None:
    """Write ``video`` to ``path`` (format from the suffix) with ``workflow`` embedded."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unknown video format {fmt!r}; expected one of {', '.join(FORMATS)}")
    frames = to_uint8(video.frames[..., :3])
    text = json.dumps(workflow, separators=(",", ":")) if workflow else ""
    if FORMATS[fmt]:
        _write_ffmpeg(path, frames, video.fps, FORMATS[fmt], text, quality)
    else:
        _write_pillow(path, frames, video.fps, fmt, text, quality)


def write_poster(path: str | Path, video: Video, max_side: int = 512) -> None:
    """The first frame as a PNG at most ``max_side`` pixels a side (a player's poster image)."""
    image = Image.fromarray(to_uint8(video.frames[0, ..., :3]))
    image.thumbnail((max_side, max_side))
    image.save(path, format="PNG", compress_level=1)


def _write_ffmpeg(path: Path, frames: np.ndarray, fps: float, codec: str, text: str, quality: int) -> None:
    n, h, w, _ = frames.shape
    crf = str(round(51 - quality * 0.51)) if codec == "libx264" else str(round(63 - quality * 0.63))
    # yuv420p (what players expect) needs even sizes: pad the right/bottom edge by one pixel
    args = [_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
            "-r", f"{fps}", "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", codec, "-pix_fmt", "yuv420p",
            "-crf", crf]
    if codec == "libvpx-vp9":
        args += ["-b:v", "0"]
    if text:
        args += ["-metadata", f"comment={text}"]
    done = subprocess.run([*args, str(path)], input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if done.returncode:
        path.unlink(missing_ok=True)
        raise ValueError(f"ffmpeg could not write {path.name}: {done.stderr.decode(errors='replace')[-400:]}")


def _write_pillow(path: Path, frames: np.ndarray, fps: float, fmt: str, text: str, quality: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    options: dict = {"save_all": True, "append_images": images[1:], "duration": round(1000.0 / fps), "loop": 0}
    if fmt == "webp":
        exif = Image.Exif()
        if text:
            exif[EXIF_DESCRIPTION] = "workflow:" + text
        options.update(quality=quality, exif=exif.tobytes())
    elif text:
        options["comment"] = text.encode()
    images[0].save(path, format=fmt.upper(), **options)


def read_video(path: str | Path, start: int = 0, count: int = 0, stride: int = 1) -> Video:
    """Frames ``start``, ``start + stride``, ... (``count`` of them; 0 = to the end) and the fps
    (divided by ``stride``)."""
    path = Path(path)
    if stride < 1 or start < 0 or count < 0:
        raise ValueError("start and count must be >= 0 and stride >= 1")
    if path.suffix.lower() in FFMPEG_SUFFIXES:
        frames, fps = _read_ffmpeg(path, start, count, stride)
    else:
        frames, fps = _read_pillow(path, start, count, stride)
    if not frames:
        raise ValueError(f"{path.name}: no frames in the requested range (start {start}, stride {stride})")
    array = np.stack(frames).astype(np.float32) / 255.0
    return Video(torch.from_numpy(array), fps / stride)


def _wanted(index: int, start: int, count: int, stride: int) -> bool | None:
    """Whether frame ``index`` is taken; None once past the last wanted frame."""
    if count and index >= start + count * stride:
        return None
    return index >= start and (index - start) % stride == 0


def _read_ffmpeg(path: Path, start: int, count: int, stride: int) -> tuple[list[np.ndarray], float]:
    import imageio_ffmpeg

    _ffmpeg()
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = []
    try:
        for index, raw in enumerate(reader):
            take = _wanted(index, start, count, stride)
            if take is None:
                break
            if take:
                frames.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3))
    finally:
        reader.close()
    return frames, float(meta.get("fps") or 16.0)


def _read_pillow(path: Path, start: int, count: int, stride: int) -> tuple[list[np.ndarray], float]:
    try:
        image = Image.open(path)
    except Exception as exc:
        raise ValueError(f"{path.name}: not a readable video ({type(exc).__name__}: {exc})") from None
    with image:
        frames, duration = [], 0.0
        for index, frame in enumerate(ImageSequence.Iterator(image)):
            take = _wanted(index, start, count, stride)
            if take is None:
                break
            rgb = frame.convert("RGB")  # loading the frame sets WebP's per-frame duration
            duration = duration or float(frame.info.get("duration") or 0)
            if take:
                frames.append(np.asarray(rgb))
    return frames, 1000.0 / (duration or 62.5)


def read_workflow(path: str | Path) -> dict | None:
    """The workflow embedded in a saved video (MP4/WebM comment, WebP EXIF, GIF comment), or None."""
    path = Path(path)
    if path.suffix.lower() in FFMPEG_SUFFIXES:
        text = _ffmpeg_comment(path)
    else:
        with Image.open(path) as image:
            text = image.info.get("comment", b"").decode(errors="replace") if image.format == "GIF" else \
                str(image.getexif().get(EXIF_DESCRIPTION, ""))
        text = text.removeprefix("workflow:")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _ffmpeg_comment(path: Path) -> str:
    done = subprocess.run([_ffmpeg(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"], capture_output=True)
    for line in _ffmetadata_lines(done.stdout.decode(errors="replace")):
        key, _, value = line.partition("=")
        if key.lower() == "comment":
            return value
    return ""


def _ffmetadata_lines(text: str) -> list[str]:
    """Logical lines of ffmetadata output, undoing its backslash escapes (of = ; # \\ and newline)."""
    lines, current, chars = [], [], iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(ch)
    lines.append("".join(current))
    return lines
