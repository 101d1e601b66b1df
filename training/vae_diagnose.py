"""Where a trained video VAE's reconstructions fail the evaluator (CPU, fp32, held-out clips).

Reconstructs --n held-out clips (seed 987654321, the first --n of `render_batch`) from the posterior
mean and reports, as JSON:
- the evaluator's scores, i2v PSNR (mean, fraction >= 30 dB) and the PSNR per frame;
- object accuracy by shape x size, the fill ratio on frames 0 and 16, and the shape confusion there;
- the shape rule on every frame; wrong objects split into shape wrong on frame 0 only / on the last
  frame only / on both / right shape but another check wrong, and the object accuracy a frame 0 as
  good as the last frame would give;
- edge width: the 10-90% width of the mean object-colour fraction (projection on background ->
  object colour) against the true signed distance, all frames and frame 0, the 50% level's offset
  from the true edge, and the renders' own width;
- lost object pixels (ground truth labels them the object's colour, the reconstruction does not):
  the share within CORNER_RADIUS px of a square's or triangle's vertex and the rate there vs the
  rest of the EDGE_BAND.
These are the V3 diagnosis's measurements (training/RUNS-video.md; one-off scripts then), as one
command. The reconstruction is the slow part (~4 CPU-s per clip here); --cache keeps it, one file per
model (an .npz that `python -m training.evaluate_video` also reads).

    python -m training.vae_diagnose models/shapes-video --n 128 --cache /tmp/v4_recon.npz --json /tmp/v4.json
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

from training import evaluate, world
from training import train_video as tv
from training import video_world as vw
from training.evaluate_video import palette_labels, score_clips, track_objects
from training.train import HELD_OUT_SEED

PROFILE_RANGE = 5.0  # px either side of the edge
PROFILE_BIN = 0.25
ISOLATED = 6.0  # profile pixels must be this far outside every other object


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """(n, 3, T, H, W) [-1, 1] clips -> (n, T, H, W, 3) uint8 posterior-mean reconstructions."""
    rec = torch.cat([vae.decode(vae.encode(x[i:i + chunk]).latent_dist.mean).sample for i in range(0, len(x), chunk)])
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def edge_profile(frames: torch.Tensor, fs: world.SceneBatch) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the object-colour fraction, pixel count) per signed-distance bin, over every object of
    (N, H, W, 3) frames whose per-frame scenes are `fs`."""
    edges = np.arange(-PROFILE_RANGE, PROFILE_RANGE + 1e-9, PROFILE_BIN)
    total, count = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    pal = world.PALETTE
    d = world.signed_distance(fs)  # (N, K, H, W)
    x = frames.float()
    for k in range(d.shape[1]):
        others = torch.cat([d[:, :k], d[:, k + 1:]], 1).amin(1) if d.shape[1] > 1 else torch.full_like(d[:, 0], 1e4)
        use = fs.valid[:, k, None, None] & (d[:, k].abs() < PROFILE_RANGE) & (others > ISOLATED)
        bg, col = pal[fs.background], pal[fs.colour[:, k]]  # (N, 3)
        diff = (col - bg)[:, None, None, :]
        frac = ((x - bg[:, None, None, :]) * diff).sum(-1) / (diff * diff).sum(-1)
        dist = d[:, k][use].numpy()
        total += np.histogram(dist, edges, weights=frac[use].numpy())[0]
        count += np.histogram(dist, edges)[0]
    return total, count


def profile_width(total: np.ndarray, count: np.ndarray) -> dict:
    """10-90% width and 50% offset (px, + = outside the true edge) of a binned edge profile."""
    centres = np.arange(-PROFILE_RANGE, PROFILE_RANGE, PROFILE_BIN) + PROFILE_BIN / 2
    p = total / np.maximum(count, 1)

    def crossing(level):  # first bin pair going from inside (high) to outside (low) across `level`
        falls = (p[:-1] >= level) & (p[1:] < level)
        if not falls.any():  # a profile that never crosses the level has no width
            return float("nan")
        i = int(np.argmax(falls))
        return centres[i] + (p[i] - level) / (p[i] - p[i + 1]) * PROFILE_BIN

    def rounded(value):
        return None if np.isnan(value) else round(float(value), 2)

    return {"width_10_90": rounded(crossing(0.1) - crossing(0.9)), "offset_50": rounded(crossing(0.5))}


