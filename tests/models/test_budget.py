"""The VRAM budget wired through the engine and the loader: settings, placement, LRU room-making."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from app.core.context import RunContext, reset_current, set_current
from app.core.executor import Engine
from app.core.memo import MemoCache
from app.models.budget import memory_settings
from app.models.memory import GIB, default_work, kept_blocks, need_of
from nodes import loaders
from tests.fixtures.memo_values import FakeGpuValue
from tests.fixtures.tiny_models import save_family


def test_memory_settings_from_flags():
    assert memory_settings("12GB", "1GB") == {"vram": 12 * GIB, "reserve": GIB}
    assert memory_settings(None, None) == {}
    with pytest.raises(ValueError, match="reserve-vram"):
        memory_settings("4GB", "4GB")


def test_engine_gives_memo_and_nodes_the_budget():
    engine = Engine(device="cpu", memory=memory_settings("8GB", "1GB"))
    assert engine.cache.max_device_bytes == 7 * GIB
    assert engine.memory["vram"] == 8 * GIB and callable(engine.memory["make_room"])


def test_make_room_spills_least_recently_used_first():
    cache = MemoCache(max_bytes=100 * GIB, max_device_bytes=10 * GIB)
    old, new = FakeGpuValue(4 * GIB), FakeGpuValue(4 * GIB)
    cache.put("old", (old,))
    cache.put("new", (new,))
    assert cache.make_room(GIB) == []
    assert cache.make_room(4 * GIB) == ["old"]
    assert not old.on_gpu and new.on_gpu and cache.device_bytes == 4 * GIB


def test_make_room_returns_the_allocators_cache_after_moving_cuda_values(monkeypatch):
    """The switch test's OOM: Flux left the GPU but its segments stayed reserved, and SD3.5-large
    was placed into their fragments. make_room empties the CUDA cache once, after its moves,
    and only when something left a CUDA device."""
    from app.core import memo

    emptied = []
    monkeypatch.setattr(memo.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memo.torch.cuda, "empty_cache", lambda: emptied.append(1))
    cache = MemoCache(max_bytes=100 * GIB, max_device_bytes=10 * GIB)
    for key in ("a", "b", "c"):
        cache.put(key, (FakeGpuValue(4 * GIB),))  # the third put spills "a" through _enforce
    emptied.clear()
    assert cache.make_room(GIB) == [] and emptied == []  # nothing moved: the cache stays
    assert cache.make_room(3 * GIB) == ["b"] and emptied == [1]
    assert cache.make_room(10 * GIB) == ["c"] and emptied == [1, 1]
    assert cache.make_room(10 * GIB) == [] and emptied == [1, 1]  # fits: nothing to move


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    return save_family("sd3", tmp_path_factory.mktemp("budget") / "tiny-sd3")


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    """A tiny Flux transformer folder with six blocks (enough to keep some and stream the rest)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("budget") / "tiny-flux"
    FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=[4, 4, 8]).save_pretrained(folder)
    return folder


def _load_under(folder: Path, memory: dict, offload: str = "auto"):
    events = []
    ctx = RunContext("r", "n", "CheckpointLoader", torch.device("cpu"), Path("."), {}, events.append,
                     threading.Event(), memory=memory)
    token = set_current(ctx)
    try:
        return loaders.CheckpointLoader(str(folder), dtype="fp32", device="cpu", offload=offload), events
    finally:
        reset_current(token)


def _predict(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model.transformer(hidden_states=torch.randn(1, 16, 4, generator=gen),
                                 encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
                                 pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                                 img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)).sample


