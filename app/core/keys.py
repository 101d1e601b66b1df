"""Cache keys: a content hash of everything that determines a node's outputs.

A node's key hashes its type, version, constant inputs, the keys of the upstream outputs it
reads, the fingerprints of the files it names and the engine salt (device type). The key
is computed before the node runs, so the same function serves the executor, ``explain``
and the Ray dispatcher (which routes a run to the worker already holding its keys).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core import paths
from app.core.registry import NodeDef
from app.core.types import FLOAT


def canonical(value: Any) -> str:
    """One JSON text per value (sorted keys, no spaces): what is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)


def engine_salt(device_type: str) -> str:
    """What an engine adds to every key: results on one device type are not reused on another."""
    return canonical({"device": device_type})


@dataclass(frozen=True)
class NodeKey:
    """A node's cache key, the parts it hashes (for explanations), its constant arguments and
    the real paths of the files it names (passed to the node instead of the relative names)."""

    key: str
    parts: dict
    constants: dict
    files: dict[str, Path]


def node_key(
    nd: NodeDef,
    inputs: Mapping[str, Any],
    upstream: Mapping[str, str],
    salt: str,
    bypass: bool = False,
    nonce: str | None = None,
) -> NodeKey:
    """The key of one node instance of type ``nd``.

    ``inputs`` are the instance's inputs (constants, or connections with ``node`` and
    ``output`` attributes); ``upstream`` maps each connected node id to its key. ``nonce``
    (a run id, for ``always_run`` nodes) makes the key unique to one run. Raises
    :class:`paths.PathRefused` when a named file is missing or outside its folder.
    """
    constants: dict[str, Any] = {}
    links: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    resolved: dict[str, Path] = {}
    for name, decl in nd.inputs.items():
        value = inputs.get(name, decl.default)
        source = getattr(value, "node", None)
        if source is not None and hasattr(value, "output"):
            links[name] = f"{upstream[source]}:{value.output}"
            continue
        if decl.type == FLOAT and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # JSON from a browser turns 2.0 into 2: one value, one key
        constants[name] = value
        if decl.names_file(value):
            resolved[name] = paths.resolve(decl.spec.file, value)
            fingerprints[name] = paths.fingerprint(resolved[name])
    parts = {"type": nd.type, "version": nd.version, "constants": constants, "links": links,
             "files": fingerprints, "salt": salt, "bypass": bypass}
    if nonce is not None:
        parts["nonce"] = nonce
    key = hashlib.blake2b(canonical(parts).encode(), digest_size=16).hexdigest()
    return NodeKey(key, parts, constants, resolved)


def diff_reason(old: dict | None, new: dict) -> str:
    """Say in words which part of a node's key changed since its last run."""
    if new.get("nonce") is not None:
        return "always runs (declared always_run: not idempotent)"
    if old is None:
        return "first run of this node"
    if old["type"] != new["type"] or old["version"] != new["version"]:
        return f"node type/version changed ({old['type']} v{old['version']} -> {new['type']} v{new['version']})"
    changes = []
    for part in ("constants", "links", "files"):
        before_part, after_part = old[part], new[part]
        if before_part == after_part:
            continue  # the common case: compare whole dicts before looking at names
        for name in sorted(set(before_part) | set(after_part)):
            before, after = before_part.get(name), after_part.get(name)
            if before == after:
                continue
            if part == "constants":
                changes.append(f"input {name!r} changed {_short(before)} -> {_short(after)}")
            else:
                changes.append(f"upstream of {name!r} changed" if part == "links" else f"file of {name!r} changed on disk")
    if old["salt"] != new["salt"]:
        changes.append("engine settings (device/dtype) changed")
    return "; ".join(changes) or "same key as before, but the cached result was evicted"


def _short(value: Any) -> str:
    text = canonical(value)
    return text if len(text) <= 40 else text[:37] + "..."
