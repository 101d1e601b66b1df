"""ComfyUI nodes that become several ditgraph nodes, or fold into their consumer.

Each ``expand`` function gets (node id, raw API-format node, context) and returns
(extra nodes by id, inputs of the main node). The context (``api.Context``) resolves a
ComfyUI input to our value (a constant or a ``{"from": ...}`` link), follows a link to the
raw upstream node, records notes, and knows the ModelSampling shift reaching a sampler.
"""

from __future__ import annotations

from typing import Any

MATH_NAMES = "abcdefgh"  # the MathExpression node's variables (ComfyUI's values.a, values.b, ...)


def _links_to(nodes: dict, source_id: str) -> list[tuple[str, str, str]]:
    """(consumer id, consumer input, source output) for each link leaving ``source_id``."""
    found = []
    for node_id, node in nodes.items():
        for name, value in node["inputs"].items():
            if isinstance(value, dict) and value.get("from", [None])[0] == source_id:
                found.append((node_id, name, value["from"][1]))
    return found


def negative_only(node_id: str, nodes: dict, notes: list, available: set) -> None:
    """ComfyUI encodes negatives with CLIPTextEncode too; ours has a node for the negative prompt."""
    consumers = _links_to(nodes, node_id)
    if consumers and all(name == "negative" for _, name, _ in consumers) and "TextEncodeNegative" in available:
        nodes[node_id]["type"] = "TextEncodeNegative"


def constant_inputs(**values: Any):
    """A fixup giving our node inputs the ComfyUI type implies (TextEncodeQwenImageEdit: mode "edit")."""

    def fixup(node_id: str, nodes: dict, notes: list, available: set) -> None:
        nodes[node_id]["inputs"].update(values)

    return fixup


_WIRED = {"EmptyLatent": ("model", "vae"), "EmptyVideoLatent": ("model",)}


def wire_empty_latent(node_id: str, nodes: dict, notes: list, available: set) -> None:
    """Our EmptyLatent takes the model and VAE (for channels and scale), EmptyVideoLatent the
    model; ComfyUI's take neither."""
    kind = nodes[node_id]["type"]
    inputs = nodes[node_id]["inputs"]
    samplers = [c for c, _, _ in _links_to(nodes, node_id) if nodes[c]["type"] in ("Sampler", "SamplerCustom")]
    if "model" not in inputs:
        for sampler in samplers:
            if isinstance(nodes[sampler]["inputs"].get("model"), dict):
                inputs["model"] = dict(nodes[sampler]["inputs"]["model"])
                break
    if "vae" in _WIRED[kind] and "vae" not in inputs:
        decoders = [c for sampler in samplers for c, _, _ in _links_to(nodes, sampler) if nodes[c]["type"] == "VAEDecode"]
        decoders += [i for i, n in nodes.items() if n["type"] in ("VAEDecode", "VAEEncode")]
        for decoder in decoders:
            if isinstance(nodes[decoder]["inputs"].get("vae"), dict):
                inputs["vae"] = dict(nodes[decoder]["inputs"]["vae"])
                break
    missing = [name for name in _WIRED[kind] if name not in inputs]
    if missing:
        notes.append(f"node {node_id} ({kind}): could not tell which {' and '.join(missing)} to use; connect it")


COMBINE_SLOTS = ("first", "second", "third", "fourth")  # CombineTextEncoders' inputs


def clip_loaders(count: int):
    """Dual/Triple/QuadrupleCLIPLoader: one TextEncoderLoader per file, merged by CombineTextEncoders."""

    def expand(node_id: str, raw: dict, ctx: Any) -> tuple[dict[str, dict], dict[str, Any]]:
        extra, inputs = {}, {}
        for index, slot in zip(range(1, count + 1), COMBINE_SLOTS, strict=False):
            name = ctx.value(node_id, raw, f"clip_name{index}")
            extra[f"{node_id}.{index}"] = {"type": "TextEncoderLoader", "inputs": {"text_encoder": name}}
            inputs[slot] = {"from": [f"{node_id}.{index}", "text_encoder"]}
        return extra, inputs

    return expand


