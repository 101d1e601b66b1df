"""The memo cache: node outputs by content key, bounded in RAM bytes, GPU entries under a budget,
and a bounded number of versions per node.

Entries are kept in least-recently-used order across all workflows, so switching between
workflows keeps both sets of results while they fit. Sizes are measured by tensor storage
(each storage counted once, however many views share it; wrapper tensor subclasses such as
quantized weights by their inner tensors; a module that declares :data:`SHARES_STORAGE_WITH`
only by what its base does not hold). Each memory has its own budget: when accelerator bytes
exceed the VRAM budget, the coldest accelerator entries are moved to CPU; when the bytes in RAM
exceed the RAM budget (by default a fraction of this machine's RAM), the coldest entries are
dropped. So a model resident on the GPU never competes with results in RAM.

Versions: each node of each workflow (a *slot*: run scope and node id, or list element) keeps
at most ``versions`` results; storing one more drops its oldest unless another slot still uses
it. A workflow re-run with a new seed each time thus holds a bounded set of results, however
many runs it makes; without this the cache grows with the run count until the byte budget,
which on a large machine is never (the soak benchmark, bench/soak.py).
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch

from app.core.cache_policies import CachePolicy, parse_cache_policy

_SCALARS = frozenset({int, float, bool, str, bytes, type(None)})
# a module carrying this attribute (a weakref to another module, or the module) is a view on
# that module's weights (a compiled copy): only its own storages count, the shared ones are
# the base's entry's to count
SHARES_STORAGE_WITH = "_ditgraph_shares_storage_with"


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind ``tensor``: itself, or a wrapper subclass's inner tensors
    (``__tensor_flatten__``: torchao's quantized weights have no storage of their own)."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [t for name in names for t in _inner_tensors(getattr(tensor, name))]
    return [tensor]


def _storage_key(tensor: torch.Tensor) -> int:
    storage = tensor.untyped_storage()
    try:
        return storage.data_ptr() or id(storage)
    except RuntimeError:  # a storage-less tensor subclass without __tensor_flatten__
        return id(tensor)


def _shared_base(module: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(module, SHARES_STORAGE_WITH, None)
    base = base() if callable(base) and not isinstance(base, torch.nn.Module) else base
    return base if isinstance(base, torch.nn.Module) else None


def measure(value: Any) -> dict[str, int]:
    """Bytes held by ``value`` per device type ("cpu", "cuda", ...), storages counted once."""
    totals: dict[str, int] = {}
    seen: set[int] = set()

    def add_tensor(tensor: torch.Tensor, shared: frozenset[int] = frozenset()) -> None:
        for inner in _inner_tensors(tensor):
            key = _storage_key(inner)
            if key in seen or key in shared:
                continue
            seen.add(key)
            device = inner.device.type
            totals[device] = totals.get(device, 0) + inner.untyped_storage().nbytes()

    def walk(item: Any, depth: int) -> None:
        if type(item) in _SCALARS:  # the common small outputs (ints, strings): no bookkeeping
            totals["cpu"] = totals.get("cpu", 0) + sys.getsizeof(item)
            return
        if depth > 8 or id(item) in seen:
            return
        if isinstance(item, torch.Tensor):
            add_tensor(item)
            return
        seen.add(id(item))
        if isinstance(item, torch.nn.Module):
            base = _shared_base(item)
            shared = frozenset(_storage_key(inner) for t in base.state_dict(keep_vars=True).values()
                               for inner in _inner_tensors(t)) if base is not None else frozenset()
            for tensor in item.state_dict(keep_vars=True).values():
                add_tensor(tensor, shared)
            return
        custom = getattr(item, "cache_nbytes", None)
        if callable(custom):
            for device, count in custom().items():
                totals[device] = totals.get(device, 0) + count
            return
        if isinstance(item, (list, tuple, set, frozenset)):
            for child in item:
                walk(child, depth + 1)
        elif isinstance(item, dict):
            for child in item.values():
                walk(child, depth + 1)
        elif is_dataclass(item) and not isinstance(item, type):
            for f in fields(item):
                walk(getattr(item, f.name), depth + 1)
        else:
            totals["cpu"] = totals.get("cpu", 0) + sys.getsizeof(item)

    walk(value, 0)
    return totals


def move_to_cpu(value: Any) -> Any:
    """A copy of ``value`` with its accelerator tensors on CPU (modules are moved in place;
    objects may define ``offload()`` to do it themselves)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, torch.nn.Module):
        return value.to("cpu")
    offload = getattr(value, "offload", None)
    if callable(offload):
        offload()
        return value
    if isinstance(value, tuple):
        return tuple(move_to_cpu(v) for v in value)
    if isinstance(value, list):
        return [move_to_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: move_to_cpu(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        try:
            return replace(value, **{f.name: move_to_cpu(getattr(value, f.name)) for f in fields(value) if f.init})
        except (TypeError, ValueError):
            return value
    return value


@dataclass
class Entry:
    outputs: tuple
    ui: dict | None
    sizes: dict[str, int]
    scope: str | None = None  # the workflow (run scope) that used it last

    def __post_init__(self) -> None:
        self.nbytes = sum(self.sizes.values())
        self.device_bytes = self.nbytes - self.sizes.get("cpu", 0)


Slot = tuple  # (run scope, node id) or (run scope, node id, list element index)


class MemoCache:
    """LRU of node outputs, bounded by ``max_bytes`` in RAM, ``max_device_bytes`` on accelerators
    and ``versions`` results per slot (see the module docstring)."""

    def __init__(self, max_bytes: int | None = None, max_device_bytes: int | None = None,
                 policy: CachePolicy | str | None = None, versions: int = 8, max_slots: int = 20_000):
        self.policy = parse_cache_policy(policy)
        self.max_bytes = self.policy.max_bytes or (max_bytes if max_bytes is not None else default_ram_budget())
        self.scope: str | None = None
        self.max_device_bytes = max_device_bytes if max_device_bytes is not None else default_vram_budget()
        if versions < 1:
            raise ValueError("versions must be >= 1")
        self.versions, self.max_slots = versions, max_slots
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        # slot -> its keys, oldest first; key -> how many slots name it (kept while any does)
        self._slots: OrderedDict[Slot, list[str]] = OrderedDict()
        self._slot_refs: dict[str, int] = {}
        self._lock = threading.RLock()
        # running totals, so a put costs O(1) rather than a pass over every entry
        self.nbytes = 0
        self.device_bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "spills": 0, "superseded": 0}

    @property
    def ram_bytes(self) -> int:
        """Bytes held in RAM (everything not on an accelerator): what ``max_bytes`` bounds."""
        return self.nbytes - self.device_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _store(self, key: str, entry: Entry) -> None:
        old = self._entries.get(key)
        if old is not None:
            self.nbytes -= old.nbytes
            self.device_bytes -= old.device_bytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        self.device_bytes += entry.device_bytes

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        self.device_bytes -= entry.device_bytes

    def get(self, key: str, slot: Slot | None = None) -> Entry | None:
        """The entry under ``key`` (a hit refreshes it, and makes it ``slot``'s newest version)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats["misses"] += 1
                return None
            self._entries.move_to_end(key)
            entry.scope = self.scope
            self.stats["hits"] += 1
            if slot is not None:
                self._version(slot, key)
            return entry

    def peek(self, key: str) -> Entry | None:
        """An entry without counting a hit or refreshing its recency (for explanations)."""
        return self._entries.get(key)

    def put(self, key: str, outputs: tuple, ui: dict | None = None, slot: Slot | None = None) -> bool:
        """Store outputs as ``slot``'s newest version; returns False when the entry alone exceeds
        the RAM budget (or the policy refuses it)."""
        entry = Entry(outputs, ui, measure(outputs), self.scope)
        with self._lock:
            if entry.nbytes - entry.device_bytes > self.max_bytes or not self.policy.admit(self, key, entry):
                return False
            self._store(key, entry)
            self._entries.move_to_end(key)
            if slot is not None:
                self._version(slot, key)
            self._enforce(protect=key)
            self.policy.after_put(self, key)
            return True

    def _version(self, slot: Slot, key: str) -> None:
        """Make ``key`` the newest version of ``slot``; drop the versions past ``versions`` that
        no other slot uses (the slots themselves are bounded too, least recently used out)."""
        keys = self._slots.get(slot)
        if keys is None:
            keys = self._slots[slot] = []
        self._slots.move_to_end(slot)
        if key in keys:
            keys.remove(key)
        else:
            self._slot_refs[key] = self._slot_refs.get(key, 0) + 1
        keys.append(key)
        while len(keys) > self.versions:
            self._release(keys.pop(0), drop=True)
        while len(self._slots) > self.max_slots:  # a forgotten slot's entries stay, under the byte budget
            for old in self._slots.popitem(last=False)[1]:
                self._release(old, drop=False)

    def _release(self, key: str, drop: bool) -> None:
        count = self._slot_refs.get(key, 0) - 1
        if count > 0:
            self._slot_refs[key] = count
            return
        self._slot_refs.pop(key, None)
        if drop and key in self._entries:
            self._drop(key)
            self.stats["superseded"] += 1

    def begin_run(self, scope: str) -> None:
        """A run of workflow ``scope`` starts (entries it uses are tagged with it)."""
        with self._lock:
            self.scope = scope
            self.policy.begin_run(self, scope)

    def drop_where(self, condition) -> int:
        """Drop every entry for which ``condition(entry)`` holds; returns how many."""
        with self._lock:
            doomed = [key for key, entry in self._entries.items() if condition(entry)]
            for key in doomed:
                self._drop(key)
            self.stats["evictions"] += len(doomed)
            return len(doomed)

    def drop_oldest(self, protect: str | None = None) -> bool:
        """Drop the least recently used entry other than ``protect``; False if none."""
        with self._lock:
            for key in self._entries:
                if key != protect:
                    self._drop(key)
                    self.stats["evictions"] += 1
                    return True
            return False

    def _enforce(self, protect: str | None = None) -> None:
        if self.device_bytes > self.max_device_bytes:
            for key in list(self._entries):  # oldest first
                if self.device_bytes <= self.max_device_bytes:
                    break
                if key != protect and self._entries[key].device_bytes:
                    self._spill(key)
        if self.ram_bytes <= self.max_bytes:
            return
        for key in list(self._entries):
            if self.ram_bytes <= self.max_bytes:
                break
            if key != protect:
                self._drop(key)
                self.stats["evictions"] += 1

    def make_room(self, nbytes: int) -> list[str]:
        """Move the coldest GPU entries to CPU until ``nbytes`` more fit the VRAM budget
        (called before loading a model); returns the keys moved. What they held on CUDA goes
        back to the driver (:func:`return_cached_memory`), so the model placed next starts
        from free memory rather than from the cached segments of the one it replaces."""
        moved, devices = [], set()
        with self._lock:
            for key in list(self._entries):
                if self.device_bytes + nbytes <= self.max_device_bytes:
                    break
                if self._entries[key].device_bytes:
                    devices.update(self._entries[key].sizes)
                    self._spill(key)
                    moved.append(key)
        return_cached_memory(devices)
        return moved

    def _spill(self, key: str) -> None:
        entry = self._entries[key]
        outputs = move_to_cpu(entry.outputs)
        self._store(key, Entry(outputs, entry.ui, measure(outputs), entry.scope))
        self.stats["spills"] += 1

    def discard(self, key: str) -> bool:
        """Drop one entry; True if it was there."""
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def spill_all(self) -> None:
        """Move every accelerator entry to CPU (used to recover from out-of-memory)."""
        with self._lock:
            for key in list(self._entries):
                if self._entries[key].device_bytes:
                    self._spill(key)
            self._enforce()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._slots.clear()
            self._slot_refs.clear()
            self.nbytes = self.device_bytes = 0

    def summary(self) -> dict:
        return {"entries": len(self), "bytes": self.nbytes, "ram_bytes": self.ram_bytes,
                "device_bytes": self.device_bytes, "policy": self.policy.describe(), "max_bytes": self.max_bytes,
                "max_device_bytes": self.max_device_bytes, "versions": self.versions, **self.stats}


def return_cached_memory(devices: set[str]) -> None:
    """Release the CUDA caching allocator's free segments when values just left a CUDA device.
    Freed weights otherwise stay reserved by this process, cut to the old model's tensor
    sizes, partly in the pools of its block-streaming side streams (usable only by
    allocations on those streams): under a cap the next model is then placed into fragments
    and runs out of memory with gigabytes reserved but unallocated (issue 17's switch test,
    Flux -> SD3.5-large under 16 GiB)."""
    if "cuda" in devices and torch.cuda.is_available():
        torch.cuda.empty_cache()


RAM_FRACTION = 0.5  # of physical RAM: the default RAM budget (models included, on a CPU device)
FALLBACK_RAM_BUDGET = 8 << 30  # where the machine's RAM cannot be read


def physical_ram() -> int | None:
    """This machine's physical RAM in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_ram_budget() -> int:
    """:data:`RAM_FRACTION` of the physical RAM measured on this machine (8 GiB where unknown)."""
    total = physical_ram()
    return int(total * RAM_FRACTION) if total else FALLBACK_RAM_BUDGET


def default_vram_budget() -> int:
    """80% of the first GPU's memory; 0 without one (nothing to budget)."""
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * 0.8)
    return 0
