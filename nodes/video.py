"""Videos: decode video latents, save (MP4/WebM/WebP/GIF with the workflow embedded), load,
convert between VIDEO and IMAGE frames, and Wan image-to-video conditioning.

VIDEO values are :class:`app.core.media.Video` (frames (F, H, W, 3) in [0, 1] plus fps).
SaveVideo's UI data is ``{"videos": [{"filename", "subfolder", "type", "format", "frames", "fps",
"width", "height", "poster": {temp file entry of its first frame}}]}``.
"""

from __future__ import annotations

from typing import Annotated

import torch

from app.core import paths
from app.core.context import current
from app.core.media import FORMATS, Video, read_video, write_poster, write_video
from app.core.output_files import claim_path, split_prefix
from app.core.registry import NodeResult, node
from app.core.types import CONDITIONING, FLOAT, IMAGE, INT, LATENT, MODEL, VAE, VIDEO, Spec
from app.models.latents import Latent

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".webp", ".gif")
POSTERS = "posters"  # subfolder of the temp folder with SaveVideo's poster frames


@node(category="video", outputs={"video": VIDEO})
def VAEDecodeVideo(
    vae: VAE,
    latent: LATENT,
    fps: Annotated[float, Spec(min=0.1, max=240.0, step=0.1, tooltip="Frames per second of the result.")] = 16.0,
    tiled: Annotated[bool, Spec(tooltip="Decode in spatial tiles (less memory, for long or large videos).")] = False,
) -> Video:
    """Decode a video latent (B, C, f, h, w) into a VIDEO (a batch's clips one after another)."""
    samples = latent.samples
    if samples.dim() != 5:
        raise ValueError(f"VAEDecodeVideo needs a video latent (B, C, F, H, W); got shape {tuple(samples.shape)} "
                         "(decode images with VAEDecode)")
    if samples.shape[1] != vae.latent_channels:
        raise ValueError(f"latent has {samples.shape[1]} channels but the VAE expects {vae.latent_channels}: "
                         "are the model and the VAE from the same family?")
    frames = vae.decode(samples, tiled=tiled)
    return Video(frames.flatten(0, 1), float(fps))


@node(category="video", outputs={}, output_node=True)
def SaveVideo(
    video: VIDEO,
    filename_prefix: Annotated[str, Spec(tooltip="File name prefix; may include a subfolder.")] = "ditgraph",
    format: Annotated[str, Spec(choices=list(FORMATS), tooltip="mp4: H.264; webm: VP9; webp/gif: animated images.")] = "mp4",
    quality: Annotated[int, Spec(min=1, max=100, tooltip="Higher is better and larger.")] = 85,
) -> NodeResult:
    """Save a video into the output folder with the workflow embedded in its metadata (drop it on
    the editor to restore the workflow). Existing files are never overwritten."""
    folder, sub, stem = split_prefix(current().output_dir, filename_prefix)
    path = claim_path(folder, stem, f".{format}")
    try:
        write_video(path, video, current().workflow, quality)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    width, height = video.size
    entry = {"filename": path.name, "subfolder": sub, "type": "output", "format": format,
             "frames": int(video.frames.shape[0]), "fps": video.fps, "width": width, "height": height}
    # the first frame as a still (the editor's <video> poster), a preview beside PreviewImage's
    poster = claim_path(paths.temp_dir() / POSTERS, path.stem, ".png")
    write_poster(poster, video)
    entry["poster"] = {"filename": poster.name, "subfolder": POSTERS, "type": "temp"}
    return NodeResult((), {"videos": [entry]})


@node(category="video", outputs={"video": VIDEO})
def LoadVideo(
    video: Annotated[str, Spec(file="input", choices=lambda: paths.list_files("input", VIDEO_SUFFIXES, folders=False),
                               tooltip="A video in the input folder.")],
    start_frame: Annotated[int, Spec(min=0, max=1_000_000, tooltip="Skip this many frames.")] = 0,
    frame_count: Annotated[int, Spec(min=0, max=100_000, tooltip="Frames to keep (0 = to the end).")] = 0,
    stride: Annotated[int, Spec(min=1, max=1000, tooltip="Keep every n-th frame (fps is divided by n).")] = 1,
) -> Video:
    """Load a video (MP4, WebM, MOV, MKV, animated WebP or GIF) from the input folder."""
    return read_video(video, start_frame, frame_count, stride)


@node(category="video", outputs={"images": IMAGE, "fps": FLOAT, "frame_count": INT})
def VideoFrames(video: VIDEO) -> tuple:
    """The frames of a video as an IMAGE batch, its fps and its frame count."""
    return video.frames, float(video.fps), int(video.frames.shape[0])


@node(category="video", outputs={"video": VIDEO})
def FramesToVideo(
    images: IMAGE,
    fps: Annotated[float, Spec(min=0.1, max=240.0, step=0.1)] = 16.0,
) -> Video:
    """Make a VIDEO of an IMAGE batch (each item a frame)."""
    return Video(images if images.dim() == 4 else images[None], float(fps))


@node(category="video", outputs={"image": IMAGE})
def ExtractFrame(
    video: VIDEO,
    index: Annotated[int, Spec(min=-100_000, max=100_000, tooltip="Frame number; negative counts from the end (-1 = last).")] = 0,
) -> torch.Tensor:
    """One frame of a video as an IMAGE (e.g. the last frame, to continue a clip with image-to-video)."""
    count = video.frames.shape[0]
    if not -count <= index < count:
        raise ValueError(f"frame {index} is out of range: the video has {count} frames")
    return video.frames[index][None]


@node(category="video", outputs={"positive": CONDITIONING, "negative": CONDITIONING, "latent": LATENT})
def ImageToVideo(
    model: MODEL,
    vae: VAE,
    positive: CONDITIONING,
    negative: CONDITIONING,
    start_image: IMAGE,
    width: Annotated[int, Spec(min=16, max=8192, step=16, snap=True)] = 832,
    height: Annotated[int, Spec(min=16, max=8192, step=16, snap=True)] = 480,
    frames: Annotated[int, Spec(min=1, max=1025, step=4, snap=True)] = 81,
    batch_size: Annotated[int, Spec(min=1, max=64)] = 1,
) -> tuple:
    """Image-to-video: the video starts from ``start_image`` (Wan I2V models: its latents and a
    first-frame mask become extra input channels). Returns both conditionings and the empty latent."""
    fam = model.info
    problem = fam.size_problem(model.config, width, height, frames)
    if problem:
        raise ValueError(problem)
    image = start_image[:1]
    if tuple(image.shape[1:3]) != (height, width):
        image = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                                                align_corners=False, antialias=True).permute(0, 2, 3, 1).clamp(0, 1)
    extras = fam.image_to_video_condition(vae, image.expand(batch_size, -1, -1, -1), frames)
    latent = Latent(torch.zeros(fam.latent_shape(model.config, batch_size, width, height, frames)))
    return positive.with_extras(**extras), negative.with_extras(**extras), latent


@node(category="video", outputs={"conditioning": CONDITIONING})
def ConditioningFrameRate(
    conditioning: CONDITIONING,
    frame_rate: Annotated[float, Spec(min=1.0, max=240.0, step=1.0, tooltip="The video's frame rate (LTX: sets the time scale of its positions).")] = 25.0,
) -> object:
    """Tell a frame-rate-aware video model (LTX-Video) the frame rate to generate at (default 25)."""
    return conditioning.with_extras(frame_rate=float(frame_rate))
