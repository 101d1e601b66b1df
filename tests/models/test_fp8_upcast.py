"""The compiled fp8 upcast (app/models/storage.py ``upcast``, FAST_CAST): run here on CPU through
inductor's C++ backend (the same graph CUDA gets as a Triton kernel), against eager ``.to()``
for every fp8 bit pattern; one graph per dtype pair whatever the shapes and scales; which
tensors take it; a compile that fails falls back to ``.to()`` with one warning."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from app.models import storage
from app.models.storage import ScaledFP8, cast_inline, upcast

FP8S = (torch.float8_e4m3fn, torch.float8_e5m2)
TARGETS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}  # bits as
SCALES = (1.0, 0.5, 3.0, 1e-3, 7.3e-5, 123.456, *torch.rand(12, generator=torch.Generator().manual_seed(0)).tolist())
PATTERNS = {fp8: torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8) for fp8 in FP8S}  # all 256


def graphs(cast) -> int:
    """Graphs dynamo holds for ``cast``'s code (one per distinct guard set)."""
    return len(_debug_get_cache_entry_list(cast.__code__))


@pytest.fixture(scope="module")
def on_cpu():
    """The compiled cast taken on CPU too; every result and graph count made once (CPU compiles are slow)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "FAST_CAST", True)
        patch.setattr(storage, "FAST_CAST_DEVICES", ("cuda", "cpu"))
        patch.setattr(storage, "FAST_CAST_MIN_NUMEL", 2)
        before = graphs(storage._cast), graphs(storage._cast_scaled)
        casts = {(fp8, dtype): upcast(PATTERNS[fp8], dtype) for fp8 in FP8S for dtype in TARGETS}
        scaled = {(fp8, dtype, scale): ScaledFP8(scale, dtype)(PATTERNS[fp8])
                  for fp8 in FP8S for dtype in TARGETS for scale in SCALES}
        added = graphs(storage._cast) - before[0], graphs(storage._cast_scaled) - before[1]
        assert storage.FAST_CAST  # no compile failed
        yield casts, scaled, added


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-identical, except that a NaN only needs to be a NaN of the same sign (payloads differ:
    eager's e4m3fn->float32 gives 0x7ff00000, inductor the canonical 0x7fc00000)."""
    nan = want.isnan()
    bits = lambda t: t.view(TARGETS[t.dtype])  # noqa: E731
    return (got.dtype == want.dtype and torch.equal(got.isnan(), nan) and torch.equal(bits(got)[~nan], bits(want)[~nan])
            and torch.equal(got.signbit()[nan], want.signbit()[nan]))


@pytest.mark.parametrize("dtype", list(TARGETS), ids=str)
@pytest.mark.parametrize("fp8", FP8S, ids=str)
def test_compiled_cast_is_bit_identical_to_eager(on_cpu, fp8, dtype):
    casts, scaled, added = on_cpu
    assert added == (len(FP8S) * len(TARGETS),) * 2  # compiled (not eager), one graph per dtype pair
    want = PATTERNS[fp8].to(dtype)
    assert want.isnan().any() and want.isinf().any() == (fp8 == torch.float8_e5m2)  # the patterns cover them
    assert same_bits(casts[fp8, dtype], want)
    for scale in SCALES:  # ScaledFP8: cast and multiply in one kernel, the scale a graph input
        assert same_bits(scaled[fp8, dtype, scale], PATTERNS[fp8].to(dtype) * scale), scale


