"""ModelHandle.predict_many: the conditionings a run's calls get (app/models/handles.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from app.models.handles import PREPARED_PER_RUN, ModelHandle, ModelPatch
from app.models.sampling import sample
from tests.fixtures.cache_models import tiny


class Spy(ModelPatch):
    """Records the text tensors of every transformer call."""

    key = "spy"

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def wrap(self, state, call, forward):
        self.calls.append((call.kwargs["encoder_hidden_states"], call.kwargs["pooled_projections"]))
        return forward(call)


@pytest.mark.parametrize("dtype, cfg", [(torch.float32, 4.0), (torch.bfloat16, 1.0)])
def test_conditionings_are_prepared_once_per_run(dtype, cfg):
    """Every step gets the same device tensors (CFG: the same batched pair; bf16: converted once):
    a per-step copy from host memory would synchronise the GPU at every step."""
    t = tiny("flux")
    transformer = t.handle.transformer if dtype == torch.float32 else copy.deepcopy(t.handle.transformer).to(dtype)
    spy = Spy()
    handle = ModelHandle(transformer, "flux", dtype=dtype, scheduler_config={"shift": 3.0}).with_patch(spy)
    embeds, pooled = t.pos.embeds, t.pos.pooled
    out = sample(handle, t.latent, t.pos, t.neg, t.sigmas, 3, cfg, progress=lambda *a: None).samples
    assert len(spy.calls) == len(t.sigmas) - 1
    first_embeds, first_pooled = spy.calls[0]
    assert first_embeds.dtype == first_pooled.dtype == dtype
    assert first_embeds.shape[0] == (2 if cfg > 1 else 1)
    assert all(e is first_embeds and p is first_pooled for e, p in spy.calls)
    assert t.pos.embeds is embeds and t.pos.pooled is pooled and embeds.dtype == torch.float32  # inputs untouched
    if dtype == torch.float32:
        assert torch.equal(out, t.reference)


def test_a_run_keeps_a_bounded_number_of_prepared_conditionings():
    """Callers that make new conditionings every call (editing) do not grow the run's store."""
    t = tiny("flux")
    latents = torch.zeros(1, t.handle.latent_channels, 8, 8)
    with t.handle.sampling_run(t.sigmas) as run:
        for i in range(PREPARED_PER_RUN + 4):
            t.handle.predict(latents, 0.5, copy.copy(t.pos))
            assert len(run.conds) <= min(i + 1, PREPARED_PER_RUN)
