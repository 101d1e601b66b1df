"""Import ComfyUI API-format workflows ("Save (API Format)", or the ``prompt`` of a /prompt call).

    {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "model": ["4", 0], ...}, "_meta": {"title": "..."}}}

Each ComfyUI node type is mapped by :data:`TABLE` to a ditgraph node type: input names are
renamed, linked outputs are translated from ComfyUI's output index to our output name,
and a few values are translated (sampler names). A node type without a mapping, or whose
ditgraph node is not installed, stops the import with the list of every such type.
The table is documented in docs/comfy_import.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.core.workflow import FORMAT, VERSION


class ComfyImportError(ValueError):
    """The file cannot be imported; ``unmapped`` lists the ComfyUI types we have no node for."""

    def __init__(self, message: str, unmapped: list[str] | None = None):
        self.unmapped = unmapped or []
        super().__init__(message)


Translate = Callable[[Any], tuple[Any, str | None]]  # value -> (our value, note for the user or None)
Fixup = Callable[[str, dict, list, set], None]  # (node id, converted nodes, notes, installed types)


@dataclass(frozen=True)
class NodeMap:
    """How one ComfyUI node type becomes one ditgraph node."""

    target: str | None  # the ditgraph node type; None: the node dissolves (its outputs all pass through)
    outputs: tuple[str, ...]  # ComfyUI output index -> our output name
    inputs: dict[str, str] = field(default_factory=dict)  # ComfyUI input name -> ours (same name if absent)
    drop: frozenset[str] = frozenset()  # ComfyUI inputs with no counterpart, ignored on purpose
    values: dict[str, Translate] = field(default_factory=dict)  # our input name -> value translation
    fixup: Fixup | None = None
    # ComfyUI outputs our node lacks that only pass an input through (LoraLoader's CLIP): output
    # index -> the ComfyUI input whose link its consumers get instead
    passthrough: dict[int, str] = field(default_factory=dict)
    # one ComfyUI node that becomes several of ours: (node id, ComfyUI inputs) -> (extra nodes by id,
    # inputs of the main node); the extra nodes' ids are "<id>.<n>"
    expand: Callable[[str, dict], tuple[dict[str, dict], dict[str, Any]]] | None = None
    note: str = ""


def _choice(table: dict[str, str], default: str, what: str) -> Translate:
    def translate(value: Any) -> tuple[Any, str | None]:
        if value in table:
            return table[value], None
        return default, f"{what} {value!r} has no ditgraph equivalent; using {default!r}"

    return translate


_SAMPLERS = {"euler": "euler", "euler_ancestral": "euler", "euler_cfg_pp": "euler", "heun": "heun", "dpmpp_2m": "dpmpp_2m",
             "dpmpp_2m_sde": "dpmpp_2m", "dpmpp_2m_sde_gpu": "dpmpp_2m"}
_SCHEDULERS = {"karras": "karras", "normal": "auto", "simple": "auto", "sgm_uniform": "auto", "beta": "auto",
               "linear_quadratic": "linear", "ddim_uniform": "discrete"}


def _links_to(nodes: dict, source_id: str) -> list[tuple[str, str, str]]:
    """(consumer id, consumer input, source output) for each link leaving ``source_id``."""
    found = []
    for node_id, node in nodes.items():
        for name, value in node["inputs"].items():
            if isinstance(value, dict) and value.get("from", [None])[0] == source_id:
                found.append((node_id, name, value["from"][1]))
    return found


def _negative_only(node_id: str, nodes: dict, notes: list, available: set) -> None:
    """ComfyUI encodes negatives with CLIPTextEncode too; ours has a node for the negative prompt."""
    consumers = _links_to(nodes, node_id)
    if consumers and all(name == "negative" for _, name, _ in consumers) and "TextEncodeNegative" in available:
        nodes[node_id]["type"] = "TextEncodeNegative"


def _wire_empty_latent(node_id: str, nodes: dict, notes: list, available: set) -> None:
    """Our EmptyLatent takes the model and VAE (for channels and scale); ComfyUI's takes neither."""
    inputs = nodes[node_id]["inputs"]
    samplers = [c for c, name, _ in _links_to(nodes, node_id) if nodes[c]["type"] in ("Sampler", "SamplerCustom")]
    if "model" not in inputs:
        for sampler in samplers:
            if isinstance(nodes[sampler]["inputs"].get("model"), dict):
                inputs["model"] = dict(nodes[sampler]["inputs"]["model"])
                break
    if "vae" not in inputs:
        decoders = [c for sampler in samplers for c, name, _ in _links_to(nodes, sampler) if nodes[c]["type"] == "VAEDecode"]
        decoders += [i for i, n in nodes.items() if n["type"] in ("VAEDecode", "VAEEncode")]
        for decoder in decoders:
            if isinstance(nodes[decoder]["inputs"].get("vae"), dict):
                inputs["vae"] = dict(nodes[decoder]["inputs"]["vae"])
                break
    missing = [name for name in ("model", "vae") if name not in inputs]
    if missing:
        notes.append(f"node {node_id} (EmptyLatent): could not tell which {' and '.join(missing)} to use; connect it")


