"""Score clips of the shapes-video world against their captions (the "Scores" of shapes-video-spec.md).

Library:
    score_clip(video, caption, image=None) -> dict      one (17, 128, 128, 3) uint8 clip
    score_clips(videos, captions, images=None) -> dict  aggregate accuracies (+ i2v PSNR with images)

Command:
    python -m training.evaluate_video FOLDER_OR_NPZ [--json OUT.json] [--per-clip]

An .npz holds `videos` (N, T, H, W, 3) uint8, `captions` (N,) str and optionally `images`
(N, H, W, 3), the given first frames of image-to-video. A folder holds one clip per .npy
(T, H, W, 3), .gif, .webp or .mp4 file or per sub-folder of frame PNGs (sorted by name); captions
come from FOLDER/captions.jsonl or captions.json as in training/evaluate.py, and a jsonl line may
name the given image of an image-to-video clip under "given" (a PNG path relative to FOLDER).

Rules (one reading of the spec, fixed here so that every run scores the same way):
- Each pixel gets the label of the nearest palette colour (Euclidean RGB), as training/evaluate.py.
- Per frame, an object is its colour's largest 4-connected component over the whole frame (when
  two prompted objects share a colour: the two largest, paired with the objects by least total
  distance to where the caption puts them on that frame). Found if the component covers >= 35% of
  the nominal shape area; its centre is the component's pixel centroid.
- Track: found on >= 15 of 17 frames. Start: found on frame 0 with the centroid in the named cell.
  Motion: found on frames 0 and 16; displacement 0 -> 16 along the named axis >= 0.5 cell in the
  named direction and < 0.25 cell on the other axis; "still": < 0.15 cell on both axes.
  Shape: the fill-ratio rule of training/evaluate.py, right on both frames 0 and 16.
- Object right = track, start, motion and shape right. Prompt right = every object right and the
  background right on frames 0 and 16 (>= 80% background label in the cells free on that frame).
- Temporal stability (per object): the fraction of frames whose area is within 0.8-1.25 of the
  frame-0 area (frames where the object is not found count as unstable).
- Image-to-video: PSNR of frame 0 against the given image; right when >= 30 dB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from training import evaluate, world
from training import video_world as vw

TRACK_FRAMES = 15
MOVE_MIN, OFF_AXIS_MAX, STILL_MAX = 0.5, 0.25, 0.15  # in cell widths
STABLE_RANGE = (0.8, 1.25)
I2V_PSNR = 30.0


def palette_labels(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3) uint8 -> (...) long nearest palette index (training/evaluate.py's rule, in torch)."""
    pal = world.PALETTE.to(frames.device)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; |x|^2 is the same for every p. Integers: exact in float32.
    return ((pal * pal).sum(-1) - 2 * frames[..., :3].float() @ pal.T).argmin(-1)


def components(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, W) long 4-connected component ids (0 = not in mask).

    Batched min-label propagation with pointer jumping (few iterations, runs on any device); ids
    are 1 + the smallest flat pixel index of the component.
    """
    n, h, w = mask.shape
    big = h * w
    idx = torch.arange(big, device=mask.device).view(1, h, w).expand(n, h, w)
    lab = torch.where(mask, idx, big)
    pad = torch.full((n, 1), big, device=mask.device, dtype=lab.dtype)
    while True:
        p = F.pad(lab, (1, 1, 1, 1), value=big)
        nb = torch.minimum(torch.minimum(p[:, 1:-1, 1:-1], p[:, :-2, 1:-1]),
                           torch.minimum(torch.minimum(p[:, 2:, 1:-1], p[:, 1:-1, :-2]), p[:, 1:-1, 2:]))
        nb = torch.where(mask, nb, big)
        jumped = torch.cat([nb.reshape(n, -1), pad], 1).gather(1, nb.reshape(n, -1)).view(n, h, w)
        new = torch.minimum(nb, jumped)
        if torch.equal(new, lab):
            return torch.where(mask, lab + 1, 0)
        lab = new


def component_stats(comp: torch.Tensor) -> dict:
    """Per frame and component id: area, centroid, bounding-box fill. Each (N, H*W + 1)."""
    n, h, w = comp.shape
    m = h * w + 1
    flat = (comp + torch.arange(n, device=comp.device).view(n, 1, 1) * m).flatten()
    ys, xs = torch.meshgrid(torch.arange(h, device=comp.device), torch.arange(w, device=comp.device), indexing="ij")
    xs, ys = xs.expand(n, h, w).flatten().float(), ys.expand(n, h, w).flatten().float()
    area = torch.bincount(flat, minlength=n * m).float()
    sx = torch.bincount(flat, weights=xs, minlength=n * m)
    sy = torch.bincount(flat, weights=ys, minlength=n * m)

    def ext(v, how, init):
        return torch.full((n * m,), init, device=comp.device).scatter_reduce(0, flat, v, how)

    bw = ext(xs, "amax", -1.0) - ext(xs, "amin", 1e9) + 1
    bh = ext(ys, "amax", -1.0) - ext(ys, "amin", 1e9) + 1
    area = area.view(n, m)
    area[:, 0] = 0  # id 0 is "not this colour"
    a = area.clamp(min=1)
    return {"area": area, "cx": sx.view(n, m) / a + 0.5, "cy": sy.view(n, m) / a + 0.5,
            "fill": area / (bw * bh).view(n, m).clamp(min=1)}


def expected_centres(clip: vw.Clip, frames: int) -> np.ndarray:
    """(K, T, 2) where the caption puts each object's centre on each frame (nominal geometry)."""
    out = np.zeros((len(clip.scene.objects), frames, 2))
    frac = np.arange(frames) / (frames - 1)
    for k, (o, mo) in enumerate(zip(clip.scene.objects, clip.motions, strict=True)):
        step = vw.MOTION_STEP[mo].numpy() * world.CELL
        out[k] = np.array(world.cell_centre(o.cell))[None] + frac[:, None] * step[None]
    return out


