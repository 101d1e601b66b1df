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


@pytest.fixture
def late_copies(copy_stream, monkeypatch):
    """The copy stream's semantics on the CPU: a non-blocking copy lands only when the host
    synchronises the stream; until then the new tensor holds NaN (on CUDA: whatever the fresh
    memory held). A block that computes before its copy landed gives NaN."""
    from diffusers.hooks import group_offloading as go

    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def transfer(self, tensor, source, default_stream):
        if self.stream is None or not self.non_blocking:
            tensor.data = source.to(self.onload_device)
            return
        tensor.data = torch.full_like(source, float("nan"))
        pending.append((tensor.data, source))

    def land(self):
        for target, source in pending:
            target.copy_(source)
        pending.clear()

    monkeypatch.setattr(go.ModuleGroup, "_transfer_tensor_to_device", transfer)
    monkeypatch.setattr(torch.cpu.Stream, "synchronize", land, raising=False)
    return pending


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, projection_dim=16,
                                                      num_hidden_layers=4, num_attention_heads=4,
                                                      max_position_embeddings=16)).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=16)).eval()


def _encode(model) -> tuple[torch.Tensor, ...]:
    ids = torch.tensor([[0, 5, 17, 42, 8, 1, 1, 1]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return (*out.hidden_states, out[0])  # SD3 reads the penultimate hidden state and the pooled output


@pytest.mark.parametrize("make", [_clip, _bert], ids=["clip", "bert"])
def test_a_streamed_encoder_waits_for_each_blocks_copy(late_copies, make):
    """Before: an encoder whose block stack's parent holds nothing but the block list (CLIP's
    ``encoder.layers``, BERT's ``encoder.layer``) got no prefetch chain from diffusers; each
    block queued its own copy and computed before it landed (on an H200, SD3.5's CLIP-G under a
    12 GiB cap gave embeddings 33% off, a different image each run)."""
    reference = _encode(make())
    model = apply_block_offload(make(), torch.device("cpu"), keep=1)
    for _ in range(3):  # the first call traces the order, the next ones prefetch along it
        for got, want in zip(_encode(model), reference, strict=True):
            assert torch.allclose(got, want, atol=1e-5)
    assert not late_copies  # every queued copy was waited for
    assert not any(isinstance(m, torch.nn.Module) and type(m).__name__ == "_PrefetchAnchor" for m in model.modules())


def test_streamed_transformer_waits_for_copies_and_keeps_its_other_parts(late_copies):
    """Flux's prefetch chain under late copies, spread kept blocks included. And the parts
    outside the blocks: before, diffusers' root hook also listed their parameters and moved
    them to host RAM after every call and back before the next (through pageable memory, a
    device sync each: 20 tensors per step for Flux-dev on an H200); now it moves nothing."""
    from diffusers.hooks import HookRegistry

    reference = _run(_flux())
    model = apply_block_offload(_flux(), torch.device("cpu"), keep=3)
    for _ in range(3):
        assert torch.allclose(_run(model), reference, atol=1e-5)
    rest = HookRegistry.check_if_exists_or_initialize(model).get_hook("group_offloading").group
    assert rest.modules == [] and rest.parameters == [] and rest.buffers == []
