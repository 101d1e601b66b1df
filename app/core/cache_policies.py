"""What the memo cache keeps: selectable policies (``--cache`` on the CLI and server).

| name | spec | keeps |
|---|---|---|
| ``lru`` | ``lru`` or ``lru:8G`` | least-recently-used entries within a RAM budget (the default) |
| ``workflows`` | ``workflows:3`` | the results of the last N workflows run (by name), within the RAM budget |
| ``ram`` | ``ram:0.2`` | entries while at least that fraction of system RAM stays free (LRU out first) |
| ``none`` | ``none`` | nothing between runs (a run still reuses its own values) |

Every policy also honours the cache's VRAM budget (cold GPU entries move to CPU first) and its
versions per node (app.core.memo).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.memo import Entry, MemoCache


class CachePolicy:
    """The byte-bounded LRU; subclasses keep less. Hooks are called under the cache's lock."""

    name = "lru"

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes  # overrides the cache's byte budget when set

    def admit(self, cache: MemoCache, key: str, entry: Entry) -> bool:
        """Whether to store a new entry at all."""
        return True

    def begin_run(self, cache: MemoCache, scope: str) -> None:
        """A run of workflow ``scope`` starts."""

    def after_put(self, cache: MemoCache, protect: str) -> None:
        """Evict more than the byte budget requires (never ``protect``, the entry just stored)."""

    def describe(self) -> str:
        return self.name if self.max_bytes is None else f"{self.name}:{self.max_bytes}"


class KeepWorkflows(CachePolicy):
    """Keep what the last ``count`` workflows (run scopes) used; drop the rest when a new one runs."""

    name = "workflows"

    def __init__(self, count: int = 3, max_bytes: int | None = None):
        super().__init__(max_bytes)
        if count < 1:
            raise ValueError("workflows:N needs N >= 1")
        self.count = count
        self.recent: list[str] = []

    def begin_run(self, cache: MemoCache, scope: str) -> None:
        if scope in self.recent:
            self.recent.remove(scope)
        self.recent.append(scope)
        del self.recent[:-self.count]
        cache.drop_where(lambda entry: entry.scope is not None and entry.scope not in self.recent)

    def describe(self) -> str:
        return f"workflows:{self.count}"


def available_ram_fraction() -> float:
    """Free (available) system memory as a fraction of the total (psutil when installed,
    else Linux's /proc/meminfo)."""
    try:
        import psutil
    except ImportError:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) / int(fields["MemTotal"].split()[0])
    memory = psutil.virtual_memory()
    return memory.available / memory.total


class RamPressure(CachePolicy):
    """Evict least-recently-used entries while less than ``min_free`` of system RAM is available."""

    name = "ram"

    def __init__(self, min_free: float = 0.2, max_bytes: int | None = None,
                 available: Callable[[], float] = available_ram_fraction):
        super().__init__(max_bytes)
        if not 0 < min_free < 1:
            raise ValueError("ram:F needs 0 < F < 1 (the fraction of RAM to keep free)")
        self.min_free, self.available = min_free, available

    def after_put(self, cache: MemoCache, protect: str) -> None:
        while len(cache) > 1 and self.available() < self.min_free:
            if not cache.drop_oldest(protect):
                break

    def describe(self) -> str:
        return f"ram:{self.min_free}"


class NoCache(CachePolicy):
    """Keep nothing between runs."""

    name = "none"

    def admit(self, cache: MemoCache, key: str, entry: Entry) -> bool:
        return False


CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    "lru": CachePolicy, "workflows": KeepWorkflows, "ram": RamPressure, "none": NoCache,
}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5G"``, ``"1000000"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_cache_policy(spec: str | CachePolicy | None) -> CachePolicy:
    """A policy from its spec: ``lru``, ``lru:8G``, ``workflows:3``, ``ram:0.2``, ``none``.
    Raises ValueError with the accepted forms."""
    if isinstance(spec, CachePolicy):
        return spec
    name, _, argument = (spec or "lru").strip().partition(":")
    name = name.lower()
    try:
        if name == "lru":
            return CachePolicy(parse_size(argument) if argument else None)
        if name == "workflows":
            return KeepWorkflows(int(argument) if argument else 3)
        if name == "ram":
            return RamPressure(float(argument) if argument else 0.2)
        if name == "none" and not argument:
            return NoCache()
    except ValueError as exc:
        raise ValueError(f"cache policy {spec!r}: {exc}") from None
    raise ValueError(f"unknown cache policy {spec!r}; use one of: lru[:SIZE], workflows[:N], ram[:FREE_FRACTION], none")