def track_objects(labels: torch.Tensor, clip: vw.Clip) -> list[dict]:
    """Per object: (T,) arrays area, cx, cy, fill of its component on each frame."""
    frames = labels.shape[0]
    expect = expected_centres(clip, frames)
    tracks: list[dict | None] = [None] * len(clip.scene.objects)
    for colour in sorted({o.colour for o in clip.scene.objects}):
        ks = [k for k, o in enumerate(clip.scene.objects) if o.colour == colour]
        st = component_stats(components(labels == colour))
        top = st["area"].topk(len(ks), dim=1).indices  # (T, len(ks)) largest components
        pick = {name: v.gather(1, top).cpu().numpy() for name, v in st.items()}
        for t in range(frames):
            if len(ks) == 1:
                continue
            # pair components with objects by least total distance to the expected centres
            pos = np.stack([pick["cx"][t], pick["cy"][t]], -1)
            best = min(itertools.permutations(range(len(ks))),
                       key=lambda perm: sum(np.hypot(*(pos[j] - expect[k, t])) for k, j in zip(ks, perm, strict=True)))
            for name in pick:
                pick[name][t] = pick[name][t][list(best)]
        for i, k in enumerate(ks):
            tracks[k] = {name: pick[name][:, i] for name in pick}
    return tracks


