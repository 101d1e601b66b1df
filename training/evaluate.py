"""Score images of the shapes world against their captions (the "Scores" of shapes-spec.md).

Library:
    score_image(image, caption) -> dict       one image (H, W, 3) uint8, 128x128
    score_images(images, captions) -> dict    aggregate object / background / prompt accuracy
    control_score(image, control_map, background=None) -> IoU
    binding_score(image, scene, masks) -> dict(objects_right, objects_total, scene_right): the colour
        each controlled shape is painted, against the colour its words name
    style_score(image, caption) -> fraction of object boundary pixels that are outline-dark
    edit_score(source, edited, target_caption, edited_index) -> dict(changed, psnr_outside)

Command:
    python -m training.evaluate FOLDER [--json OUT.json] [--per-image]

FOLDER holds PNGs. Each image's caption comes from, in order:
  1. FOLDER/captions.jsonl: one JSON object per line {"file": "x.png", "caption": "..."}
     ("image"/"path" accepted for the file key, "prompt"/"text" for the caption key);
  2. FOLDER/captions.json: {"x.png": "caption", ...} or a list of objects as in 1;
  3. the PNG's text metadata key "prompt" (a plain caption, or a JSON object with a "prompt"/
     "text"/"caption" field).
Images whose caption cannot be found or parsed are reported under "skipped".
Prints one JSON summary: {"n", "object_accuracy", "background_accuracy", "prompt_accuracy", ...}.

Rules (one reading of the spec, fixed here so every later issue scores the same way):
- Each pixel gets the label of the nearest palette colour (Euclidean RGB).
- Object: inside its cell (pixels whose centre lies in the cell), take the pixels labelled with
  the object's colour, and their largest 4-connected component. Found if the component covers
  >= 35% of the nominal shape area (radius 11 / 19). Shape by the component's fill ratio in its
  bounding box: > 0.88 square, 0.66..0.88 circle, < 0.66 triangle.
  Objects whose caption names no position are searched over the whole image.
- Background: over all pixels of the cells with no object (pooled), >= 80% have the background label.
- Prompt: all objects right and background right.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from training import world

PALETTE = world.PALETTE.numpy().astype(np.float32)
FOUND_FRACTION = 0.35
BACKGROUND_FRACTION = 0.80


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int palette index of the nearest colour."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    d = ((img[:, :, None, :] - PALETTE[None, None, :, :]) ** 2).sum(-1)
    return d.argmin(-1)


def _label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a small bool mask (0 = not in mask), by min-propagation."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        m = np.where(mask, m, big)
        if np.array_equal(m, lab):
            break
        lab = m
    return np.where(mask, lab, 0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    lab = _label_components(mask)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    return lab == ids[counts.argmax()]


def classify_fill(fill: float) -> int:
    """Fill ratio in the bounding box -> shape index (0 circle, 1 square, 2 triangle)."""
    if fill > 0.88:
        return 1
    if fill >= 0.66:
        return 0
    return 2


def _region(cell):
    if cell is None:
        return 0, world.SIZE, 0, world.SIZE
    return world.cell_bounds(cell)


def score_object(labels: np.ndarray, obj: world.SceneObject) -> dict:
    y0, y1, x0, x1 = _region(obj.cell)
    comp = largest_component(labels[y0:y1, x0:x1] == obj.colour)
    area = int(comp.sum())
    expected = world.nominal_area(obj.shape, world.SIZE_RADII[obj.size])
    found = area >= FOUND_FRACTION * expected
    fill, shape = 0.0, -1
    if area:
        ys, xs = np.nonzero(comp)
        fill = area / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = classify_fill(fill)
    return {"found": bool(found), "shape_right": bool(found and shape == obj.shape), "area": area,
            "expected_area": round(expected, 1), "fill": round(fill, 3),
            "shape": world.SHAPE_NAMES[shape] if shape >= 0 else None,
            "right": bool(found and shape == obj.shape)}


def background_mask(scene: world.Scene) -> np.ndarray:
    """Bool (H, W): pixels of the cells holding no object (all cells minus named ones)."""
    mask = np.ones((world.SIZE, world.SIZE), dtype=bool)
    for o in scene.objects:
        if o.cell is None:
            return np.zeros_like(mask)  # unknown positions: no cell is known to be empty
        y0, y1, x0, x1 = world.cell_bounds(o.cell)
        mask[y0:y1, x0:x1] = False
    return mask


def score_image(image: np.ndarray, caption: str | world.Scene) -> dict:
    """Score one (128, 128, 3) uint8 image against its caption."""
    scene = world.parse_caption(caption) if isinstance(caption, str) else caption
    image = np.asarray(image)
    if image.shape[:2] != (world.SIZE, world.SIZE):
        raise ValueError(f"expected a {world.SIZE}x{world.SIZE} image, got {image.shape}")
    labels = palette_labels(image)
    objects = [score_object(labels, o) for o in scene.objects]
    bgm = background_mask(scene)
    bg_fraction = float((labels[bgm] == scene.background).mean()) if bgm.any() else 1.0
    bg_right = bg_fraction >= BACKGROUND_FRACTION
    n_right = sum(o["right"] for o in objects)
    return {"objects": objects, "objects_right": n_right, "objects_total": len(objects),
            "background_fraction": round(bg_fraction, 4), "background_right": bool(bg_right),
            "prompt_right": bool(bg_right and n_right == len(objects))}


def score_images(images, captions) -> dict:
    """Aggregate scores over many images: object, background and prompt accuracy."""
    per = [score_image(im, c) for im, c in zip(images, captions, strict=True)]
    n = len(per)
    n_obj = sum(p["objects_total"] for p in per)
    return {
        "n": n,
        "object_accuracy": sum(p["objects_right"] for p in per) / max(n_obj, 1),
        "object_found": sum(o["found"] for p in per for o in p["objects"]) / max(n_obj, 1),
        "background_accuracy": sum(p["background_right"] for p in per) / max(n, 1),
        "prompt_accuracy": sum(p["prompt_right"] for p in per) / max(n, 1),
        "per_image": per,
    }


# --------------------------------------------------------------------------------------------
# scores for later issues


def fill_outline(control_map: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Filled shapes of an outline control map: what the outline encloses plus its inner half, eroded by 1 px."""
    outline = np.asarray(control_map, dtype=np.float32).squeeze() >= threshold
    free = ~outline
    reach = np.zeros_like(free)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        p = np.pad(reach, 1)
        grown = (p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]) & free
        if np.array_equal(grown, reach):
            break
        reach = grown
    filled = ~reach
    # the outline band straddles the edge (|d| <= 1 px): peel its outer pixel off
    p = np.pad(filled, 1)
    return filled & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def control_score(image: np.ndarray, control_map: np.ndarray, background: int | str | None = None) -> float:
    """IoU between the control map's filled shapes and the image's object pixels.

    Object pixels = pixels whose palette label is not the background colour (given by index or
    name, else the most common label of the image).
    """
    labels = palette_labels(image)
    if background is None:
        background = int(np.bincount(labels.ravel(), minlength=8).argmax())
    elif isinstance(background, str):
        background = world.COLOUR_NAMES.index(background)
    objects = labels != background
    target = fill_outline(control_map)
    union = (objects | target).sum()
    return float((objects & target).sum() / union) if union else 1.0


