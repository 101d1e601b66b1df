"""ditgraph workflow -> ComfyUI API format, for the node types that map back.

The reverse of the import table: each ditgraph type goes back to the first ComfyUI type that
imports to it (or the one in ``PREFERRED``). Where ours is one node and ComfyUI's is several
(SamplerCustom: noise, guider, sampler select) or ComfyUI keeps a value elsewhere (the flow
shift lives on a ModelSamplingSD3 node), the extra ComfyUI nodes get ids "<id>.<role>".
Importing the export gives back the same workflow (tests/fronts/test_comfy_roundtrip.py).
"""

from __future__ import annotations

from typing import Any

from app.fronts.comfy.decompose import COMBINE_SLOTS
from app.fronts.comfy.regroup import inline
from app.fronts.comfy.table import SCHEDULERS, TABLE, NodeMap

PREFERRED = {"EmptyLatent": "EmptySD3LatentImage", "CheckpointLoader": "CheckpointLoaderSimple",
             "LoraLoader": "LoraLoaderModelOnly", "TextEncoderLoader": "CLIPLoader", "Note": "Note",
             "ApplyControlNet": "ControlNetApplyAdvanced", "SaveAnimated": "SaveAnimatedWEBP", "ImageToVideo": "WanImageToVideo",
             "ConditioningFrameRate": "LTXVConditioning", "If": "ComfySwitchNode", "MathExpression": "ComfyMathExpression"}
# outputs of ours whose ComfyUI node has other ones (ComfyUI's ControlNet passes conditionings on)
EXPORT_OUTPUTS = {"ApplyControlNet": ("positive", "negative")}
# our inputs ComfyUI's node does not have (the import fills or defaults them)
NOT_EXPORTED = {"EmptyLatent": {"model", "vae"}, "Sampler": {"shift", "guidance"}, "Scheduler": {"shift", "width", "height"},
                "VAEDecode": {"tiled"}, "CheckpointLoader": {"config", "dtype", "device", "offload"},
                "TextEncoderLoader": {"role", "dtype", "device"}, "SaveAnimated": {"format", "loop"},
                "ApplyControlNet": {"model", "mode"}, "EmptyVideoLatent": {"model"}, "ImageToVideo": {"model"},
                "SaveVideo": {"quality"}, "TextEncodeImageEdit": {"mode", "family"}}
# inputs ComfyUI's node requires that ours lacks
EXPORT_DEFAULTS = {"SaveAnimatedWEBP": {"lossless": False, "quality": 80, "method": "default"}, "SaveVideo": {"codec": "auto"}}
VALUES_BACK = {"scheduler": {ours: comfy for comfy, ours in reversed(list(SCHEDULERS.items()))} | {"auto": "simple",
               "shifted": "simple", "dynamic": "simple"}}


class ComfyExportError(ValueError):
    """Some node types have no ComfyUI counterpart; ``unmapped`` lists them."""

    def __init__(self, message: str, unmapped: list[str]):
        self.unmapped = unmapped
        super().__init__(message)


def _reverse() -> dict[str, tuple[str, NodeMap]]:
    found: dict[str, tuple[str, NodeMap]] = {}
    for comfy, mapping in TABLE.items():
        if mapping.target and not mapping.folded and mapping.expand is None and not mapping.select:
            found.setdefault(mapping.target, (comfy, mapping))
    for ours, comfy in PREFERRED.items():
        found[ours] = (comfy, TABLE[comfy])
    found["TextEncodeNegative"] = ("CLIPTextEncode", TABLE["CLIPTextEncode"])
    return found


REVERSE = _reverse()


