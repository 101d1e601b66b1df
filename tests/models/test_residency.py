"""Block streaming with partial residency (app/models/residency.py apply_block_offload).

On CUDA diffusers prefetches the next block on a copy stream and traces the order of the
blocks on the first call; the CPU tests run that code path with a stand-in stream (diffusers
refuses ``use_stream`` on a CPU device, so the offloading is applied through its internals).
"""

from __future__ import annotations

import pytest
import torch

from app.models.memory import kept_blocks
from app.models.residency import apply_block_offload, share_stream, stack_of


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).eval()


def _run(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, 4, generator=gen),
                     encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
                     pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                     img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)).sample


@pytest.fixture
def copy_stream(monkeypatch):
    """apply_block_offload as on CUDA (a copy stream, pinned copies, the traced prefetch chain),
    with CPU stand-ins for the stream and for pinning; yields the groups diffusers made."""
    import diffusers.hooks
    from diffusers.hooks import group_offloading as go

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **k: True)
    monkeypatch.setattr(torch.cpu.Stream, "synchronize", lambda self: None, raising=False)
    groups = []
    made = go.ModuleGroup.__init__

    def record(self, *args, **kwargs):
        made(self, *args, **kwargs)
        groups.append(self)

    def streamed(module, onload_device, offload_device, **kwargs):
        config = go.GroupOffloadingConfig(onload_device=torch.device(onload_device),
                                          offload_device=torch.device(offload_device),
                                          offload_type=go.GroupOffloadingType.BLOCK_LEVEL, non_blocking=False,
                                          record_stream=False, low_cpu_mem_usage=False, num_blocks_per_group=1,
                                          stream=torch.cpu.Stream())
        go._apply_group_offloading(module, config)

    monkeypatch.setattr(go.ModuleGroup, "__init__", record)
    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", streamed)
    return groups


def test_kept_blocks_stay_out_of_the_prefetch_chain_and_pinned_ram(copy_stream):
    """Before: the kept blocks' offload hooks were removed after diffusers had put them in its
    traced prefetch order, and the end of the first call failed ('NoneType' has no 'group');
    their pinned copies (the kept share of the model) stayed allocated."""
    reference = _run(_flux())
    model = apply_block_offload(_flux(), torch.device("cpu"), keep=3)
    assert torch.allclose(_run(model), reference, atol=1e-5)  # the first call traces the order
    assert torch.allclose(_run(model), reference, atol=1e-5)  # the second prefetches along it
    blocks, kept = stack_of(model), kept_blocks(6, 3)
    assert kept == (0, 2, 4)  # spread: streamed blocks between kept ones, in both of Flux's block lists
    assert not any(hasattr(blocks[i], "_diffusers_hook") for i in kept)
    pinned = {id(t) for g in copy_stream for t in g.cpu_param_dict}
    assert pinned == {id(p) for i in (1, 3, 5) for p in blocks[i].parameters()}  # only the streamed blocks
    # the parts outside the blocks stay on the device with the kept blocks, not moved per call
    assert all(any(part is m for part in model._ditgraph_kept) for m in (model.x_embedder, model.proj_out))


def test_streamed_models_can_share_one_copy_stream(copy_stream):
    """SHARE_COPY_STREAM: every streamed group of two models points at one stream (on CUDA one
    allocator pool for their copies, not one per model); the results do not change."""
    reference = _run(_flux())
    first, second = (apply_block_offload(_flux(), torch.device("cpu"), keep=keep) for keep in (0, 3))
    shared = torch.cpu.Stream()
    streamed = [g for g in copy_stream if g.stream is not None]
    assert share_stream(first, shared) + share_stream(second, shared) == len(streamed) == 6 + 3
    assert all(g.stream is shared for g in streamed)
    for model in (first, second, first):
        assert torch.allclose(_run(model), reference, atol=1e-5)
