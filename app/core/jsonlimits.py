"""The one JSON parser for untrusted input (HTTP bodies, workflow files, batch lines, PNG text).

Limits hold at parse time, so nothing deeper or larger than the limits is ever stored: a
document nested hundreds of levels would otherwise be accepted, stored, and then break every
later read of it (recursion in serialisers, validators and the browser).
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64  # a workflow needs ~8 (nodes > id > inputs > name > link > list); meta/layout get room


class JSONRefused(ValueError):
    """Input that is not JSON, too large or too deeply nested. ``too_large`` marks a size refusal (413);
    ``decode_error`` is the JSONDecodeError when the text simply is not JSON."""

    def __init__(self, message: str, too_large: bool = False, decode_error: json.JSONDecodeError | None = None):
        super().__init__(message)
        self.too_large = too_large
        self.decode_error = decode_error


def parse(data: str | bytes, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a size and a nesting cap; JSONRefused (a ValueError) otherwise."""
    size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise JSONRefused(f"JSON of {size} bytes is over the {max_bytes}-byte limit", too_large=True)
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONRefused(f"JSON nested deeper than {max_depth} levels is refused") from None
    except json.JSONDecodeError as exc:
        raise JSONRefused(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", decode_error=exc) from None
    except UnicodeDecodeError as exc:
        raise JSONRefused(f"not valid JSON: not UTF-8 text ({exc.reason})") from None
    if depth_exceeds(value, max_depth):
        raise JSONRefused(f"JSON nested deeper than {max_depth} levels is refused")
    return value


def depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether lists/objects nest more than ``max_depth`` levels (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