class _Exporter:
    def __init__(self, nodes: dict[str, dict]):
        self.nodes, self.out = nodes, {}

    def link(self, value: dict) -> list:
        source_id, output = value["from"]
        source = self.nodes.get(source_id) or {}
        if source.get("type") == "CombineTextEncoders":
            return [source_id, 0]
        outputs = EXPORT_OUTPUTS.get(source.get("type")) or (
            REVERSE[source["type"]][1].outputs if source.get("type") in REVERSE else ())
        return [source_id, outputs.index(output) if output in outputs else 0]

    def value(self, value: Any) -> Any:
        return self.link(value) if isinstance(value, dict) and "from" in value else value

    def add(self, node_id: str, comfy: str, inputs: dict, title: str | None = None) -> None:
        self.out[node_id] = {"class_type": comfy, "inputs": inputs}
        if title:
            self.out[node_id]["_meta"] = {"title": title}

    def shifted(self, node_id: str, inputs: dict, model: Any) -> Any:
        """ComfyUI keeps the shift on the MODEL: a ModelSamplingSD3 node between the model and us."""
        shift = inputs.get("shift")
        if not shift or model is None:
            return self.value(model)
        self.add(f"{node_id}.shift", "ModelSamplingSD3", {"model": self.value(model), "shift": shift})
        return [f"{node_id}.shift", 0]

    def generic(self, node_id: str, node: dict, comfy: str | None = None) -> None:
        comfy, mapping = (comfy, TABLE[comfy]) if comfy else REVERSE[node["type"]]
        back = {ours: theirs for theirs, ours in mapping.inputs.items()}
        skip = NOT_EXPORTED.get(node["type"], set())
        inputs = {}
        for name, value in node.get("inputs", {}).items():
            if name in skip:
                continue
            inputs[back.get(name, name)] = VALUES_BACK.get(name, {}).get(value, value) if not isinstance(value, dict) \
                else self.link(value)
        if "model" in inputs and node["type"] in ("Sampler", "Scheduler"):
            inputs["model"] = self.shifted(node_id, node["inputs"], node["inputs"].get("model"))
        if node["type"] == "VAEDecode" and node["inputs"].get("tiled") == "on":
            comfy = "VAEDecodeTiled"
            inputs.update(tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8)
        self.add(node_id, comfy, {**EXPORT_DEFAULTS.get(comfy, {}), **inputs}, node.get("title"))

    def image_edit(self, node_id: str, node: dict) -> None:
        """TextEncodeImageEdit -> ComfyUI's Qwen edit node of its mode (auto: the Plus one, 2509/2511's)."""
        mode = node.get("inputs", {}).get("mode")
        self.generic(node_id, node, "TextEncodeQwenImageEdit" if mode == "edit" else "TextEncodeQwenImageEditPlus")

    def frame_rate(self, node_id: str, node: dict) -> None:
        """ConditioningFrameRate -> LTXVConditioning on that conditioning alone (its output 0)."""
        conditioning = self.value(node.get("inputs", {}).get("conditioning"))
        self.add(node_id, "LTXVConditioning", {"positive": conditioning, "negative": conditioning,
                                               "frame_rate": node.get("inputs", {}).get("frame_rate", 25.0)}, node.get("title"))

    def math_expression(self, node_id: str, node: dict) -> None:
        """MathExpression's a..h -> ComfyMathExpression's grown inputs values.a, ..."""
        inputs = {("expression" if name == "expression" else f"values.{name}"): self.value(value)
                  for name, value in node.get("inputs", {}).items()}
        self.add(node_id, "ComfyMathExpression", inputs, node.get("title"))

    def scale_to_side(self, node_id: str, node: dict) -> None:
        """ScaleToSide -> ImageScaleToMaxDimension (longer side), or ResizeImageMaskNode's shorter side."""
        inputs = node.get("inputs", {})
        image, method, size = self.value(inputs.get("image")), inputs.get("method", "bicubic"), self.value(inputs.get("size", 1024))
        if inputs.get("side", "longer") == "longer":
            self.add(node_id, "ImageScaleToMaxDimension", {"image": image, "upscale_method": method, "largest_size": size},
                     node.get("title"))
        else:
            self.add(node_id, "ResizeImageMaskNode", {"input": image, "resize_type": "scale shorter dimension",
                                                      "resize_type.shorter_size": size, "scale_method": method}, node.get("title"))

    def sampler_custom(self, node_id: str, node: dict) -> None:
        """Ours is one node; ComfyUI's SamplerCustomAdvanced takes noise, guider and sampler nodes."""
        inputs = node.get("inputs", {})
        if inputs.get("add_noise", True):
            self.add(f"{node_id}.noise", "RandomNoise", {"noise_seed": self.value(inputs.get("seed", 0))})
        else:
            self.add(f"{node_id}.noise", "DisableNoise", {})
        guider = {"model": self.value(inputs.get("model")), "positive": self.value(inputs.get("positive")),
                  "cfg": self.value(inputs.get("cfg", 4.0))}
        if inputs.get("negative") is not None:
            guider["negative"] = self.value(inputs["negative"])
        self.add(f"{node_id}.guider", "CFGGuider" if "negative" in guider else "BasicGuider",
                 guider if "negative" in guider else {"model": guider["model"], "conditioning": guider["positive"]})
        self.add(f"{node_id}.sampler", "KSamplerSelect", {"sampler_name": inputs.get("sampler", "euler")})
        self.add(node_id, "SamplerCustomAdvanced", {
            "noise": [f"{node_id}.noise", 0], "guider": [f"{node_id}.guider", 0], "sampler": [f"{node_id}.sampler", 0],
            "sigmas": self.value(inputs.get("sigmas")), "latent_image": self.value(inputs.get("latent"))}, node.get("title"))

    def combine(self, node_id: str, node: dict) -> None:
        """CombineTextEncoders fed by TextEncoderLoaders -> ComfyUI's Dual/Triple/QuadrupleCLIPLoader."""
        inputs = node.get("inputs", {})
        loaders = [inputs.get(slot) for slot in COMBINE_SLOTS if inputs.get(slot) is not None]
        files = {}
        for index, link in enumerate(loaders, 1):
            source = self.nodes.get(link["from"][0]) if isinstance(link, dict) else None
            if not source or source.get("type") != "TextEncoderLoader":
                raise ComfyExportError(f"node {node_id} (CombineTextEncoders): ComfyUI can only merge text encoder "
                                       "files loaded next to it", ["CombineTextEncoders"])
            files[f"clip_name{index}"] = source["inputs"].get("text_encoder")
        loader = {2: "DualCLIPLoader", 3: "TripleCLIPLoader"}.get(len(files), "QuadrupleCLIPLoader")
        self.add(node_id, loader, files, node.get("title"))