def switch_branch(raw: dict) -> str | None:
    """ComfySwitchNode with a constant condition: its consumers take that branch directly."""
    switch = (raw.get("inputs") or {}).get("switch")
    return ("on_true" if switch else "on_false") if isinstance(switch, bool) else None


def _folded(node_id: str, raw: dict, name: str, ctx: Any, kinds: tuple[str, ...]) -> tuple[str, dict]:
    source_id, source = ctx.upstream(node_id, raw, name)
    if source.get("class_type") not in kinds:
        ctx.fail(node_id, raw, f"its {name!r} comes from a {source.get('class_type')} node; ditgraph can only take it from "
                               f"{' or '.join(kinds)}")
    return source_id, source


def _guider(node_id: str, raw: dict, ctx: Any) -> dict[str, Any]:
    source_id, guider = _folded(node_id, raw, "guider", ctx, ("BasicGuider", "CFGGuider"))
    if guider["class_type"] == "BasicGuider":
        return {"model": ctx.value(source_id, guider, "model"), "positive": ctx.value(source_id, guider, "conditioning"),
                "cfg": 1.0}
    return {name: ctx.value(source_id, guider, name) for name in ("model", "positive", "negative", "cfg")}


def _noise(node_id: str, raw: dict, ctx: Any) -> dict[str, Any]:
    source_id, noise = _folded(node_id, raw, "noise", ctx, ("RandomNoise", "DisableNoise"))
    if noise["class_type"] == "DisableNoise":
        return {"add_noise": False}
    return {"seed": ctx.value(source_id, noise, "noise_seed"), "add_noise": True}


def _sampler(node_id: str, raw: dict, ctx: Any) -> dict[str, Any]:
    from app.fronts.comfy.table import sampler_name

    source_id, select = _folded(node_id, raw, "sampler", ctx, ("KSamplerSelect",))
    return {"sampler": ctx.translate(source_id, select, "sampler_name", sampler_name)}