def _cell_of(x: float, y: float) -> int:
    col = min(max(int(x // world.CELL), 0), 2)
    row = min(max(int(y // world.CELL), 0), 2)
    return row * 3 + col


def judge_object(tr: dict, obj: world.SceneObject, motion: int) -> dict:
    """The spec's checks for one object's track."""
    expected = world.nominal_area(obj.shape, world.SIZE_RADII[obj.size])
    found = tr["area"] >= evaluate.FOUND_FRACTION * expected
    last = len(found) - 1
    track = int(found.sum()) >= TRACK_FRAMES
    start = bool(found[0]) and _cell_of(tr["cx"][0], tr["cy"][0]) == obj.cell
    moved = (tr["cx"][last] - tr["cx"][0]) / world.CELL, (tr["cy"][last] - tr["cy"][0]) / world.CELL
    ends = bool(found[0] and found[last])
    if motion == vw.STILL:
        motion_ok = ends and max(abs(moved[0]), abs(moved[1])) < STILL_MAX
    else:
        dc, dr = (float(v) for v in vw.MOTION_STEP[motion])
        along, across = (moved[0] * dc, moved[1]) if dc else (moved[1] * dr, moved[0])
        motion_ok = ends and along >= MOVE_MIN and abs(across) < OFF_AXIS_MAX
    shapes = [evaluate.classify_fill(float(tr["fill"][t])) for t in (0, last)]
    shape_ok = ends and all(s == obj.shape for s in shapes)
    ratio = tr["area"] / max(float(tr["area"][0]), 1.0)
    stable = found & (ratio >= STABLE_RANGE[0]) & (ratio <= STABLE_RANGE[1]) & bool(found[0])
    return {"track": track, "start": start, "motion": bool(motion_ok), "shape": bool(shape_ok),
            "right": bool(track and start and motion_ok and shape_ok), "frames_found": int(found.sum()),
            "moved_cells": [round(float(v), 3) for v in moved], "shapes": [world.SHAPE_NAMES[s] for s in shapes],
            "stability": float(stable.mean())}


def _background_right(labels: np.ndarray, scene: world.Scene, cells: list[int]) -> bool:
    moved = world.Scene(scene.background, [world.SceneObject(o.shape, o.colour, o.size, c)
                                           for o, c in zip(scene.objects, cells, strict=True)])
    mask = evaluate.background_mask(moved)
    return bool(mask.any() and (labels[mask] == scene.background).mean() >= evaluate.BACKGROUND_FRACTION)


def score_clip(video: np.ndarray, caption: str | vw.Clip, image: np.ndarray | None = None) -> dict:
    """Score one (T, 128, 128, 3) uint8 clip against its caption (and the given first frame)."""
    clip = vw.parse_caption(caption) if isinstance(caption, str) else caption
    video = np.asarray(video)[..., :3]
    t, h, w = video.shape[:3]
    if (h, w) != (world.SIZE, world.SIZE) or t < 2:
        raise ValueError(f"expected (T, {world.SIZE}, {world.SIZE}, 3) frames, got {video.shape}")
    labels = palette_labels(torch.from_numpy(video))
    tracks = track_objects(labels, clip)
    labels = labels.numpy()
    objects = [judge_object(tr, o, m) for tr, o, m in zip(tracks, clip.scene.objects, clip.motions, strict=True)]
    starts = [o.cell for o in clip.scene.objects]
    ends = [vw.end_cell(c, m) for c, m in zip(starts, clip.motions, strict=True)]
    bg_right = _background_right(labels[0], clip.scene, starts) and _background_right(labels[-1], clip.scene, ends)
    n_right = sum(o["right"] for o in objects)
    out = {"objects": objects, "objects_right": n_right, "objects_total": len(objects),
           "background_right": bg_right, "prompt_right": bool(bg_right and n_right == len(objects))}
    if image is not None:
        out["i2v_psnr"] = evaluate.psnr(video[0], np.asarray(image)[..., :3])
    return out


def score_clips(videos, captions, images=None) -> dict:
    """Aggregate scores: object, prompt, per-check rates, temporal stability, i2v PSNR."""
    images = [None] * len(captions) if images is None else images
    per = [score_clip(v, c, i) for v, c, i in zip(videos, captions, images, strict=True)]
    objs = [o for p in per for o in p["objects"]]
    n_obj = max(len(objs), 1)
    out = {"n": len(per), "object_accuracy": sum(o["right"] for o in objs) / n_obj,
           "prompt_accuracy": sum(p["prompt_right"] for p in per) / max(len(per), 1),
           "background_accuracy": sum(p["background_right"] for p in per) / max(len(per), 1),
           **{f"{k}_accuracy": sum(o[k] for o in objs) / n_obj for k in ("track", "start", "motion", "shape")},
           "temporal_stability": sum(o["stability"] for o in objs) / n_obj}
    ps = [p["i2v_psnr"] for p in per if "i2v_psnr" in p]
    if ps:
        out["i2v_psnr_mean"] = float(np.mean(np.minimum(ps, 100.0)))  # identical frames are inf dB
        out["i2v_accuracy"] = sum(p >= I2V_PSNR for p in ps) / len(ps)
    out["per_clip"] = per
    return out


# --------------------------------------------------------------------------------------------
# self-test: ground truth must score >= 0.99, corrupted clips low


def corrupt(batch: vw.ClipBatch, how: str, seed: int = 0) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 renders of `batch` corrupted: "motion" (every object gets another motion
    that stays in the grid), "colours" (first object's colour swapped with the background) or
    "frozen" (frame 0 repeated)."""
    if how == "frozen":
        v = vw.render_clips(batch)[:, :1].expand(-1, vw.FRAMES, -1, -1, -1)
    elif how == "motion":
        g = torch.Generator(device=batch.motion.device).manual_seed(seed)
        ok = vw.allowed_motions().to(batch.motion.device)[batch.scenes.cell.clamp(min=0)]
        ok &= torch.nn.functional.one_hot(batch.motion, len(vw.MOTION_NAMES)) == 0
        motion = (torch.rand(ok.shape, generator=g, device=ok.device) * ok).argmax(-1)
        v = vw.render_clips(vw.ClipBatch(batch.scenes, motion))
    elif how == "colours":
        sb = vw._take(batch.scenes, torch.arange(len(batch)))
        sb.background, sb.colour[:, 0] = batch.scenes.colour[:, 0].clone(), batch.scenes.background.clone()
        v = vw.render_clips(vw.ClipBatch(sb, batch.motion))
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return v.permute(0, 1, 3, 4, 2)


def self_test(n: int = 300, seed: int = 987654321) -> dict:
    """Object / prompt accuracy of ground-truth renders and of three corruptions of them."""
    batch = vw.sample_clips(n, seed)
    caps = vw.captions(batch)
    gt = vw.render_clips(batch).permute(0, 1, 3, 4, 2)
    runs = {"ground_truth": gt, **{f"corrupt_{h}": corrupt(batch, h, seed) for h in ("motion", "colours", "frozen")}}
    out = {}
    for name, videos in runs.items():
        r = score_clips(videos.numpy(), caps, images=gt[:, 0].numpy())
        r.pop("per_clip")
        out[name] = r
    return out


# --------------------------------------------------------------------------------------------
# command line


def _read_video(path: str) -> np.ndarray:
    if os.path.isdir(path):
        from PIL import Image

        files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        return np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("RGB")) for f in files])
    if path.endswith(".npy"):
        return np.load(path)
    import imageio.v3 as iio

    return np.asarray(iio.imread(path, index=...))[..., :3]  # every frame (index=None reads one with Pillow 13)


def load_npz(path: str):
    """-> (videos, captions, images or None, names) from an .npz of videos/captions[/images]."""
    data = np.load(path, allow_pickle=False)
    videos = data["videos"]
    if videos.shape[-1] != 3:  # (N, T, 3, H, W)
        videos = videos.transpose(0, 1, 3, 4, 2)
    images = data["images"] if "images" in data else None
    if images is not None and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    caps = [str(c) for c in data["captions"]]
    return videos, caps, images, [f"{i:05d}" for i in range(len(caps))]


def load_folder(folder: str):
    """-> (videos, captions, images or None, names, skipped) from a folder of clips (see the module doc)."""
    from PIL import Image

    caps = evaluate.load_captions(folder)
    given = {}
    jl = os.path.join(folder, "captions.jsonl")
    if os.path.exists(jl):
        with open(jl) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        given = {os.path.basename(r.get("file", "")): r["given"] for r in rows if r.get("given")}
    videos, texts, images, names, skipped = [], [], [], [], []
    for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        if f not in caps or not (os.path.isdir(path) or f.lower().endswith((".npy", ".gif", ".webp", ".mp4"))):
            if f not in ("captions.jsonl", "captions.json") and f not in given.values():
                skipped.append({"file": f, "reason": "no caption or not a clip"})
            continue
        try:
            vw.parse_caption(caps[f])
        except ValueError as e:
            skipped.append({"file": f, "reason": str(e)})
            continue
        videos.append(_read_video(path))
        texts.append(caps[f])
        names.append(f)
        images.append(np.asarray(Image.open(os.path.join(folder, given[f])).convert("RGB")) if f in given else None)
    return videos, texts, (images if any(i is not None for i in images) else None), names, skipped


def evaluate_path(path: str, per_clip: bool = False) -> dict:
    skipped = []
    if os.path.isdir(path):
        videos, caps, images, names, skipped = load_folder(path)
    else:
        videos, caps, images, names = load_npz(path)
    summary = score_clips(videos, caps, images)
    per = summary.pop("per_clip")
    summary["skipped"] = skipped
    if per_clip:
        summary["per_clip"] = [dict(name=n, caption=c, **p) for n, c, p in zip(names, caps, per, strict=True)]
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_video", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", help="a folder of clips or an .npz")
    ap.add_argument("--json", help="also write the summary to this file")
    ap.add_argument("--per-clip", action="store_true", help="include per-clip details")
    ap.add_argument("--self-test", type=int, metavar="N", help="score N ground-truth and corrupted clips instead")
    args = ap.parse_args(argv)
    if args.self_test:
        summary = self_test(args.self_test)
    elif args.path and os.path.exists(args.path):
        summary = evaluate_path(args.path, per_clip=args.per_clip)
    else:
        print(f"not a folder or file: {args.path}", file=sys.stderr)
        return 2
    evaluate.report(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
