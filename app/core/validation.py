"""Validation: every problem of a workflow at once, before anything runs.

Unknown types, unknown or missing inputs, bad links, type mismatches, out-of-range values,
files outside their folder, impossible bypasses, cycles (with their path), missing targets
and, as warnings, nodes nothing requests. Each problem names the node and the input.
"""

from __future__ import annotations

from typing import Any

from app.core import paths
from app.core.registry import NodeDef, Registry
from app.core.subgraphs import expand, resolve_targets
from app.core.types import accepts
from app.core.workflow import Connection, Follow, NodeInstance, Problem, Workflow, WorkflowError, output_nodes


def _check_inputs(node_id: str, inst: NodeInstance, nd: NodeDef, workflow: Workflow, registry: Registry,
                  eager: bool = True) -> list[Problem]:
    """Problems of one node's inputs. A node only a lazy input may ask for (``eager`` False) need
    not be runnable now: its missing files are warnings (an error if it is asked for)."""
    problems = []
    for name in inst.inputs:
        if name not in nd.inputs:
            known = ", ".join(nd.inputs) or "none"
            problems.append(Problem(f"{inst.type} has no input {name!r} (its inputs: {known})", node_id, name, "unknown_input"))
    for name, decl in nd.inputs.items():
        value = inst.inputs.get(name)
        if isinstance(value, Connection):
            source = workflow.nodes.get(value.node)
            if source is None:
                problems.append(Problem(f"linked to node {value.node!r}, which does not exist", node_id, name, "bad_link"))
                continue
            source_def = registry.get(source.type)
            if source_def is None:
                continue  # reported on the source node
            out_type = source_def.output_type(value.output)
            if out_type is None:
                outs = ", ".join(o.name for o in source_def.outputs) or "none"
                problems.append(
                    Problem(f"node {value.node} ({source.type}) has no output {value.output!r} (its outputs: {outs})", node_id, name, "bad_link")
                )
            elif not accepts(decl.type, out_type):
                problems.append(
                    Problem(
                        f"type mismatch: expects {decl.type}, linked to {out_type} output {value.output!r} of node {value.node} ({source.type})",
                        node_id,
                        name,
                        "type_mismatch",
                    )
                )
        elif name not in inst.inputs:
            if decl.required and decl.default is None:
                what = f"a link from a {decl.type} output" if not decl.is_widget else "a value"
                problems.append(Problem(f"required input is missing: needs {what}", node_id, name, "missing_input"))
        elif value is None and decl.optional_link:
            continue
        else:
            reason = decl.check_value(value)
            if reason is None and decl.names_file(value) and (refused := _check_file(decl.spec.file, value)):
                reason, missing = refused
                if missing and not eager:  # a path escaping its folder stays an error wherever it is
                    problems.append(Problem(f"{reason} (needed only if a lazy input asks for it)", node_id, name,
                                            "bad_value", "warning"))
                    continue
            if reason:
                problems.append(Problem(reason, node_id, name, "bad_value"))
    return problems


def _check_file(kind: str, value: Any) -> tuple[str, bool] | None:
    """(why the file input is refused, whether only because it is missing yet) or None."""
    try:
        paths.resolve(kind, value)
    except paths.PathRefused as exc:
        return str(exc), isinstance(exc, paths.PathMissing)
    return None


def _check_bypass(node_id: str, inst: NodeInstance, nd: NodeDef) -> list[Problem]:
    problems = []
    for out in nd.outputs:
        linked = [decl for name, decl in nd.inputs.items() if isinstance(inst.inputs.get(name), Connection)]
        if not any(accepts(out.type, decl.type) for decl in linked):
            problems.append(Problem(f"cannot bypass: no linked input can pass through output {out.name!r} ({out.type})", node_id, kind="bypass"))
    return problems


def validate(workflow: Workflow, registry: Registry, targets: list[str] | None = None) -> list[Problem]:
    """Every problem of ``workflow`` at once (errors and warnings); an empty list means runnable.
    Subgraph instances are expanded first, so problems inside one name the inner node (``up/3``)."""
    try:
        flat = expand(workflow)
    except WorkflowError as exc:
        return exc.problems
    return validate_flat(flat, registry, resolve_targets(flat, targets))


def validate_flat(workflow: Workflow, registry: Registry, targets: list[str] | None = None) -> list[Problem]:
    """:func:`validate` for a workflow without subgraph instances."""
    outputs = output_nodes(workflow, registry)
    follow = eager_inputs(registry, workflow)
    eager = workflow.needed(targets if targets is not None else outputs, follow)
    problems = check_nodes(workflow, registry, list(workflow.nodes), eager)
    cycles = workflow.cycles()
    for cycle in cycles:
        path = " -> ".join(cycle + [cycle[0]])
        problems.append(Problem(f"cycle: {path}", cycle[0], kind="cycle"))
    if targets is not None:
        for target in targets:
            if target not in workflow.nodes:
                problems.append(Problem(f"requested output node {target!r} does not exist", target, kind="bad_target"))
    else:
        if not outputs and workflow.nodes:
            problems.append(Problem("nothing to run: the workflow has no output node (e.g. SaveImage or PreviewAny)", kind="no_output"))
        if not cycles:
            needed = eager if follow is None else workflow.needed(outputs)
            for node_id in workflow.nodes:
                nd = registry.get(workflow.nodes[node_id].type)
                if node_id not in needed and nd is not None and nd.extra.get("passive") is not True:
                    problems.append(
                        Problem("nothing requests this node's outputs; it will not run", node_id, kind="unused", severity="warning")
                    )
    return problems


def check_nodes(workflow: Workflow, registry: Registry, node_ids: list[str], eager: set[str] | None = None) -> list[Problem]:
    """The problems of some nodes of ``workflow`` (types, inputs, links, bypass)."""
    problems: list[Problem] = []
    for node_id in node_ids:
        inst = workflow.nodes[node_id]
        nd = registry.get(inst.type)
        if nd is None:
            problems.append(Problem(f"unknown node type {inst.type!r} (is its plugin installed?)", node_id, kind="unknown_type"))
            continue
        problems.extend(_check_inputs(node_id, inst, nd, workflow, registry, eager is None or node_id in eager))
        if inst.bypass:
            problems.extend(_check_bypass(node_id, inst, nd))
        elif nd.check is not None:
            problems.extend(_graph_check(node_id, nd, workflow))
    return problems


def _graph_check(node_id: str, nd: NodeDef, workflow: Workflow) -> list[Problem]:
    """The node's own graph-aware warnings. A check that fails is a bug in the check, not a
    problem of the workflow: it is reported as one warning instead of breaking validation."""
    try:
        found = nd.check(node_id, workflow)
    except Exception as exc:  # noqa: BLE001 - validation must list every problem, never crash
        return [Problem(f"{nd.type}'s check failed ({type(exc).__name__}: {exc})", node_id, kind="check", severity="warning")]
    return [Problem(message, node_id, name, "check", "warning") for message, name in found]


def eager_inputs(registry: Registry, workflow: Workflow) -> Follow | None:
    """A traversal filter (Workflow.needed's ``follow``) that skips lazy inputs; None (follow
    everything) when no node of ``workflow`` has one."""
    lazy = {t: nd.lazy_inputs for t in {inst.type for inst in workflow.nodes.values()}
            if (nd := registry.get(t)) is not None and nd.lazy_inputs}
    if not lazy:
        return None
    return lambda inst, name: name not in lazy.get(inst.type, ())


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]
