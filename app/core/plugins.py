"""Build the node registry: the node library, installed plugins and extra node modules by name or file."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from app.core.registry import Registry


class PluginError(ValueError):
    """A node module named by --plugin / DITGRAPH_PLUGINS could not be loaded."""


_plugin_modules: dict[str, Any] = {}


def import_plugin(spec: str) -> Any:
    """A dotted module name, or a .py file (imported once per process as ``ditgraph_plugin_<stem>``)."""
    if spec in _plugin_modules:
        return _plugin_modules[spec]
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugin file {spec!r} does not exist")
        name = "ditgraph_plugin_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    _plugin_modules[spec] = module
    return module


def make_registry(plugins: list[str] | None = None) -> Registry:
    """The node library, installed plugins, and extra node modules named by --plugin / DITGRAPH_PLUGINS."""
    registry = Registry()
    registry.load_package("nodes")
    registry.load_plugins()
    specs = [p for p in os.environ.get("DITGRAPH_PLUGINS", "").split(os.pathsep) if p.strip()] + list(plugins or [])
    for spec in specs:
        try:
            registry.add_module(import_plugin(spec.strip()))
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"cannot load node plugin {spec!r}: {type(exc).__name__}: {exc}") from None
    return registry
