"""Node declaration and registration.

A node is one Python function decorated with :func:`node`. Its signature is the single
source of truth: parameter annotations give the sockets and widgets, defaults give widget
defaults, ``Annotated[int, Spec(...)]`` gives ranges, choices and tooltips, the docstring
gives the description. Everything else (validation, the ``/api/nodes`` catalogue, CLI
``--set`` parsing, UI widgets) is derived from the :class:`NodeDef` built here.

    @node(category="sampling", outputs={"latent": LATENT})
    def Sampler(model: MODEL, steps: Annotated[int, Spec(min=1, max=1000)] = 28):
        "Denoise a latent."
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import pkgutil
import re
import traceback
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.core.types import ANY, WIDGET_TYPES, InputDef, ListOf, OutputDef, Spec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ditgraph.nodes"


@dataclass(frozen=True)
class Link:
    """Annotation for a socket input with details: ``image: Link(IMAGE, optional=True)``."""

    type: str
    tooltip: str = ""
    optional: bool = False


@dataclass
class NodeResult:
    """What a node may return instead of bare outputs: outputs plus data for the UI.

    ``ui`` is JSON-serialisable (e.g. saved image paths); it is memoized with the outputs
    so a cached Save node still shows its images.
    """

    outputs: tuple = ()
    ui: dict | None = None


@dataclass
class Expansion:
    """What a node may return instead of outputs: a small graph that computes them.

    ``nodes`` uses the workflow format (ids local to this expansion; ``{"from": ["@in", name]}``
    reads the expanding node's input ``name``); ``outputs`` maps each of the node's output
    names to ``[local_id, output_name]``. The engine runs the nodes under ids
    ``<node id>/<local id>``, memoized like any other node.
    """

    nodes: dict
    outputs: dict[str, list]


@dataclass
class NodeDef:
    """Everything the engine knows about one node type, derived from its function."""

    type: str
    function: Callable[..., Any]
    inputs: dict[str, InputDef]
    outputs: list[OutputDef]
    category: str = "misc"
    display_name: str = ""
    description: str = ""
    version: int = 1
    output_node: bool = False
    module: str = ""
    extra: dict = field(default_factory=dict)
    always_run: bool = False  # not idempotent (clocks, cameras, fetches): never a cache hit
    # For nodes with lazy inputs: needs(**values) -> names of the lazy inputs still to evaluate.
    # It gets the non-lazy inputs and the lazy ones evaluated so far (the others are absent);
    # it is called again after each evaluation until it asks for nothing new.
    needs: Callable[..., list[str]] | None = None
    # Graph-aware validation: check(node_id, workflow) -> [(message, input name or None)], what
    # the node can tell before anything runs from its neighbours' constants (e.g. cfg on a
    # guidance-distilled checkpoint). Reported as warnings: a check reads files, never loads.
    check: Callable[..., list[tuple[str, str | None]]] | None = None
    # estimate(values, memory, device) -> dict with "lines": what the node would need, told
    # before running from its constant inputs (file inputs as resolved paths), the engine's
    # memory settings and device; shown by ``ditgraph explain`` and the editor (a loader's VRAM plan).
    estimate: Callable[[dict, dict, Any], dict] | None = None

    def __post_init__(self) -> None:
        # looked up for every node of every run: computed once
        self.lazy_inputs = frozenset(name for name, decl in self.inputs.items() if decl.spec.lazy)
        self.whole_list_inputs = frozenset(name for name, decl in self.inputs.items() if decl.spec.whole_list)
        self.has_list_outputs = any(out.is_list for out in self.outputs)
        self.output_index = {out.name: i for i, out in enumerate(self.outputs)}
        self.is_async = inspect.iscoroutinefunction(self.function)

    def output_type(self, name: str) -> str | None:
        for out in self.outputs:
            if out.name == name:
                return out.type
        return None

    def catalogue_entry(self) -> dict:
        """The JSON description served at /api/nodes and printed by ``ditgraph nodes``."""
        inputs = []
        for inp in self.inputs.values():
            entry: dict[str, Any] = {
                "name": inp.name,
                "type": inp.type,
                "required": inp.required,
                "widget": inp.is_widget,
            }
            if inp.default is not None:
                entry["default"] = inp.default
            spec = inp.spec
            for key in ("min", "max", "step", "tooltip", "file"):
                value = getattr(spec, key)
                if value not in (None, ""):
                    entry[key] = value
            if spec.multiline:
                entry["multiline"] = True
            for flag in ("seed", "lazy", "whole_list", "snap"):
                if getattr(spec, flag):
                    entry[flag] = True
            choices = _safe_choices(spec)
            if choices is not None:
                entry["choices"] = choices
            inputs.append(entry)
        return {
            "type": self.type,
            "display_name": self.display_name,
            "category": self.category,
            "description": self.description,
            "version": self.version,
            "output_node": self.output_node,
            "always_run": self.always_run,
            **({"estimates": True} if self.estimate is not None else {}),
            "inputs": inputs,
            "outputs": [{"name": o.name, "type": o.type, "tooltip": o.tooltip, "list": o.is_list} for o in self.outputs],
        }


def _safe_choices(spec: Spec) -> list | None:
    try:
        return spec.choice_list()
    except Exception as exc:  # a failing choice source must not break the catalogue
        log.warning("choice list failed: %s", exc)
        return []


def _display_name(type_name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", type_name).replace("_", " ")


def _input_from_parameter(param: inspect.Parameter, hint: Any) -> InputDef:
    has_default = param.default is not inspect.Parameter.empty
    default = param.default if has_default else None
    spec = Spec()
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        for extra in extras:
            if isinstance(extra, Spec):
                spec = extra
        hint = base
    if isinstance(hint, Link):
        return InputDef(
            param.name,
            hint.type,
            Spec(tooltip=hint.tooltip),
            default,
            required=not (hint.optional or has_default),
            optional_link=hint.optional or has_default,
        )
    if isinstance(hint, str):  # a socket type such as MODEL or "IMAGE|MASK"
        return InputDef(param.name, hint, spec, default, required=not has_default, optional_link=has_default)
    if hint in WIDGET_TYPES:
        return InputDef(param.name, WIDGET_TYPES[hint], spec, default, required=not has_default)
    if hint is Any or hint is inspect.Parameter.empty:
        return InputDef(param.name, ANY, spec, default, required=not has_default, optional_link=has_default)
    raise TypeError(f"parameter {param.name!r}: unsupported annotation {hint!r}")


def node(
    *,
    outputs: Mapping[str, str] | None = None,
    category: str = "misc",
    display_name: str | None = None,
    version: int = 1,
    output_node: bool = False,
    name: str | None = None,
    always_run: bool = False,
    needs: Callable[..., list[str]] | None = None,
    check: Callable[..., list[tuple[str, str | None]]] | None = None,
    estimate: Callable[[dict, dict, Any], dict] | None = None,
    **extra: Any,
) -> Callable[[Callable], Callable]:
    """Declare a node. The function's name is its type unless ``name`` is given.

    ``outputs`` maps output names to socket types, in order. The function returns one value
    (one output), a tuple (several, in order), a dict keyed by output name, or a NodeResult.
    Bump ``version`` when the node's behaviour changes so memoized results are not reused.
    ``always_run`` marks a node that is not idempotent (it is never a cache hit); ``needs``
    decides which ``Spec(lazy=True)`` inputs to evaluate (default: every connected one);
    ``check(node_id, workflow)`` adds validation warnings that need the graph around the node.
    ``estimate`` tells before running what the node would need (see NodeDef.estimate). The
    function may be ``async def`` (run on the engine's event loop, concurrently with other
    nodes) and may return an :class:`Expansion` (a small graph computing its outputs).
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function, eval_str=True)
        # eval_str, not typing.get_type_hints: socket annotations are plain strings ("MODEL")
        # and Link objects, which typing would reject as forward references.
        inputs = {p.name: _input_from_parameter(p, p.annotation) for p in signature.parameters.values()}
        type_name = name or function.__name__
        function.__ditgraph_node__ = NodeDef(  # type: ignore[attr-defined]
            type=type_name,
            function=function,
            inputs=inputs,
            outputs=[OutputDef(k, v.type, is_list=True) if isinstance(v, ListOf) else OutputDef(k, v)
                     for k, v in (outputs or {}).items()],
            category=category,
            display_name=display_name or _display_name(type_name),
            description=inspect.cleandoc(function.__doc__ or ""),
            version=version,
            output_node=output_node,
            module=function.__module__,
            extra=extra,
            always_run=always_run,
            needs=needs,
            check=check,
            estimate=estimate,
        )
        return function

    return decorate