def _clip_loaders(count: int) -> Callable[[str, dict], tuple[dict[str, dict], dict[str, Any]]]:
    """DualCLIPLoader / TripleCLIPLoader: one TextEncoderLoader per file, merged by CombineTextEncoders."""

    def expand(node_id: str, raw_inputs: dict) -> tuple[dict[str, dict], dict[str, Any]]:
        extra, inputs = {}, {}
        for index, slot in zip(range(1, count + 1), ("first", "second", "third"), strict=False):
            name = raw_inputs.get(f"clip_name{index}")
            extra[f"{node_id}.{index}"] = {"type": "TextEncoderLoader", "inputs": {"text_encoder": name}}
            inputs[slot] = {"from": [f"{node_id}.{index}", "text_encoder"]}
        return extra, inputs

    return expand


# the ComfyUI nodes that only hand a MODEL on (for following ModelSampling* shifts to samplers)
_MODEL_PASSING = {"LoraLoader", "LoraLoaderModelOnly", "ModelSamplingSD3", "ModelSamplingAuraFlow", "ModelSamplingFlux"}
_SHIFT_TAKERS = {"KSampler", "BasicScheduler"}


def _sampler_shifts(document: dict) -> dict[str, float]:
    """ComfyUI sets the flow shift on the MODEL (ModelSamplingSD3/AuraFlow); ours is a sampler
    input: the shift each KSampler/BasicScheduler downstream of such a node should get."""
    consumers: dict[str, list[str]] = {}
    for node_id, raw in document.items():
        for value in (raw.get("inputs") or {}).values():
            if _is_link(value) and value[1] == 0:
                consumers.setdefault(str(value[0]), []).append(str(node_id))
    shifts: dict[str, float] = {}
    for node_id, raw in document.items():
        if raw.get("class_type") not in ("ModelSamplingSD3", "ModelSamplingAuraFlow"):
            continue
        shift = (raw.get("inputs") or {}).get("shift")
        if not isinstance(shift, (int, float)) or isinstance(shift, bool):
            continue
        stack, seen = [str(node_id)], set()
        while stack:
            current = stack.pop()
            for consumer in consumers.get(current, []):
                if consumer in seen:
                    continue
                seen.add(consumer)
                kind = document[consumer].get("class_type") if consumer in document else None
                if kind in _SHIFT_TAKERS:
                    shifts[consumer] = float(shift)
                elif kind in _MODEL_PASSING and kind not in ("ModelSamplingSD3", "ModelSamplingAuraFlow"):
                    stack.append(consumer)
    return shifts