def _controlnets_on_conditioning(nodes: dict[str, dict]) -> dict[str, dict]:
    """Ours patches the MODEL; ComfyUI's ControlNet sits on the sampler's conditioning. Rewire a
    copy: each chain model -> ApplyControlNet... -> sampler becomes positive/negative -> ControlNet
    chain -> sampler, and the sampler takes the chain's first model."""
    nodes = {k: {**v, "inputs": dict(v.get("inputs", {}))} for k, v in nodes.items()}
    for sampler in nodes.values():
        chain, model = [], sampler["inputs"].get("model")
        while isinstance(model, dict) and nodes.get(model["from"][0], {}).get("type") == "ApplyControlNet":
            chain.insert(0, model["from"][0])
            model = nodes[chain[0]]["inputs"].get("model")
        if not chain or "positive" not in sampler["inputs"]:
            continue
        previous = {"positive": sampler["inputs"].get("positive"), "negative": sampler["inputs"].get("negative")}
        for control in chain:
            nodes[control]["inputs"].update({k: v for k, v in previous.items() if v is not None})
            previous = {"positive": {"from": [control, "positive"]}, "negative": {"from": [control, "negative"]}}
        sampler["inputs"].update(model=model, **previous)
    return nodes


SPECIAL = {"SamplerCustom": _Exporter.sampler_custom, "CombineTextEncoders": _Exporter.combine,
           "ConditioningFrameRate": _Exporter.frame_rate, "MathExpression": _Exporter.math_expression,
           "TextEncodeImageEdit": _Exporter.image_edit, "ScaleToSide": _Exporter.scale_to_side}


def export_comfy(workflow: dict) -> dict[str, dict]:
    """The ComfyUI API-format dict for a ditgraph workflow document; ComfyExportError lists what cannot go back."""
    nodes = inline(workflow)["nodes"]  # ComfyUI's API format has no subgraphs
    missing = sorted({n.get("type") for n in nodes.values() if n.get("type") not in REVERSE and n.get("type") not in SPECIAL})
    if missing:
        raise ComfyExportError(f"{len(missing)} node type(s) have no ComfyUI counterpart: {', '.join(map(str, missing))}",
                               missing)
    nodes = _controlnets_on_conditioning(nodes)
    exporter = _Exporter(nodes)
    combined = {link["from"][0] for n in nodes.values() if n.get("type") == "CombineTextEncoders"
                for link in n.get("inputs", {}).values() if isinstance(link, dict)}
    for node_id, node in nodes.items():
        used_elsewhere = any(isinstance(v, dict) and v.get("from", [None])[0] == node_id
                             for other in nodes.values() if other.get("type") != "CombineTextEncoders"
                             for v in other.get("inputs", {}).values())
        if node_id in combined and not used_elsewhere:
            continue  # folded into the Dual/Triple/QuadrupleCLIPLoader
        (SPECIAL.get(node["type"]) or _Exporter.generic)(exporter, node_id, node)
    return exporter.out