@dataclass
class LoadError:
    """A node module or plugin that failed to load: reported, never fatal."""

    source: str
    message: str
    detail: str = ""


class Registry:
    """The node types known to one engine."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeDef] = {}
        self.load_errors: list[LoadError] = []

    def add(self, definition: NodeDef | Callable) -> NodeDef:
        nd = getattr(definition, "__ditgraph_node__", definition)
        if not isinstance(nd, NodeDef):
            raise TypeError(f"{definition!r} is not a node (decorate it with @node)")
        if nd.type in self.nodes and self.nodes[nd.type].function is not nd.function:
            raise ValueError(f"node type {nd.type!r} is already registered by {self.nodes[nd.type].module}")
        self.nodes[nd.type] = nd
        return nd

    def add_module(self, module: Any) -> int:
        """Register every @node function defined in ``module``; returns how many."""
        count = 0
        for value in vars(module).values():
            nd = getattr(value, "__ditgraph_node__", None)
            if isinstance(nd, NodeDef) and nd.module == module.__name__:
                self.add(nd)
                count += 1
        return count

    def get(self, type_name: str) -> NodeDef | None:
        return self.nodes.get(type_name)

    def _guarded(self, source: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as exc:
            error = LoadError(source, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            self.load_errors.append(error)
            log.warning("skipped node source %s: %s", source, error.message)

    def load_package(self, package_name: str = "nodes") -> None:
        """Import every module of a node package; a module that fails is reported and skipped."""
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            qualified = f"{package_name}.{info.name}"
            self._guarded(qualified, lambda q=qualified: self.add_module(importlib.import_module(q)))

    def load_plugins(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load third-party node packages from the ``ditgraph.nodes`` entry-point group.

        An entry point names a module (all its @node functions register) or a callable
        taking the registry.
        """
        for entry_point in importlib.metadata.entry_points(group=group):

            def load(ep=entry_point) -> None:
                target = ep.load()
                if inspect.ismodule(target):
                    self.add_module(target)
                elif callable(target):
                    target(self)
                else:
                    raise TypeError(f"entry point {ep.value} is neither a module nor a callable")

            self._guarded(f"plugin {entry_point.name} ({entry_point.value})", load)

    def catalogue(self) -> list[dict]:
        return [nd.catalogue_entry() for nd in sorted(self.nodes.values(), key=lambda n: (n.category, n.type))]


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry: the built-in node library plus installed plugins."""
    global _default
    if _default is None:
        registry = Registry()
        registry.load_package("nodes")
        registry.load_plugins()
        _default = registry
    return _default