def test_shapes_share_one_graph(on_cpu, monkeypatch):
    """Weights, biases and conv kernels of any shape go flattened through one dynamic-shape graph."""
    monkeypatch.setattr(storage, "FAST_CAST_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(storage, "FAST_CAST_MIN_NUMEL", 2)
    gen = torch.Generator().manual_seed(1)
    shapes = [(64, 32), (3072,), (7, 5), (16, 8, 3, 3), (2, 3, 4), (8, 4, 1, 2, 2), (1, 9), (2,)]
    tensors = [torch.randn(shape, generator=gen).to(torch.float8_e4m3fn) for shape in shapes]
    count = graphs(storage._cast)
    for tensor in tensors:
        out = upcast(tensor, torch.bfloat16)
        assert out.shape == tensor.shape and torch.equal(out, tensor.to(torch.bfloat16))
    assert graphs(storage._cast) == count and storage.FAST_CAST


@pytest.fixture
def fast_calls(monkeypatch):
    """The casts that reached the compiled function, with CPU allowed."""
    calls, real = [], storage.compiled_cast

    def counting(cast):
        def call(tensor, *args):
            calls.append((cast.__name__, tuple(tensor.shape)))
            return real(cast)(tensor, *args)
        return call

    monkeypatch.setattr(storage, "compiled_cast", counting)
    monkeypatch.setattr(storage, "FAST_CAST_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(storage, "FAST_CAST_MIN_NUMEL", 2)
    monkeypatch.setattr(storage, "FAST_CAST", True)
    return calls


def test_cast_layers_take_the_compiled_cast(on_cpu, fast_calls, monkeypatch):
    """A cast_inline model's weights and biases go through it; outputs equal the eager cast's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    assert cast_inline(model, torch.float8_e4m3fn, torch.bfloat16) == 2
    x, count = torch.randn(3, 8).to(torch.bfloat16), graphs(storage._cast)
    with torch.no_grad():  # as sampling runs: no graph beyond the one the fixture made with grad on
        fast = model(x)
        assert fast_calls == [("_cast", (128,)), ("_cast", (16,)), ("_cast", (64,)), ("_cast", (4,))]
        assert graphs(storage._cast) == count
        monkeypatch.setattr(storage, "FAST_CAST", False)
        assert torch.equal(fast, model(x)) and len(fast_calls) == 4


def test_what_takes_plain_to(fast_calls, monkeypatch):
    """Not fp8, one element, smaller than FAST_CAST_MIN_NUMEL, not contiguous, a gradient wanted, a
    device it is not on for, or inside a compile: ``.to()``."""
    fp8 = torch.randn(6, 4).to(torch.float8_e4m3fn)
    for tensor in (fp8.to(torch.bfloat16), fp8[:1, :1], fp8.T):
        assert torch.equal(upcast(tensor, torch.float32), tensor.to(torch.float32))
    monkeypatch.setattr(storage, "FAST_CAST_MIN_NUMEL", 25)
    assert torch.equal(upcast(fp8, torch.float32), fp8.to(torch.float32)) and fast_calls == []
    monkeypatch.setattr(storage, "FAST_CAST_MIN_NUMEL", 24)
    assert torch.equal(upcast(fp8, torch.float32), fp8.to(torch.float32)) and fast_calls == [("_cast", (24,))]
    fast_calls.clear()
    trained = torch.nn.Parameter(fp8.clone())
    assert upcast(trained, torch.float32).grad_fn is not None  # as .to() gives it
    monkeypatch.setattr(storage, "FAST_CAST_DEVICES", ("cuda",))
    assert torch.equal(upcast(fp8, torch.float32, 2.0), fp8.to(torch.float32) * 2.0)
    monkeypatch.setattr(storage, "FAST_CAST_DEVICES", ("cuda", "cpu"))
    traced = []

    def backend(graph, inputs):
        traced.append(graph)
        return graph

    def layer(weight):
        return upcast(weight, torch.bfloat16)

    assert torch.equal(torch.compile(layer, backend=backend)(fp8), fp8.to(torch.bfloat16))
    assert fast_calls == [] and len(traced) == 1  # the outer compile traced the plain cast


def test_a_compiled_model_does_not_guard_on_fast_cast(monkeypatch):
    """Inside a compile the cast is the plain one whatever FAST_CAST says, so the traced graph must
    not depend on it: turning it off (a failed cast compile) must not recompile every compiled block."""
    monkeypatch.setattr(storage, "FAST_CAST", True)
    monkeypatch.setattr(storage, "FAST_CAST_MIN_NUMEL", 2)
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    cast_inline(torch.nn.Sequential(model), torch.float8_e4m3fn, torch.bfloat16)

    def forward(x):
        return model(x)

    compiled, x = torch.compile(forward, backend="eager"), torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        want = compiled(x)
        monkeypatch.setattr(storage, "FAST_CAST", False)
        assert torch.equal(compiled(x), want)
    assert len(_debug_get_cache_entry_list(forward.__code__)) == 1


def test_a_failing_compile_falls_back_and_warns_once(monkeypatch, caplog):
    def broken(graph, inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(storage, "compiled_cast", lambda cast: torch.compile(cast, dynamic=True, backend=broken))
    monkeypatch.setattr(storage, "FAST_CAST_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(storage, "FAST_CAST_MIN_NUMEL", 2)
    monkeypatch.setattr(storage, "FAST_CAST", True)
    fp8 = torch.randn(6, 4).to(torch.float8_e5m2)
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        assert torch.equal(upcast(fp8, torch.bfloat16), fp8.to(torch.bfloat16))
        assert torch.equal(upcast(fp8, torch.float16, 0.5), fp8.to(torch.float16) * 0.5)
    assert storage.FAST_CAST is False
    warnings = [r for r in caplog.records if r.name == storage.__name__]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()


def test_the_device_check_counts_bit_patterns_the_compiled_cast_changes(on_cpu, monkeypatch):
    """fast_cast_mismatches (what bench/gpu_memory.py records on the GPU): zeros for the exact
    kernel; a kernel that flushes e4m3's subnormals to zero is caught, pattern by pattern."""
    assert storage.fast_cast_mismatches("cpu") == {"float8_e4m3fn": 0, "float8_e5m2": 0}

    def flushing(cast):
        def call(tensor, dtype):
            out = tensor.to(dtype)
            subnormal = (tensor.view(torch.uint8) & 0x78 == 0) & (tensor.view(torch.uint8) & 0x07 != 0)
            return torch.where(subnormal & (tensor.dtype == torch.float8_e4m3fn), torch.zeros_like(out), out)
        return call

    monkeypatch.setattr(storage, "compiled_cast", flushing)
    assert storage.fast_cast_mismatches("cpu") == {"float8_e4m3fn": 14, "float8_e5m2": 0}  # 7 mantissas × 2 signs