def lost_pixels(gt_labels: torch.Tensor, rec_labels: torch.Tensor, fs: world.SceneBatch) -> dict:
    """Object pixels of the ground truth that the reconstruction labels otherwise: counts near vertices,
    in the rest of the edge band and inside, with the ground truth's object pixels in each zone."""
    d, v = world.signed_distance(fs), world.vertex_distance(fs)
    out = {z: [0, 0] for z in ("vertex", "edge", "inside")}
    for k in range(d.shape[1]):
        obj = fs.valid[:, k, None, None] & (gt_labels == fs.colour[:, k, None, None])
        lost = obj & (rec_labels != fs.colour[:, k, None, None])
        near_v = v[:, k] <= tv.CORNER_RADIUS
        edge = (d[:, k].abs() <= tv.EDGE_BAND) & ~near_v
        for zone, m in (("vertex", near_v), ("edge", edge), ("inside", ~near_v & ~edge)):
            out[zone][0] += int((lost & m).sum())
            out[zone][1] += int((obj & m).sum())
    return out


def psnr_db(mse: float) -> float:
    return round(10 * math.log10(255 ** 2 / max(mse, 1e-10)), 2)


def diagnose(rec: torch.Tensor, batch: vw.ClipBatch) -> dict:
    """The report (see the module docstring) for (n, T, H, W, 3) uint8 reconstructions of `batch`."""
    gt = vw.render_clips(batch).permute(0, 1, 3, 4, 2)  # (n, T, H, W, 3) uint8
    n, frames = rec.shape[:2]
    caps, clips = vw.captions(batch), batch.clips()
    r = score_clips(rec.numpy(), caps, gt[:, 0].numpy())
    ps = [p["i2v_psnr"] for p in r["per_clip"]]
    mse_t = ((rec.float() - gt.float()) ** 2).mean((0, 2, 3, 4))
    report = {"scores": {k: round(v, 4) for k, v in r.items() if k != "per_clip"},
              "i2v_at_least_30db": round(float(np.mean(np.array(ps) >= 30)), 3),
              "psnr_by_frame": [psnr_db(float(m)) for m in mse_t]}

    # per object: shape x size, fill on frames 0 and last, the shape rule on every frame, wrong-object split
    groups, confusion, split = {}, {}, {"frame0_only": 0, "last_only": 0, "both": 0, "other_check": 0}
    by_frame = np.zeros((2, frames))  # (small, large) right counts per frame
    n_size = np.zeros(2)
    objects_total = objects_right = 0
    for i, clip in enumerate(clips):
        tracks = track_objects(palette_labels(rec[i]), clip)
        for obj, judged, tr in zip(clip.scene.objects, r["per_clip"][i]["objects"], tracks, strict=True):
            key = f"{world.SIZE_NAMES[obj.size]} {world.SHAPE_NAMES[obj.shape]}"
            g = groups.setdefault(key, {"n": 0, "right": 0, "fill0": [], "fill_last": []})
            g["n"] += 1
            g["right"] += judged["right"]
            g["fill0"].append(float(tr["fill"][0]))
            g["fill_last"].append(float(tr["fill"][-1]))
            truth = world.SHAPE_NAMES[obj.shape]
            for seen in judged["shapes"]:
                confusion[f"{truth}->{seen}"] = confusion.get(f"{truth}->{seen}", 0) + 1
            found = tr["area"] >= evaluate.FOUND_FRACTION * world.nominal_area(obj.shape, world.SIZE_RADII[obj.size])
            judged_shape = np.array([evaluate.classify_fill(float(f)) for f in tr["fill"]])
            by_frame[obj.size] += found & (judged_shape == obj.shape)
            n_size[obj.size] += 1
            objects_total += 1
            objects_right += judged["right"]
            if not judged["right"]:
                w0, wl = (s != truth for s in judged["shapes"])
                split["both" if w0 and wl else "frame0_only" if w0 else "last_only" if wl else "other_check"] += 1
    report["by_shape_size"] = {k: {"n": g["n"], "object": round(g["right"] / g["n"], 3),
                                   "fill0": round(float(np.mean(g["fill0"])), 3),
                                   "fill_last": round(float(np.mean(g["fill_last"])), 3)}
                               for k, g in sorted(groups.items())}
    report["shape_confusion_frames_0_and_last"] = dict(sorted(confusion.items()))
    report["shape_rule_by_frame"] = [round(float(v), 3) for v in by_frame.sum(0) / max(objects_total, 1)]
    report["shape_rule_frame0_vs_last"] = {world.SIZE_NAMES[s]: [round(float(by_frame[s, 0] / n_size[s]), 3),
                                                                 round(float(by_frame[s, -1] / n_size[s]), 3)]
                                           for s in range(2) if n_size[s]}
    report["wrong_objects"] = dict(split, total=objects_total - objects_right,
                                   object_if_frame0_as_good_as_last=round(
                                       (objects_right + split["frame0_only"]) / max(objects_total, 1), 3))

    # edge profiles and lost pixels, clip by clip (memory)
    acc = {name: [np.zeros(int(2 * PROFILE_RANGE / PROFILE_BIN)), np.zeros(int(2 * PROFILE_RANGE / PROFILE_BIN))]
           for name in ("recon", "recon_frame0", "renders")}
    lost = {z: [0, 0] for z in ("vertex", "edge", "inside")}
    for i in range(n):
        one = vw.ClipBatch(vw._take(batch.scenes, torch.tensor([i])), batch.motion[i:i + 1])
        fs = vw.frame_scenes(one, frames)
        for name, fr, sel in (("recon", rec[i], slice(None)), ("recon_frame0", rec[i], slice(0, 1)),
                              ("renders", gt[i], slice(None))):
            t, c = edge_profile(fr[sel], vw._take(fs, torch.arange(frames)[sel]))
            acc[name][0] += t
            acc[name][1] += c
        for z, (lo, tot) in lost_pixels(palette_labels(gt[i]), palette_labels(rec[i]), fs).items():
            lost[z][0] += lo
            lost[z][1] += tot
    report["edge"] = {name: profile_width(*tc) for name, tc in acc.items()}
    all_lost = sum(lo for lo, _ in lost.values())
    report["lost_object_pixels"] = {z: {"share_of_lost": round(lo / max(all_lost, 1), 3),
                                        "lost_rate": round(lo / max(tot, 1), 4)} for z, (lo, tot) in lost.items()}
    report["lost_object_pixels"]["total_lost_fraction"] = round(all_lost / max(sum(t for _, t in lost.values()), 1), 4)
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model folder with vae/ (e.g. models/shapes-video)")
    ap.add_argument("--n", type=int, default=128, help="held-out clips")
    ap.add_argument("--cache", default=None, help="an .npz of the reconstructions: read if it exists, else written")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    batch, x = tv.render_batch(args.n, torch.Generator().manual_seed(HELD_OUT_SEED), torch.device("cpu"))
    if args.cache and os.path.exists(args.cache):
        rec = torch.from_numpy(np.load(args.cache)["videos"])
        if len(rec) != args.n:
            raise SystemExit(f"{args.cache} holds {len(rec)} clips, not --n {args.n}")
    else:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(os.path.join(args.model, "vae"), torch_dtype=torch.float32).eval()
        rec = reconstruct(vae, x)
        if args.cache:  # evaluate_video reads this file too
            np.savez_compressed(args.cache, videos=rec.numpy(), captions=np.array(vw.captions(batch)),
                                images=vw.first_frames(batch).permute(0, 2, 3, 1).numpy())
    report = diagnose(rec, batch)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