def test_loader_keeps_what_fits_and_streams_the_rest(flux):
    (resident, _, _), events = _load_under(flux, {})
    need = need_of(resident.transformer, "transformer")
    assert need.blocks == 6
    work = events[-1]["plan"]["models"][0]["work_bytes"]  # activations at the family's default size
    assert work > default_work(need)  # 4096 image + 512 text tokens: more than the size-blind floor
    # the rest + two blocks kept + two in flight + working memory: spread, a double and a single kept
    # (blocks 0 and 3) and a double and a single in flight (1 and 2), as many bytes as the first four
    assert need.sizes[0] > need.sizes[2] == need.sizes[-1]
    vram = need.rest_bytes + sum(need.sizes[:4]) + work
    (model, _, _), events = _load_under(flux, {"vram": vram})
    placement = events[-1]["plan"]["models"][0]
    assert events[-1]["type"] == "memory_plan" and placement["mode"] == "stream"
    assert placement["resident_blocks"] == 2 and model.residency == "resident"  # kept blocks stay between uses
    blocks = [*model.transformer.transformer_blocks, *model.transformer.single_transformer_blocks]
    hooked = [getattr(b, "_diffusers_hook", None) is not None and b._diffusers_hook.get_hook("group_offloading")
              is not None for b in blocks]
    kept = kept_blocks(6, 2)
    assert kept == (0, 3)  # spread: each streamed pair's copies overlap a kept block's compute
    assert hooked == [i not in kept for i in range(6)]
    assert torch.allclose(_predict(model), _predict(resident), atol=1e-5)
    model.offload()  # a memo spill moves the kept blocks off too; ensure_device brings them back
    model.ensure_device()
    assert torch.allclose(_predict(model), _predict(resident), atol=1e-5)
    (everything, _, _), events = _load_under(flux, {"vram": vram + 2 * need.block_bytes + need.rest_bytes})
    assert events[-1]["plan"]["models"][0]["mode"] == "resident" and everything.residency == "resident"


def test_loader_refuses_a_budget_nothing_fits_in(sd3):
    with pytest.raises(loaders.LoadFailed, match=r"budget of 0\.00 GiB"):
        _load_under(sd3, {"vram": 1024})


def test_legacy_offload_names_still_load(sd3):
    (model, _, _), events = _load_under(sd3, {}, offload="cpu")
    assert model.residency == "offload"
    assert {p["mode"] for p in events[-1]["plan"]["models"]} == {"model"}


def test_decode_tiles_when_the_budget_leaves_too_little():
    from app.models.budget import decode_needs_tiles

    cpu = torch.device("cpu")
    assert not decode_needs_tiles(1024, 1024, cpu, {})  # no budget on CPU: never
    assert decode_needs_tiles(1024, 1024, cpu, memory_settings("2GB"))
    assert not decode_needs_tiles(1024, 1024, cpu, memory_settings("24GB"))
    assert decode_needs_tiles(1024, 1024, cpu, memory_settings("24GB", "22GB"))  # the reserve counts


@pytest.mark.parametrize("which", ["sd3", "shapes-dit"])
def test_plan_from_configs_alone_matches_the_loaders_plan(which, sd3):
    """Same parts, names, sizes and modes as the loader's plan, without reading a weight."""
    from app.models.budget import describe_checkpoint

    folder = sd3 if which == "sd3" else Path(loaders.__file__).parents[1] / "models" / "shapes-dit"
    memory = {"vram": GIB} if which == "sd3" else {"vram": 360 << 20}  # shapes-dit in fp32: streamed, moved whole
    (model, _, _), events = _load_under(folder, memory)
    loaded = {p["name"]: p for p in events[-1]["plan"]["models"]}
    estimated = describe_checkpoint(folder, "auto", "auto", torch.float32, torch.device("cpu"), memory)
    assert [p["name"] for p in estimated["models"]] == list(loaded)
    for p in estimated["models"]:
        for field in ("weight_bytes", "mode", "resident_blocks", "peak_bytes"):
            assert p[field] == loaded[p["name"]][field], (p["name"], field)
    assert estimated["lines"] == events[-1]["plan"]["lines"]
    if which == "shapes-dit":
        assert [p["mode"] for p in estimated["models"]] == ["stream", "blocks", "model"]


def test_working_memory_follows_the_run_size_and_the_family(flux, sd3):
    """Activations from the family's latent tokens at the run's size; Flux-dev's distilled
    guidance runs one batch, SD3's CFG two; the VAE decode whole and tiled."""
    from diffusers import FluxTransformer2DModel

    from app.models.budget import needs_of, run_size, work_of

    transformer = FluxTransformer2DModel.from_pretrained(flux)
    assert run_size({}, "flux") == (1024, 1024, 1) and run_size({"size": (768, 512)}, None) == (768, 512, 1)
    at_1024, _ = work_of(transformer, "transformer", "flux", (1024, 1024, 1))
    at_2048, _ = work_of(transformer, "transformer", "flux", (2048, 2048, 1))
    assert at_2048 > at_1024
    guided, _ = work_of(transformer, "transformer", "sd3", (1024, 1024, 1))
    assert guided > at_1024  # same tokens and width, two batches
    (model, encoders, vae), _ = _load_under(sd3, {})
    whole, tiled = work_of(vae.vae, "vae", "sd3", (1024, 1024, 1), element_size=4)  # fp32 weights
    assert tiled < whole
    needs = {n.name: n for n in needs_of({"t5": (encoders.slots["t5"][1], "text_encoder"), "vae": (vae.vae, "vae")},
                                         "sd3", {"size": (2048, 2048)})}
    assert needs["vae"].work > whole and needs["vae"].tiled_work == tiled


