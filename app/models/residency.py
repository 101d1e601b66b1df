"""Devices, dtypes and residency: where module weights live between uses.

``Resident`` is the mixin of every value wrapping modules (MODEL, VAE, TEXT_ENCODER):
``offload()`` to CPU, ``ensure_device()`` back, ``release()`` after each use per policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(choice: str, default: torch.device | None = None) -> torch.device:
    """"auto" -> the engine's device (CUDA when there is one), else the named device."""
    if choice in ("auto", "", None):
        if default is not None:
            return torch.device(default)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} requested but CUDA is not available on this machine")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere."""
    if choice in ("auto", "", None):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[choice]
    except KeyError:
        raise ValueError(f"unknown dtype {choice!r}; expected auto, {', '.join(DTYPES)}") from None


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device (when 0 is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


GROUP_OFFLOAD_FLAG = "_ditgraph_group_offload"
# One copy stream per device for every streamed model, instead of diffusers' stream per
# apply_group_offloading call. The CUDA caching allocator keeps a pool per stream: what one
# model's copies freed (a streamed T5's blocks after encoding) can then serve the next model's
# copies (the transformer's blocks while sampling) instead of staying reserved beside them,
# which under a cap makes the allocator synchronise and free every cached segment to grow the
# other pool (issue 17: fp8 Flux-dev under 12 GiB streamed without overlap, reserved at the
# cap). Off until a GPU A/B (bench/gpu_memory.py --share-copy-stream) says it helps.
SHARE_COPY_STREAM = False
_COPY_STREAMS: dict[tuple[str, int], object] = {}


def is_group_offloaded(module: torch.nn.Module) -> bool:
    """Weights managed block by block by diffusers' group-offloading hooks (never moved whole)."""
    return bool(getattr(module, GROUP_OFFLOAD_FLAG, False))


def apply_block_offload(module: torch.nn.Module, device: torch.device, keep: int = 0) -> torch.nn.Module:
    """Keep ``module``'s blocks in RAM and stream them to ``device`` one block at a time
    (diffusers group offloading: on CUDA the next block is copied from pinned RAM on a side
    stream while the current one computes). ``keep`` blocks stay on ``device`` (partial
    residency: as many as the VRAM budget allows), the ones the planner counted
    (app/models/memory.py kept_blocks: spread among the streamed ones). Parts outside the block stack
    (embedders, final layers, a text encoder's embedding) live on ``device`` too."""
    from diffusers.hooks import HookRegistry, apply_group_offloading

    from app.models.memory import kept_blocks

    root = stream_root(module)
    stack = stack_of(root)
    blocks = [stack[i] for i in kept_blocks(len(stack), keep)]
    kept = _beside(module, root) + blocks
    module.to("cpu")
    stream = device.type == "cuda"
    with _hidden(root, blocks), _anchored(root):  # diffusers pins, hooks and prefetches only the streamed blocks
        apply_group_offloading(root, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                               record_stream=stream, non_blocking=stream)
    if stream and SHARE_COPY_STREAM:
        share_stream(root, copy_stream(device))
    rest = HookRegistry.check_if_exists_or_initialize(root).get_hook("group_offloading")
    if rest is not None:
        # diffusers would move the root's other children in and out on every call, synchronously
        # through pageable RAM (their parameters, listed again in ``parameters``: a device-to-host
        # copy and a sync per forward, ~20 tensors per step for Flux); they stay instead. Only
        # the root's own tensors, outside any child, still move with the hook (PixArt's, Sana's
        # and Wan's ``scale_shift_table``: a few KiB). The hook stays: it starts the prefetch of
        # the first streamed block.
        kept += [m for m in rest.group.modules if not isinstance(m, _PrefetchAnchor)]
        rest.group.modules = []
        own = {id(t) for t in _own_tensors(root)}
        rest.group.parameters = [p for p in rest.group.parameters if id(p) in own]
        rest.group.buffers = [b for b in rest.group.buffers if id(b) in own]
    for part in kept:
        part.to(device)
    setattr(module, GROUP_OFFLOAD_FLAG, True)
    module._ditgraph_kept = kept  # what stays on the device between runs (moved by offload/ensure_device)
    return module


def copy_stream(device: torch.device):
    """The copy stream shared by the streamed models on ``device`` (:data:`SHARE_COPY_STREAM`)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (device.type, index)
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = torch.cuda.Stream(torch.device(device.type, index))
    return _COPY_STREAMS[key]


def share_stream(root: torch.nn.Module, stream) -> int:
    """Point every streamed group under ``root`` at ``stream`` (diffusers reads ``group.stream``
    at each onload and sync; the stream it was given only at application); returns how many."""
    groups = {id(hook.group): hook.group for m in root.modules()
              if (hook := _group_hook(m)) is not None and hook.group.stream is not None}
    for group in groups.values():
        group.stream = stream
    return len(groups)


def _group_hook(module: torch.nn.Module):
    registry = getattr(module, "_diffusers_hook", None)  # no registry made for modules without one
    return registry.get_hook("group_offloading") if registry is not None else None


@contextlib.contextmanager
def _hidden(root: torch.nn.Module, blocks: list[torch.nn.Module]) -> Iterator[None]:
    """Take ``blocks`` out of ``root``'s block lists for a moment. Group offloading applied then
    never sees them: no pinned RAM copy (the whole kept share of the model otherwise) and no
    place in the prefetch chain that diffusers traces on the first CUDA run (a kept block whose
    offload hook is removed afterwards keeps its tracker there and breaks that trace)."""
    hidden = {id(b) for b in blocks}
    lists = {name: child for name, child in root.named_children()
             if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))}
    try:
        for name, child in lists.items():
            shown = [b for b in child if id(b) not in hidden]
            if len(shown) < len(child):
                setattr(root, name, torch.nn.Sequential(*shown) if isinstance(child, torch.nn.Sequential)
                        else torch.nn.ModuleList(shown))
        yield
    finally:
        for name, child in lists.items():
            setattr(root, name, child)


def _own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters and buffers outside its children."""
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


class _PrefetchAnchor(torch.nn.Module):
    """A stand-in child, without weights, for a stream root that has nothing but block lists."""

    def forward(self, *args):  # never called: the root's own forward does not know it
        raise RuntimeError("the prefetch anchor is not a layer")


@contextlib.contextmanager
def _anchored(root: torch.nn.Module) -> Iterator[None]:
    """Give ``root`` a child outside its block lists for a moment, when it has none. diffusers
    builds the prefetch chain (the hook on the root that traces the blocks' order on the first
    run) only for a root with such a child or tensors of its own. Without the chain every
    streamed block loads itself: its copy is queued on the side stream and its layers start on
    the compute stream without waiting for it, reading whatever the new memory held (a CLIP
    encoder's ``layers``, a BERT encoder's ``layer``: issue 17, SD3.5's CLIP-G streamed under
    a 12 GiB cap gave embeddings 33% off, a different image each run)."""
    if _own_tensors(root) or not all(isinstance(c, (torch.nn.ModuleList, torch.nn.Sequential)) for c in root.children()):
        yield
        return
    root.add_module("_ditgraph_prefetch_anchor", _PrefetchAnchor())
    try:
        yield
    finally:
        del root._modules["_ditgraph_prefetch_anchor"]


def _beside(module: torch.nn.Module, root: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules outside ``root`` (a text encoder's embeddings and final norm), by the path to it."""
    if root is module:
        return []
    path = {id(m) for name, m in module.named_modules() if root in set(m.modules())}
    return [child for m in module.modules() if id(m) in path and m is not root
            for child in m.children() if id(child) not in path]


def stack_of(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks group offloading streams: children of ``module``'s own ModuleLists, in order."""
    return [block for child in module.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
            for block in child]


def stream_root(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose own ModuleLists hold the blocks: the module itself (diffusers
    transformers) or the first submodule that has them (T5's ``encoder``, CLIP's ``text_model.encoder``)."""
    for sub in module.modules():
        if len(stack_of(sub)) > 1:
            return sub
    return module


class Resident:
    """Mixin for values wrapping modules: ``offload()`` to CPU, ``ensure_device()`` back.

    ``residency`` "resident" keeps the weights on ``device``; "offload" keeps them in RAM and
    moves them to ``device`` only while they run (``release()`` after each use); "blocks"
    streams them block by block (:func:`apply_block_offload`).
    """

    device: torch.device
    residency: str

    def _modules(self) -> list[torch.nn.Module]:
        return []

    def release(self) -> None:
        """Called after each use: offloads when the residency policy says so."""
        if getattr(self, "residency", "resident") == "offload":
            self.offload()

    def offload(self) -> None:
        for m in self._modules():
            if is_group_offloaded(m):
                for part in getattr(m, "_ditgraph_kept", ()):
                    part.to("cpu")
            elif module_device(m).type != "cpu":
                m.to("cpu")

    def ensure_device(self) -> None:
        """Move the weights (a streamed model: its kept parts) back to ``device``. Under a VRAM
        budget the run's ``make_room`` first moves colder cached values off the GPU: a model
        used again after another workflow's models does not overrun the budget."""
        moving = [part for m in self._modules()
                  for part in (getattr(m, "_ditgraph_kept", ()) if is_group_offloaded(m) else (m,))
                  if not same_device(module_device(part), self.device)]
        if moving and torch.device(self.device).type != "cpu":
            _make_room(sum(t.numel() * t.element_size() for part in moving for t in part.parameters()))
        for part in moving:
            part.to(self.device)


def _make_room(nbytes: int) -> None:
    """Ask the run's memo cache to spill least recently used GPU values until ``nbytes`` fit
    (only when a VRAM budget is set: app/core/context.py's ``memory``)."""
    from app.core.context import current

    memory = current().memory
    if memory.get("vram") and memory.get("make_room") is not None:
        memory["make_room"](nbytes)