def _descriptor(o: world.SceneObject) -> tuple:
    """What a position-free caption says of an object: objects with equal descriptors are interchangeable."""
    return (o.shape, o.size, o.cell)


def binding_score(image: np.ndarray, scene: world.Scene, masks: np.ndarray) -> dict:
    """Colour binding under control: is each shape painted the colour its words name?

    ``masks`` (K, H, W) bool are the scene's true object masks (world.object_masks), in the order of
    ``scene.objects``. An object is right when the most common non-background palette label inside its
    mask is its colour. Objects the caption cannot tell apart (same shape and size, no position) may
    swap: the better of the two assignments counts.
    """
    labels = palette_labels(image)

    def dominant(mask: np.ndarray) -> int:
        inside = labels[mask]
        inside = inside[inside != scene.background]
        return int(np.bincount(inside, minlength=8).argmax()) if inside.size else -1

    painted = [dominant(m) for m in masks[: len(scene.objects)]]
    wanted = [o.colour for o in scene.objects]
    right = sum(p == w for p, w in zip(painted, wanted, strict=True))
    if len(wanted) == 2 and _descriptor(scene.objects[0]) == _descriptor(scene.objects[1]):
        right = max(right, sum(p == w for p, w in zip(painted, wanted[::-1], strict=True)))
    return {"objects_right": right, "objects_total": len(wanted), "scene_right": right == len(wanted)}