# ComfyUI type -> ditgraph node. Core primitives first, then the diffusion nodes.
TABLE: dict[str, NodeMap] = {
    "PrimitiveInt": NodeMap("PrimitiveInt", ("value",)),
    "PrimitiveFloat": NodeMap("PrimitiveFloat", ("value",)),
    "PrimitiveString": NodeMap("PrimitiveString", ("value",)),
    "PrimitiveStringMultiline": NodeMap("PrimitiveString", ("value",)),
    "PrimitiveBoolean": NodeMap("PrimitiveBoolean", ("value",)),
    "PreviewAny": NodeMap("PreviewAny", (), {"source": "value"}),
    "CheckpointLoaderSimple": NodeMap("CheckpointLoader", ("model", "text_encoder", "vae"), {"ckpt_name": "checkpoint"}),
    "UNETLoader": NodeMap("CheckpointLoader", ("model",), {"unet_name": "checkpoint"}, drop=frozenset({"weight_dtype"}),
                          note="the diffusion model file loads through CheckpointLoader (dtype: auto)"),
    "CLIPLoader": NodeMap("TextEncoderLoader", ("text_encoder",), {"clip_name": "text_encoder"},
                          drop=frozenset({"type", "device"})),
    "DualCLIPLoader": NodeMap("CombineTextEncoders", ("text_encoder",), drop=frozenset({"type", "device"}),
                              expand=_clip_loaders(2)),
    "TripleCLIPLoader": NodeMap("CombineTextEncoders", ("text_encoder",), expand=_clip_loaders(3)),
    "ModelSamplingSD3": NodeMap(None, (), passthrough={0: "model"}),
    "ModelSamplingAuraFlow": NodeMap(None, (), passthrough={0: "model"}),
    "ModelSamplingFlux": NodeMap(None, (), passthrough={0: "model"},
                                 note="dissolved: Flux's resolution-dependent shift is the sampler's scheduler 'auto'"),
    "VAELoader": NodeMap("VAELoader", ("vae",), {"vae_name": "vae"}),
    "CLIPTextEncode": NodeMap("TextEncode", ("conditioning",), {"clip": "text_encoder"}, fixup=_negative_only),
    "ConditioningZeroOut": NodeMap("ConditioningZeroOut", ("conditioning",)),
    "FluxGuidance": NodeMap("FluxGuidance", ("conditioning",)),
    "KSampler": NodeMap(
        "Sampler", ("latent",), {"latent_image": "latent", "sampler_name": "sampler"},
        values={"sampler": _choice(_SAMPLERS, "euler", "sampler"), "scheduler": _choice(_SCHEDULERS, "auto", "scheduler")},
    ),
    "EmptyLatentImage": NodeMap("EmptyLatent", ("latent",), fixup=_wire_empty_latent),
    "EmptySD3LatentImage": NodeMap("EmptyLatent", ("latent",), fixup=_wire_empty_latent),
    "VAEDecode": NodeMap("VAEDecode", ("image",), {"samples": "latent"}),
    "VAEEncode": NodeMap("VAEEncode", ("latent",), {"pixels": "image"}),
    "LoraLoaderModelOnly": NodeMap("LoraLoader", ("model",), {"lora_name": "lora", "strength_model": "strength"}),
    "LoraLoader": NodeMap("LoraLoader", ("model",), {"lora_name": "lora", "strength_model": "strength"},
                          drop=frozenset({"clip", "strength_clip"}), passthrough={1: "clip"},
                          note="the LoRA is applied to the MODEL only; its CLIP output passes the text encoder through"),
    "BasicScheduler": NodeMap("Scheduler", ("sigmas",),
                              values={"scheduler": _choice(_SCHEDULERS, "auto", "scheduler")}),
    "SplitSigmas": NodeMap("SplitSigmas", ("high", "low")),
    "SetLatentNoiseMask": NodeMap("SetLatentNoiseMask", ("latent",), {"samples": "latent"}),
    "RepeatLatentBatch": NodeMap("RepeatLatentBatch", ("latent",), {"samples": "latent"}),
    "LatentFromBatch": NodeMap("LatentFromBatch", ("latent",), {"samples": "latent", "batch_index": "index"}),
    "LatentBatch": NodeMap("LatentBatch", ("latent",), {"samples1": "first", "samples2": "second"}),
    "LatentUpscaleBy": NodeMap("UpscaleLatent", ("latent",), {"samples": "latent", "upscale_method": "mode", "scale_by": "scale"},
                               values={"mode": _choice({"nearest-exact": "nearest-exact", "bilinear": "bilinear",
                                                        "bicubic": "bicubic", "area": "bilinear", "bislerp": "bilinear"},
                                                       "bilinear", "upscale method")}),
    "InvertMask": NodeMap("InvertMask", ("mask",)),
    "ThresholdMask": NodeMap("ThresholdMask", ("mask",), {"value": "threshold"}),
    "GrowMask": NodeMap("GrowMask", ("mask",), {"expand": "pixels"}, drop=frozenset({"tapered_corners"})),
    "SolidMask": NodeMap("SolidMask", ("mask",)),
    "MaskToImage": NodeMap("MaskToImage", ("image",)),
    "LoadImageMask": NodeMap("LoadImageMask", ("mask",), drop=frozenset({"upload"})),
    "SaveImage": NodeMap("SaveImage", ()),
    "PreviewImage": NodeMap("PreviewImage", ()),
    "LoadImage": NodeMap("LoadImage", ("image", "mask"), drop=frozenset({"upload"})),
}


