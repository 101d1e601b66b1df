"""Qwen-Image-Edit and Edit-Plus (2509/2511): our decomposed edit workflow vs diffusers' own
QwenImageEditPipeline / QwenImageEditPlusPipeline, relative L2 <= 1e-4 on the decoded image.

Graph: CheckpointLoader -> LoadImage(s) -> TextEncodeImageEdit (positive and negative, each with
the images and the VAE, mode "auto": the checkpoint's) -> EmptyLatent -> Sampler -> VAEDecode.
The pipelines get the same PNGs, prompts and noise and compute their own schedule (Qwen-Image's
real scheduler config: dynamic shift to 8192 tokens and shift_terminal 0.02). Both sides resize
the input images to about 1024² pixels (and Edit-Plus also to 384² for the vision tower); the
tests shrink those areas on both sides, so the tiny models see small images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from app.core.registry import default_registry
from app.core.validation import errors
from app.core.workflow import Workflow
from app.models.families import qwen_image
from app.models.sampling import make_noise
from tests.fixtures.new_families import save_qwen_edit, tiny_components
from tests.fixtures.parity import PROMPT, SEED, SIZE, STEPS, rel_l2

CFG = 4.0
NEGATIVE = "blurry"
AREAS = {"vae": 64 * 64, "vl": 32 * 32}  # instead of 1024² and 384²
INPUTS = {"a.png": (48, 64), "b.png": (64, 40)}  # height, width: two aspect ratios

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Models and input folders, and the reference-image areas shrunk in ours and in diffusers'."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus
    from PIL import Image

    inputs = tmp_path / "input"
    inputs.mkdir()
    pixels = torch.Generator().manual_seed(3)
    for name, (h, w) in INPUTS.items():
        Image.fromarray((torch.rand(h, w, 3, generator=pixels) * 255).byte().numpy()).save(inputs / name)
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    monkeypatch.setitem(paths._overrides, "inputs", inputs)
    monkeypatch.setattr(qwen_image, "VAE_AREA", AREAS["vae"])
    monkeypatch.setattr(qwen_image, "VL_AREA", AREAS["vl"])
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", AREAS["vae"])
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", AREAS["vl"])
    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(AREAS["vae"], ratio))
    return tmp_path


def edit_graph(images: list[str]) -> dict:
    nodes = {"ckpt": {"type": "CheckpointLoader", "inputs": {"checkpoint": "tiny-edit"}},
             "empty": {"type": "EmptyLatent", "inputs": {"model": {"from": ["ckpt", "model"]},
                                                         "vae": {"from": ["ckpt", "vae"]}, "width": SIZE, "height": SIZE}},
             "sample": {"type": "Sampler", "inputs": {
                 "model": {"from": ["ckpt", "model"]}, "positive": {"from": ["pos", "conditioning"]},
                 "negative": {"from": ["neg", "conditioning"]}, "latent": {"from": ["empty", "latent"]}, "seed": SEED,
                 "steps": STEPS, "cfg": CFG, "sampler": "euler", "scheduler": "auto"}},
             "decode": {"type": "VAEDecode", "inputs": {"vae": {"from": ["ckpt", "vae"]},
                                                        "latent": {"from": ["sample", "latent"]}}}}
    sockets = ("image", "image2", "image3")
    for index, name in enumerate(images):
        nodes[f"load{index}"] = {"type": "LoadImage", "inputs": {"image": name}}
    for node_id, text in (("pos", PROMPT), ("neg", NEGATIVE)):
        inputs = {"text_encoder": {"from": ["ckpt", "text_encoder"]}, "text": text, "vae": {"from": ["ckpt", "vae"]}}
        inputs.update({sockets[i]: {"from": [f"load{i}", "image"]} for i in range(len(images))})
        nodes[node_id] = {"type": "TextEncodeImageEdit", "inputs": inputs}
    return {"format": "ditgraph/workflow", "version": 1, "nodes": nodes}


def run_pipeline(folder, pipeline: str, images: list, noise: torch.Tensor) -> torch.Tensor:
    import diffusers
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    processor = qwen_image._processor_class()(  # transformers' processor (ours only skips the video-class check)
        image_processor=Qwen2VLImageProcessor.from_pretrained(folder / "processor"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "processor"))
    pipe = getattr(diffusers, pipeline).from_pretrained(folder, processor=processor, torch_dtype=torch.float32,
                                                        local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe._pack_latents(noise[:, :, 0], *noise[:, :, 0].shape)
    with torch.no_grad():
        out = pipe(image=images, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=CFG, height=SIZE, width=SIZE,
                   num_inference_steps=STEPS, latents=latents, output_type="pt").images
    return out.permute(0, 2, 3, 1).float()


@pytest.mark.parametrize(("pipeline", "names", "zero_cond_t"),
                         [("QwenImageEditPipeline", ["a.png"], False),
                          ("QwenImageEditPlusPipeline", ["a.png", "b.png"], False),
                          ("QwenImageEditPlusPipeline", ["b.png"], True)],
                         ids=["edit", "edit-plus-2509", "edit-plus-2511"])
def test_edit_workflow_matches_the_edit_pipeline(setup, pipeline, names, zero_cond_t):
    from PIL import Image

    folder = save_qwen_edit(setup / "models" / "checkpoints" / "tiny-edit", pipeline, zero_cond_t=zero_cond_t)
    engine = Engine(device="cpu", output_dir=setup / "out")
    result = engine.run(edit_graph(names), targets=["decode", "ckpt", "empty", "pos"]).raise_for_status()
    model, latent = result.output("ckpt", 0), result.output("empty").samples
    assert model.pipeline == pipeline
    assert len(result.output("pos").extras["reference_latents"]) == len(names)
    pictures = [Image.open(setup / "input" / name).convert("RGB") for name in names]
    reference = run_pipeline(folder, pipeline, pictures[0] if len(names) == 1 else pictures,
                             make_noise(tuple(latent.shape), SEED))
    image = result.output("decode")
    error = rel_l2(image, reference)
    print(f"{pipeline}{' (zero_cond_t)' if zero_cond_t else ''}: relative L2 vs diffusers = {error:.2e}")
    assert image.shape == reference.shape and math.isfinite(error) and error <= 1e-4, f"relative L2 {error:.3e}"
    without = edit_graph(names)  # the reference tokens matter: without the VAE latents the image differs
    for node_id in ("pos", "neg"):
        del without["nodes"][node_id]["inputs"]["vae"]
    plain = engine.run(without, targets=["decode"]).raise_for_status().output("decode")
    assert rel_l2(plain, reference) > 2e-4


GRAPH = Path(__file__).resolve().parents[2] / "graphs" / "qwen-image-edit.json"


def test_shipped_edit_graph_runs_on_a_tiny_edit_model(setup):
    save_qwen_edit(setup / "models" / "checkpoints" / "tiny-edit", "QwenImageEditPlusPipeline")
    (setup / "input" / "a.png").rename(setup / "input" / "example.png")
    document = json.loads(GRAPH.read_text())
    nodes = document["nodes"]
    nodes["1"]["inputs"]["checkpoint"] = "tiny-edit"
    nodes["5"]["inputs"]["megapixels"] = 0.01  # the output size (about 1 megapixel in the shipped graph)
    nodes["7"]["inputs"]["steps"] = 2
    result = Engine(device="cpu", output_dir=setup / "out").run(document, targets=["9", "8"]).raise_for_status()
    assert result.ui["9"]["images"][0]["filename"] == "qwen-image-edit_00001.png"
    assert tuple(result.output("8").shape) == (1, 96, 128, 3)  # the input's aspect ratio, sides multiples of 32


def test_shipped_edit_graph_names_its_model_when_absent(tmp_path, monkeypatch):
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    document = json.loads(GRAPH.read_text())
    problems = errors(Engine(registry=default_registry(), device="cpu").validate(Workflow.from_dict(document)))
    assert any("Qwen-Image-Edit-2509" in str(p) for p in problems), problems


def test_reference_latents_add_up_and_each_model_takes_what_it_can():
    from app.models.handles import ModelHandle
    from app.models.latents import Latent
    from nodes.text import Conditioning, ReferenceLatent
    from tests.fixtures.tiny_models import components

    qwen = Conditioning(torch.zeros(1, 3, 32), family="qwen-image")
    two = ReferenceLatent(ReferenceLatent(qwen, Latent(torch.zeros(1, 4, 1, 4, 4))), Latent(torch.ones(1, 4, 1, 6, 4)))
    assert [r.shape[-2] for r in two.extras["reference_latents"]] == [4, 6]
    with pytest.raises(ValueError, match="take no reference image"):
        ReferenceLatent(Conditioning(torch.zeros(1, 3, 32), family="pixart"), Latent(torch.zeros(1, 4, 4, 4)))
    flux = ModelHandle(components("flux")["transformer"], "flux")
    kontext = Conditioning(torch.zeros(1, 3, 32), torch.zeros(1, 32), family="flux",
                           extras={"reference_latents": (torch.zeros(1, 16, 4, 4),) * 2})
    with pytest.raises(ValueError, match="one reference image"):
        flux.predict(torch.zeros(1, 16, 4, 4), 0.5, kontext)
    pos, neg = (Conditioning(torch.zeros(1, 3, 32), torch.zeros(1, 32), family="flux",
                             extras={"reference_latents": (torch.full((1, 4, 4, 4), float(i)),)}) for i in range(2))
    assert len(flux.predict_many(torch.zeros(1, 4, 4, 4), 0.5, [pos, neg])) == 2  # not batched, no tensor comparison
    odd = torch.zeros(1, 4, 1, 5, 4)  # an image side that is no multiple of 16
    model = ModelHandle(tiny_components("qwen-image")["transformer"], "qwen-image")
    with pytest.raises(ValueError, match="even h and w"):
        model.predict(torch.zeros(1, 4, 1, 4, 4), 0.5, Conditioning(torch.zeros(1, 3, 32), extras={"reference_latents": (odd,)}))


def test_cache_accelerators_work_on_edit_conditionings():
    """Every cache method with reference tokens and 2511's zero_cond_t (its doubled timestep
    embedding): "never skip" gives the uncached latents exactly, aggressive settings stay finite."""
    from diffusers import QwenImageTransformer2DModel

    from app.models import accelerators as hooks
    from app.models.handles import ModelHandle
    from app.models.latents import Latent
    from app.models.sampling import compute_sigmas, sample
    from nodes.text import Conditioning
    from tests.fixtures.cache_models import METHODS

    config = {**tiny_components("qwen-image", layers=3)["transformer"].config, "zero_cond_t": True}
    handle = ModelHandle(QwenImageTransformer2DModel.from_config(config).eval(), "qwen-image",
                         scheduler_config={"shift": 3.0})
    g = torch.Generator().manual_seed(1)
    references = (torch.randn(1, 4, 1, 6, 4, generator=g),)
    pos, neg = (Conditioning(torch.randn(1, 7, 32, generator=g), family="qwen-image",
                             extras={"reference_latents": references}) for _ in range(2))
    latent, sigmas = Latent(torch.zeros(1, 4, 1, 8, 8)), compute_sigmas(handle, "auto", 4)

    def run(model):
        return sample(model, latent, pos, neg, sigmas, 3, 4.0, sampler_name="euler", progress=lambda *a: None).samples

    reference = run(handle)
    for method, (never, aggressive) in METHODS.items():
        assert torch.equal(run(handle.with_patch(hooks.CachePatch(never))), reference), method
        assert torch.isfinite(run(handle.with_patch(hooks.CachePatch(aggressive)))).all(), method