def sampler_custom_advanced(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """noise + guider + sampler + sigmas -> one SamplerCustom (RandomNoise, CFGGuider, KSamplerSelect fold in)."""
    inputs = {"sigmas": ctx.value(node_id, raw, "sigmas"), "latent": ctx.value(node_id, raw, "latent_image")}
    inputs.update(_guider(node_id, raw, ctx))
    inputs.update(_noise(node_id, raw, ctx))
    inputs.update(_sampler(node_id, raw, ctx))
    return {}, inputs


def sampler_custom(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """ComfyUI's SamplerCustom: ours with the KSamplerSelect folded in."""
    inputs = {name: ctx.value(node_id, raw, name) for name in ("model", "positive", "negative", "cfg", "sigmas")}
    inputs.update(latent=ctx.value(node_id, raw, "latent_image"), seed=ctx.value(node_id, raw, "noise_seed"),
                  add_noise=bool(ctx.value(node_id, raw, "add_noise", True)))
    inputs.update(_sampler(node_id, raw, ctx))
    return {}, inputs


def _step_count(node_id: str, raw: dict, name: str, ctx: Any, default: int) -> int | dict:
    """A step number written on the node (or on a primitive node), else the link that gives it."""
    value = ctx.constant(node_id, raw, name, default)
    if isinstance(value, dict) and "from" in value:
        return value  # e.g. a switch between two step counts: our nodes take the link
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ctx.fail(node_id, raw, f"its {name!r} must be a number")
    return int(value)


def ksampler_advanced(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """KSamplerAdvanced -> Scheduler, SplitSigmas at end/start step, SamplerCustom. Linked step
    numbers are passed on as links; the schedule is then split wherever it may be cut."""
    from app.fronts.comfy.table import sampler_name, scheduler_name

    steps = _step_count(node_id, raw, "steps", ctx, 20)
    start = _step_count(node_id, raw, "start_at_step", ctx, 0)
    end = _step_count(node_id, raw, "end_at_step", ctx, 10000)
    if isinstance(end, int) and isinstance(steps, int):
        end = min(end, steps)
    cuts_end = isinstance(end, dict) or end < (steps if isinstance(steps, int) else 1000)  # 1000: Scheduler's most steps
    schedule = {"model": ctx.value(node_id, raw, "model"), "steps": steps,
                "scheduler": ctx.translate(node_id, raw, "scheduler", scheduler_name)}
    if ctx.shift(node_id) is not None:
        schedule["shift"] = ctx.shift(node_id)
    extra = {f"{node_id}.1": {"type": "Scheduler", "inputs": schedule}}
    sigmas: dict = {"from": [f"{node_id}.1", "sigmas"]}
    if cuts_end:
        extra[f"{node_id}.2"] = {"type": "SplitSigmas", "inputs": {"sigmas": sigmas, "step": end}}
        sigmas = {"from": [f"{node_id}.2", "high"]}
        if ctx.value(node_id, raw, "return_with_leftover_noise", "disable") != "enable":
            ctx.note(node_id, raw, "ComfyUI denoises fully at end_at_step; here the latent keeps the noise of that step")
    if isinstance(start, dict) or start > 0:
        extra[f"{node_id}.3"] = {"type": "SplitSigmas", "inputs": {"sigmas": sigmas, "step": start}}
        sigmas = {"from": [f"{node_id}.3", "low"]}
    inputs = {name: ctx.value(node_id, raw, name) for name in ("model", "positive", "negative", "cfg")}
    noise = ctx.value(node_id, raw, "add_noise", "enable") == "enable"
    inputs.update(latent=ctx.value(node_id, raw, "latent_image"), sigmas=sigmas, add_noise=noise,
                  sampler=ctx.translate(node_id, raw, "sampler_name", sampler_name))
    if noise:  # without noise the seed means nothing (and ComfyUI's DisableNoise has none)
        inputs["seed"] = ctx.value(node_id, raw, "noise_seed")
    return extra, inputs


def math_expression(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """ComfyMathExpression's grown inputs values.a, values.b, ... -> MathExpression's a, b, ..."""
    inputs = {"expression": ctx.value(node_id, raw, "expression", "a")}
    for name in raw.get("inputs") or {}:
        letter = name.removeprefix("values.")
        if name.startswith("values.") and letter in MATH_NAMES:
            inputs[letter] = ctx.value(node_id, raw, name)
        elif name.startswith("values."):
            ctx.fail(node_id, raw, f"input {name!r}: ditgraph's MathExpression has the variables {', '.join(MATH_NAMES)}")
    return {}, inputs


def tiled_decode(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    return {}, {"latent": ctx.value(node_id, raw, "samples"), "vae": ctx.value(node_id, raw, "vae"), "tiled": "on"}


def animated_webp(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    inputs = {name: ctx.value(node_id, raw, name) for name in ("images", "filename_prefix", "fps")}
    return {}, {**inputs, "format": "mp4"}


def clip_text_encode_flux(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """CLIPTextEncodeFlux -> TextEncode (the T5 prompt) + FluxGuidance."""
    clip_l, t5 = ctx.value(node_id, raw, "clip_l", ""), ctx.value(node_id, raw, "t5xxl", "")
    if clip_l and clip_l != t5:
        ctx.note(node_id, raw, "one prompt feeds both encoders here: the clip_l prompt was dropped, the t5xxl one kept")
    encode = {"text_encoder": ctx.value(node_id, raw, "clip"), "text": t5 or clip_l}
    return ({f"{node_id}.1": {"type": "TextEncode", "inputs": encode}},
            {"conditioning": {"from": [f"{node_id}.1", "conditioning"]}, "guidance": ctx.value(node_id, raw, "guidance", 3.5)})


def clip_text_encode_sd3(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """CLIPTextEncodeSD3 -> TextEncode with one prompt (the T5 one, else CLIP-L's)."""
    prompts = [ctx.value(node_id, raw, name, "") for name in ("t5xxl", "clip_l", "clip_g")]
    if len({p for p in prompts if p}) > 1:
        ctx.note(node_id, raw, "one prompt feeds all three encoders here: the T5 prompt was kept")
    return {}, {"text_encoder": ctx.value(node_id, raw, "clip"), "text": next((p for p in prompts if p), "")}


_CONTROL_APPLY = {"ControlNetApply", "ControlNetApplyAdvanced", "ControlNetApplySD3"}
_MODEL_TAKERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "CFGGuider", "BasicGuider"}


def _consumers(ctx: Any, node_id: str) -> list[tuple[str, dict]]:
    return [(str(k), v) for k, v in ctx.document.items()
            if any(isinstance(x, list) and len(x) == 2 and str(x[0]) == node_id for x in (v.get("inputs") or {}).values())]


def apply_controlnet(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """ComfyUI attaches a ControlNet to the conditioning; ours patches the MODEL. The model comes
    from the sampler (or guider) the conditioning reaches, or from the ControlNet node before
    this one in a chain; that sampler is given the patched model instead."""
    upstream = [ctx.upstream(node_id, raw, n)[0] for n in ("positive", "conditioning") if ctx.value(node_id, raw, n)]
    before = next((u for u in upstream if ctx.document[u].get("class_type") in _CONTROL_APPLY), None)
    stack, takers = [node_id], []
    while stack:
        for consumer_id, consumer in _consumers(ctx, stack.pop()):
            if consumer.get("class_type") in _CONTROL_APPLY:
                stack.append(consumer_id)
            elif consumer.get("class_type") in _MODEL_TAKERS:
                takers.append((consumer_id, consumer))
    if not takers:
        ctx.fail(node_id, raw, "its conditioning reaches no sampler, so there is no model to attach the ControlNet to")
    taker_id, taker = takers[0]
    model = {"from": [before, "model"]} if before else ctx.value(taker_id, taker, "model")
    for consumer_id, consumer in _consumers(ctx, node_id):
        if consumer.get("class_type") in _MODEL_TAKERS:
            ctx.override(consumer_id, "model", {"from": [node_id, "model"]})
    inputs = {"model": model, "control": ctx.value(node_id, raw, "control_net"), "image": ctx.value(node_id, raw, "image"),
              "vae": ctx.value(node_id, raw, "vae"), "strength": ctx.value(node_id, raw, "strength", 1.0),
              "start": ctx.value(node_id, raw, "start_percent", 0.0), "end": ctx.value(node_id, raw, "end_percent", 1.0)}
    return {}, inputs


def wire_scheduler_model(node_id: str, nodes: dict, notes: list, available: set) -> None:
    """LTXVScheduler takes no model, our Scheduler does: the model of the sampler it feeds."""
    stack, seen = [node_id], set()
    while stack and "model" not in nodes[node_id]["inputs"]:
        for consumer, _, _ in _links_to(nodes, stack.pop()):
            model = nodes[consumer]["inputs"].get("model") if consumer not in seen else None
            seen.add(consumer)
            if isinstance(model, dict):
                nodes[node_id]["inputs"]["model"] = dict(model)
                break
            stack.append(consumer)  # through SplitSigmas
    if "model" not in nodes[node_id]["inputs"]:
        notes.append(f"node {node_id} (Scheduler): could not tell which model to use; connect it")
    scheduler_size(node_id, nodes, notes, available)


def scheduler_size(node_id: str, nodes: dict, notes: list, available: set) -> None:
    """Our Scheduler takes the image size (for Flux's resolution-dependent shift); ComfyUI's
    BasicScheduler does not: take it from the empty latent the sampler it feeds starts from."""
    scheduler = node_id if nodes.get(node_id, {}).get("type") == "Scheduler" else f"{node_id}.1"
    stack, seen = [scheduler], set()
    while stack:
        for consumer, _, _ in _links_to(nodes, stack.pop()):
            if consumer in seen:
                continue
            seen.add(consumer)
            if nodes[consumer]["type"] == "SplitSigmas":
                stack.append(consumer)
            latent = nodes[consumer]["inputs"].get("latent") if nodes[consumer]["type"] == "SamplerCustom" else None
            source = nodes.get(latent["from"][0]) if isinstance(latent, dict) else None
            if source and source["type"] in _WIRED and scheduler in nodes:
                size = {k: source["inputs"][k] for k in ("width", "height") if isinstance(source["inputs"].get(k), int)}
                nodes[scheduler]["inputs"] = {**size, **nodes[scheduler]["inputs"]}
                return


def batch_images(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """BatchImagesNode's grown inputs images.image0, image1, ... -> a chain of two-input ImageBatch nodes."""
    names = sorted((n for n in raw.get("inputs") or {} if n.startswith("images.")), key=lambda n: (len(n), n))
    images = [value for value in (ctx.value(node_id, raw, n) for n in names) if value is not None]
    if len(images) < 2:
        ctx.fail(node_id, raw, "needs at least two connected images")
    extra, first = {}, images[0]
    for index, image in enumerate(images[1:-1], 1):
        extra[f"{node_id}.{index}"] = {"type": "ImageBatch", "inputs": {"first": first, "second": image}}
        first = {"from": [f"{node_id}.{index}", "image"]}
    return extra, {"first": first, "second": images[-1]}


def _model_taker(ctx: Any, node_id: str) -> tuple[str, dict] | None:
    """The first sampler or guider an output of ``node_id`` reaches (through conditioning nodes)."""
    stack, seen = [node_id], set()
    while stack:
        for consumer_id, consumer in _consumers(ctx, stack.pop()):
            if consumer.get("class_type") in _MODEL_TAKERS:
                return consumer_id, consumer
            if consumer_id not in seen:
                seen.add(consumer_id)
                stack.append(consumer_id)
    return None


def image_to_video(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """WanImageToVideo -> ImageToVideo, with the model of the sampler its outputs reach."""
    if ctx.value(node_id, raw, "clip_vision_output") is not None:
        ctx.fail(node_id, raw, "CLIP-vision conditioned image-to-video (Wan 2.1 I2V) is not supported; use Wan 2.2 I2V")
    if ctx.value(node_id, raw, "start_image") is None:
        ctx.fail(node_id, raw, "needs a start_image (ditgraph's ImageToVideo starts from one)")
    taker = _model_taker(ctx, node_id)
    if taker is None:
        ctx.fail(node_id, raw, "its outputs reach no sampler, so there is no model to size the video latent")
    inputs = {name: ctx.value(node_id, raw, name) for name in ("vae", "positive", "negative", "start_image", "width",
                                                                "height", "batch_size")}
    return {}, {**inputs, "model": ctx.value(*taker, "model"), "frames": ctx.value(node_id, raw, "length")}


def frame_rate_pair(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """LTXVConditioning(positive, negative, frame_rate) -> a ConditioningFrameRate for each
    (the negative one is ``<id>.1``, its output index 1; only when something takes it)."""
    rate = ctx.value(node_id, raw, "frame_rate", 25.0)
    negative = {"conditioning": ctx.value(node_id, raw, "negative"), "frame_rate": rate}
    used = any(isinstance(v, list) and len(v) == 2 and str(v[0]) == node_id and v[1] == 1
               for _, consumer in _consumers(ctx, node_id) for v in (consumer.get("inputs") or {}).values())
    extra = {f"{node_id}.1": {"type": "ConditioningFrameRate", "inputs": negative}} if used else {}
    return extra, {"conditioning": ctx.value(node_id, raw, "positive"), "frame_rate": rate}


# -- utilities of the official templates (issue 23) -----------------------------------------------

RESIZE_WIDGETS = {  # ResizeImageMaskNode: each resize_type's sub-widgets, and the node of ours doing it
    "scale dimensions": ("width", "height", "crop"), "scale by multiplier": ("multiplier",),
    "scale longer dimension": ("longer_size",), "scale shorter dimension": ("shorter_size",), "scale width": ("width",),
    "scale height": ("height",), "scale total pixels": ("megapixels",), "match size": ("crop",),
    "scale to multiple": ("multiple",),
}
_RESIZE_NODES = {"scale by multiplier": "ImageScaleBy", "scale total pixels": "ScaleToMegapixels",
                 "scale longer dimension": "ScaleToSide", "scale shorter dimension": "ScaleToSide"}
SAVE_FORMAT_WIDGETS = {"png": ("bit_depth", "input_color_space"), "exr": ("bit_depth", "input_color_space"),
                       "avif": ("bit_depth", "input_color_space", "crf", "save_mode")}


def resize_kind(raw: dict) -> str:
    """The node of ours a ResizeImageMaskNode becomes (ImageScale for sizes, the others by resize_type)."""
    return _RESIZE_NODES.get((raw.get("inputs") or {}).get("resize_type"), "ImageScale")


def resize_image(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """ResizeImageMaskNode (one dynamic node for every way to resize) -> ImageScale, ImageScaleBy,
    ScaleToMegapixels or ScaleToSide; "match size" -> ImageScale fed by an ImageSize of the match."""
    from app.fronts.comfy.table import UPSCALE

    kind = ctx.value(node_id, raw, "resize_type", "scale dimensions")
    if kind not in RESIZE_WIDGETS or kind == "scale to multiple":
        ctx.fail(node_id, raw, f"resize_type {kind!r} has no ditgraph node "
                               f"(it has: {', '.join(k for k in RESIZE_WIDGETS if k != 'scale to multiple')})")
    method, note = UPSCALE(ctx.value(node_id, raw, "scale_method", "area"))
    if note:
        ctx.note(node_id, raw, note)

    def sub(name: str, default: Any = None) -> Any:
        return ctx.value(node_id, raw, f"resize_type.{name}", default)

    inputs, extra = {"image": ctx.value(node_id, raw, "input"), "method": method}, {}
    if kind == "scale dimensions":
        inputs.update(width=sub("width", 512), height=sub("height", 512), crop=sub("crop", "center"))
    elif kind in ("scale width", "scale height"):
        inputs.update(width=sub("width", 0) if kind == "scale width" else 0, height=sub("height", 0) if kind == "scale height" else 0)
    elif kind == "match size":
        extra[f"{node_id}.1"] = {"type": "ImageSize", "inputs": {"image": sub("match")}}
        inputs.update(width={"from": [f"{node_id}.1", "width"]}, height={"from": [f"{node_id}.1", "height"]},
                      crop=sub("crop", "center"))
    elif kind == "scale by multiplier":
        inputs["scale_by"] = sub("multiplier", 1.0)
    elif kind == "scale total pixels":
        inputs["megapixels"] = sub("megapixels", 1.0)
    elif "longer" in kind:
        inputs["size"] = sub("longer_size", 512)  # ScaleToSide's default side (as ImageScaleToMaxDimension imports)
    else:
        inputs.update(side="shorter", size=sub("shorter_size", 512))
    return extra, inputs


def save_image_advanced(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """SaveImageAdvanced -> SaveImage (an 8-bit PNG with the workflow embedded, whatever format it asked for)."""
    fmt = ctx.value(node_id, raw, "format", ctx.value(node_id, raw, "file_format", "png"))
    depth = ctx.value(node_id, raw, "format.bit_depth", ctx.value(node_id, raw, "bit_depth", "8-bit"))
    if (fmt, depth) != ("png", "8-bit"):
        ctx.note(node_id, raw, f"saved as an 8-bit PNG (ComfyUI would write {fmt}, {depth})")
    return {}, {"images": ctx.value(node_id, raw, "images"), "filename_prefix": ctx.value(node_id, raw, "filename_prefix", "ComfyUI")}


def attention_backend(node_id: str, raw: dict, ctx: Any) -> tuple[dict, dict]:
    """ModelAttentionBackend -> AttentionBackend 'auto' (ComfyUI's backends are its own kernels)."""
    chosen = ctx.value(node_id, raw, "attention")
    if chosen is not None:
        ctx.note(node_id, raw, f"attention {chosen!r} is ComfyUI's own; ditgraph picks its backend ('auto')")
    return {}, {"model": ctx.value(node_id, raw, "model"), "backend": "auto"}