def is_api_format(document: Any) -> bool:
    return isinstance(document, dict) and bool(document) and all(
        isinstance(v, dict) and "class_type" in v for v in document.values()
    )


def _unwrap(document: Any) -> dict:
    if isinstance(document, dict) and "prompt" in document and is_api_format(document["prompt"]):
        return document["prompt"]  # the body of a POST /prompt call
    if isinstance(document, dict) and isinstance(document.get("nodes"), list) and "links" in document:
        raise ComfyImportError("this is a ComfyUI editor (UI-format) file; in ComfyUI use Workflow > Export (API) "
                               "and import that file")
    if isinstance(document, dict) and document.get("format") == FORMAT:
        raise ComfyImportError("this is already a ditgraph workflow")
    if not is_api_format(document):
        raise ComfyImportError("not a ComfyUI API-format workflow: expected an object mapping node ids to "
                               '{"class_type": ..., "inputs": {...}}')
    return document


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def _link(document: dict, node_id: str, comfy_name: str, value: list, depth: int = 0) -> dict:
    """Our link for ComfyUI's ``[source, output index]``, following pass-through outputs."""
    source_id = str(value[0])
    source = document.get(source_id, document.get(value[0]))  # ids may be ints in hand-written files
    if source is None:
        raise ComfyImportError(f"node {node_id}: input {comfy_name!r} links to node {source_id}, which does not exist")
    source_map = TABLE[source["class_type"]]
    through = source_map.passthrough.get(value[1])
    if through is not None and depth < 100:
        upstream = (source.get("inputs") or {}).get(through)
        if not _is_link(upstream):
            raise ComfyImportError(f"node {source_id} ({source['class_type']}): its input {through!r} is not linked")
        return _link(document, source_id, through, upstream, depth + 1)
    if not 0 <= value[1] < len(source_map.outputs):
        raise ComfyImportError(f"node {node_id}: input {comfy_name!r} links to output {value[1]} of node "
                               f"{source_id} ({source['class_type']}), which has {len(source_map.outputs)} output(s) here")
    return {"from": [source_id, source_map.outputs[value[1]]]}


def unmapped_types(document: Any, registry) -> list[str]:
    """The ComfyUI types in ``document`` that this installation cannot import."""
    document = _unwrap(document)
    missing = set()
    for raw in document.values():
        mapping = TABLE.get(raw.get("class_type"))
        if mapping is None or (mapping.target is not None and registry.get(mapping.target) is None):
            missing.add(str(raw.get("class_type")))
        elif mapping.expand is not None and registry.get("TextEncoderLoader") is None:
            missing.add(str(raw.get("class_type")))
    return sorted(missing)