def test_text_encoder_loader_plans_alone(tmp_path, monkeypatch):
    """A separately loaded text encoder over its share of the budget is off the GPU between uses
    (the share is zeroed: a tiny T5 is far below a quarter of any budget its activations fit)."""
    from app.models import memory
    from tests.fixtures.tiny_models import components

    monkeypatch.setattr(memory, "ENCODER_SHARE", 0.0)
    parts = components("sd3")
    folder = tmp_path / "t5"
    parts["text_encoder_3"].save_pretrained(folder)
    parts["tokenizer_3"].save_pretrained(folder)
    for vram, residency in ((GIB, "offload"), (0, "resident")):
        events = []
        ctx = RunContext("r", "n", "TextEncoderLoader", torch.device("cpu"), Path("."), {}, events.append,
                         threading.Event(), memory={"vram": vram})
        token = set_current(ctx)
        try:
            encoders = loaders.TextEncoderLoader(str(folder), dtype="fp32", device="cpu")
        finally:
            reset_current(token)
        assert encoders.residency == residency and events[-1]["type"] == "memory_plan"
        assert encoders.memory and encoders.memory[0]["name"] == "t5"


def test_the_run_size_reaches_the_loaders_plan():
    """The largest constant width × height (× frames) of a workflow sizes the loaders' working
    memory: a node running under the engine sees it in ``current().memory["size"]``."""
    from app.core.context import current
    from app.core.registry import Registry, node
    from app.core.types import LATENT
    from app.core.workflow import Workflow

    seen = []

    @node(category="test", outputs={"latent": LATENT}, name="SizedThing")
    def sized_thing(width: int = 64, height: int = 64, frames: int = 1):
        seen.append(current().memory.get("size"))
        return None

    registry = Registry()
    registry.add(sized_thing)
    engine = Engine(registry=registry, device="cpu", memory=memory_settings("8GB"))
    nodes = {"a": {"type": "SizedThing", "inputs": {"width": 1024, "height": 768}},
             "b": {"type": "SizedThing", "inputs": {"width": 832, "height": 480, "frames": 33}}}
    workflow = {"format": "ditgraph/workflow", "version": 1, "nodes": nodes, "meta": {"name": "sized"}}
    assert Workflow.from_dict(workflow).output_size() == (480, 832, 33)  # the most pixels × frames
    engine.run(workflow, targets=["a", "b"]).raise_for_status()
    assert seen == [(480, 832, 33)] * 2
    assert Workflow.from_dict({**workflow, "nodes": {"c": {"type": "SizedThing", "inputs": {}}}}).output_size() is None


def test_a_model_moved_back_makes_room_first():
    """A model used again after a switch asks the memo cache for room before its weights return
    (the switch test's third stage); without a budget nothing is asked."""
    from diffusers import AutoencoderKL

    from app.models.handles import VAEHandle

    def tiny_vae():
        return AutoencoderKL(block_out_channels=[8], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                             down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])

    weight_bytes = sum(p.numel() * p.element_size() for p in tiny_vae().parameters())
    asked = []
    for memory, expected in (({"vram": GIB, "make_room": asked.append}, [weight_bytes]), ({"make_room": asked.append}, [])):
        asked.clear()
        vae = VAEHandle(tiny_vae(), torch.device("meta"), torch.float32)  # a device that is not the CPU
        ctx = RunContext("r", "n", "VAEDecode", torch.device("cpu"), Path("."), {}, lambda e: None, threading.Event(),
                         memory=memory)
        token = set_current(ctx)
        try:
            vae.ensure_device()
            vae.ensure_device()  # already there: nothing moves, nothing asked
        finally:
            reset_current(token)
        assert asked == expected