def style_score(image: np.ndarray, caption: str | world.Scene, ring: int = 2) -> float:
    """Fraction of object boundary pixels that are outline-dark (the "outlined" LoRA style).

    For each prompted object: its colour's largest component in its cell, dilated by `ring` px;
    the ring around it counts as outline when labelled black (white for black objects).
    Objects whose outline colour equals the background are skipped (nothing to measure).
    Returns nan when no object could be measured.
    """
    scene = world.parse_caption(caption) if isinstance(caption, str) else caption
    labels = palette_labels(image)
    hits = total = 0
    for o in scene.objects:
        outline = world.WHITE if o.colour == world.BLACK else world.BLACK
        if outline == scene.background:
            continue
        y0, y1, x0, x1 = _region(o.cell)
        # search a slightly larger window so the outline around the shape is inside it
        y0, x0 = max(y0 - 4, 0), max(x0 - 4, 0)
        y1, x1 = min(y1 + 4, world.SIZE), min(x1 + 4, world.SIZE)
        lab = labels[y0:y1, x0:x1]
        comp = largest_component(lab == o.colour)
        if not comp.any():
            total += 1  # a missing object has no outline: count it as one miss
            continue
        grown = comp.copy()
        for _ in range(ring):
            p = np.pad(grown, 1)
            grown = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        band = grown & ~comp
        hits += int((lab[band] == outline).sum())
        total += int(band.sum())
    return hits / total if total else float("nan")


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = (a - b) ** 2
    if mask is not None:
        diff = diff[mask]
    mse = float(diff.mean()) if diff.size else 0.0
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def edit_score(source: np.ndarray, edited: np.ndarray, target_caption: str | world.Scene,
               edited_index: int = 0) -> dict:
    """Edit score: the edited object matches the target caption (changed as asked), and the PSNR
    between source and edited image outside the edited object's cell (preservation)."""
    scene = world.parse_caption(target_caption) if isinstance(target_caption, str) else target_caption
    obj = scene.objects[edited_index]
    labels = palette_labels(edited)
    result = score_object(labels, obj)
    outside = np.ones((world.SIZE, world.SIZE), dtype=bool)
    if obj.cell is not None:
        y0, y1, x0, x1 = world.cell_bounds(obj.cell)
        outside[y0:y1, x0:x1] = False
    return {"changed": result["right"], "object": result,
            "psnr_outside": psnr(np.asarray(source)[..., :3], np.asarray(edited)[..., :3], outside)}


# --------------------------------------------------------------------------------------------
# command line


def _caption_from_png(path: str) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", None) or im.info
        value = text.get("prompt") if text else None
    if value is None:
        return None
    value = value.strip()
    if value.startswith("{"):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError:
            return value
        for key in ("prompt", "text", "caption"):
            if isinstance(obj.get(key), str):
                return obj[key]
        return None
    return value


def _entry(obj: dict):
    f = obj.get("file") or obj.get("image") or obj.get("path")
    c = obj.get("caption") or obj.get("prompt") or obj.get("text")
    return (os.path.basename(f), c) if f and c else None


def load_captions(folder: str) -> dict[str, str]:
    caps: dict[str, str] = {}
    jl = os.path.join(folder, "captions.jsonl")
    js = os.path.join(folder, "captions.json")
    if os.path.exists(jl):
        with open(jl) as fh:
            for line in fh:
                if line.strip() and (e := _entry(json.loads(line))):
                    caps[e[0]] = e[1]
    elif os.path.exists(js):
        with open(js) as fh:
            data = json.load(fh)
        if isinstance(data, dict):
            caps.update({os.path.basename(k): v for k, v in data.items()})
        else:
            caps.update(dict(e for e in map(_entry, data) if e))
    return caps


def evaluate_folder(folder: str, per_image: bool = False) -> dict:
    from PIL import Image

    caps = load_captions(folder)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
    images, texts, names, skipped = [], [], [], []
    for f in files:
        path = os.path.join(folder, f)
        cap = caps.get(f) or _caption_from_png(path)
        if not cap:
            skipped.append({"file": f, "reason": "no caption"})
            continue
        try:
            world.parse_caption(cap)
        except ValueError as e:
            skipped.append({"file": f, "reason": str(e)})
            continue
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape[:2] != (world.SIZE, world.SIZE):
            arr = np.asarray(Image.fromarray(arr).resize((world.SIZE, world.SIZE), Image.BILINEAR))
        images.append(arr)
        texts.append(cap)
        names.append(f)
    summary = score_images(images, texts)
    per = summary.pop("per_image")
    summary["skipped"] = skipped
    if per_image:
        summary["per_image"] = [dict(file=n, caption=c, **p) for n, c, p in zip(names, texts, per, strict=False)]
    return summary


def report(summary: dict, json_path: str | None) -> None:
    """Print a summary as JSON, and write it to ``json_path`` when given (the evaluators' CLIs)."""
    text = json.dumps(summary, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as fh:
            fh.write(text + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--json", help="also write the summary to this file")
    ap.add_argument("--per-image", action="store_true", help="include per-image details")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"not a folder: {args.folder}", file=sys.stderr)
        return 2
    summary = evaluate_folder(args.folder, per_image=args.per_image)
    report(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