def convert(document: Any, registry, name: str | None = None) -> dict:
    """A ditgraph workflow document from a ComfyUI API-format one.

    Raises ComfyImportError listing every unmapped node type (nothing is half-imported).
    """
    document = _unwrap(document)
    missing = unmapped_types(document, registry)
    if missing:
        ids = {t: sorted(str(k) for k, v in document.items() if str(v.get("class_type")) == t) for t in missing}
        listed = "; ".join(f"{t} (node {', '.join(ids[t][:5])})" for t in missing)
        raise ComfyImportError(f"{len(missing)} ComfyUI node type(s) have no ditgraph equivalent here: {listed}. "
                               "See docs/comfy_import.md for the supported types.", unmapped=missing)
    notes: list[str] = []
    nodes: dict[str, dict] = {}
    shifts = _sampler_shifts(document)
    for node_id, raw in document.items():
        node_id = str(node_id)
        mapping = TABLE[raw["class_type"]]
        raw_inputs = raw.get("inputs") or {}
        if not isinstance(raw_inputs, dict):
            raise ComfyImportError(f"node {node_id}: 'inputs' must be an object")
        if mapping.target is None:  # dissolved: consumers are linked past it
            if mapping.note:
                notes.append(f"node {node_id} ({raw['class_type']}): {mapping.note}")
            continue
        nd = registry.get(mapping.target)
        inputs: dict[str, Any] = {}
        if mapping.expand is not None:
            extra, inputs = mapping.expand(node_id, raw_inputs)
            nodes.update(extra)
        for comfy_name, value in raw_inputs.items():
            if mapping.expand is not None:
                break
            if comfy_name in mapping.drop:
                continue
            ours = mapping.inputs.get(comfy_name, comfy_name)
            if ours not in nd.inputs:
                notes.append(f"node {node_id} ({raw['class_type']}): input {comfy_name!r} has no counterpart in "
                             f"{mapping.target}; dropped")
                continue
            if _is_link(value):
                inputs[ours] = _link(document, node_id, comfy_name, value)
            else:
                translate = mapping.values.get(ours)
                if translate:
                    value, note = translate(value)
                    if note:
                        notes.append(f"node {node_id} ({raw['class_type']}): {note}")
                inputs[ours] = value
        if node_id in shifts and "shift" in nd.inputs and "shift" not in inputs:
            inputs["shift"] = shifts[node_id]
        if mapping.note:
            notes.append(f"node {node_id} ({raw['class_type']}): {mapping.note}")
        entry: dict[str, Any] = {"type": mapping.target, "inputs": inputs}
        title = (raw.get("_meta") or {}).get("title") if isinstance(raw.get("_meta"), dict) else None
        if isinstance(title, str) and title and title != raw["class_type"]:
            entry["title"] = title
        nodes[node_id] = entry
    for node_id, raw in document.items():
        fixup = TABLE[raw["class_type"]].fixup
        if fixup is not None:
            fixup(str(node_id), nodes, notes, set(registry.nodes))
    meta: dict[str, Any] = {"name": name or "imported from ComfyUI", "imported_from": "comfyui"}
    if notes:
        meta["import_notes"] = notes
    return {"format": FORMAT, "version": VERSION, "nodes": nodes, "layout": {"nodes": _layout(nodes)}, "meta": meta}


def _layout(nodes: dict[str, dict]) -> dict[str, dict]:
    """Columns by depth (longest path from a source), rows in id order: a readable start."""
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: frozenset) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in trail:
            return 0  # a cycle: validation reports it
        parents = [v["from"][0] for v in nodes[node_id]["inputs"].values() if isinstance(v, dict) and "from" in v]
        level = 1 + max((visit(p, trail | {node_id}) for p in parents if p in nodes), default=-1)
        depth[node_id] = level
        return level

    rows: dict[int, int] = {}
    layout = {}
    for node_id in sorted(nodes, key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k)):
        column = visit(node_id, frozenset())
        row = rows.get(column, 0)
        rows[column] = row + 1
        layout[node_id] = {"pos": [40 + 340 * column, 40 + 220 * row]}
    return layout
