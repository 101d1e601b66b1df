"""Socket types and input specs: what a node's sockets carry and which links are legal.

A socket type is a name (``MODEL``, ``LATENT``, ...). An input may accept a union written
``"IMAGE|MASK"`` or anything (``"*"``). Widget values (ints, floats, strings, booleans) are
sockets too, so a primitive node can drive any widget of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ANY = "*"

# The data types the node library passes around. Patching nodes return the type they take
# (a MODEL patched by a LoRA is still a MODEL), so no "PATCHED_MODEL" type exists.
MODEL = "MODEL"  # a diffusion transformer with its patches (app.models.handles.ModelHandle)
TEXT_ENCODER = "TEXT_ENCODER"
VAE = "VAE"
CONDITIONING = "CONDITIONING"
LATENT = "LATENT"
IMAGE = "IMAGE"  # float tensor (B, H, W, C) in [0, 1]
VIDEO = "VIDEO"  # app.core.media.Video: frames (F, H, W, C) float in [0, 1] plus fps
MASK = "MASK"  # float tensor (B, H, W) in [0, 1]
CONTROL = "CONTROL"
LORA = "LORA"
SIGMAS = "SIGMAS"
NOISE = "NOISE"

# Widget value types; a widget input also accepts a link of its own type.
INT = "INT"
FLOAT = "FLOAT"
STRING = "STRING"
BOOLEAN = "BOOLEAN"

WIDGET_TYPES = {int: INT, float: FLOAT, str: STRING, bool: BOOLEAN}


def type_members(socket_type: str) -> frozenset[str]:
    """The names in a union type: ``"IMAGE|MASK"`` -> {"IMAGE", "MASK"}."""
    return frozenset(part.strip() for part in socket_type.split("|"))


def accepts(input_type: str, output_type: str) -> bool:
    """Can an output of ``output_type`` feed an input declared as ``input_type``?

    Any-typed inputs and outputs (reroutes, primitives) match everything; a union matches
    each of its members; an INT output may feed a FLOAT input (widening, never narrowing).
    """
    if input_type == ANY or output_type == ANY:
        return True
    wanted = type_members(input_type)
    offered = type_members(output_type)
    if offered <= wanted:
        return True
    return offered == {INT} and FLOAT in wanted


@dataclass(frozen=True)
class Spec:
    """How one input is presented and checked: the single source for widgets and validation.

    ``choices`` may be a callable (evaluated when the catalogue is built, e.g. the files in
    the models folder). ``file`` names a models-folder kind ("checkpoints", "loras", ...):
    the value is a path relative to that folder, confined to it, and fingerprinted so a
    changed file on disk re-runs the node. ``seed`` marks a seed widget (UI: randomize/fixed).
    """

    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    multiline: bool = False
    seed: bool = False
    snap: bool = False  # the value must be min + a multiple of step (validation rejects others)
    file: str | None = None
    tooltip: str = ""
    # An input whose value the engine must not hash as-is (e.g. a file picked by the user)
    hidden: bool = False
    # Evaluated only when the node asks for it (its ``needs`` function): an unneeded branch never runs
    lazy: bool = False
    # Receives a whole list (engine list semantics) instead of the node being mapped over it
    whole_list: bool = False

    def choice_list(self) -> list[Any] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


@dataclass
class InputDef:
    """One declared input of a node (derived from the node function's signature)."""

    name: str
    type: str
    spec: Spec = field(default_factory=Spec)
    default: Any = None
    required: bool = True
    optional_link: bool = False  # a socket that may stay unconnected (value None)

    @property
    def is_widget(self) -> bool:
        return self.type in (INT, FLOAT, STRING, BOOLEAN)

    def names_file(self, value: Any) -> bool:
        """Whether ``value`` names a file to resolve, confine and fingerprint: a file input's
        value, unless it is empty where the default is empty (an optional file left unset)."""
        return bool(self.spec.file) and value is not None and not (value == "" and self.default == "")

    def check_value(self, value: Any) -> str | None:
        """Return why a constant ``value`` is unacceptable for this input, or None."""
        if not self.is_widget:
            if self.type == ANY:
                return None
            return f"expects a link from a {self.type} output, got a constant"
        if self.type == BOOLEAN:
            if not isinstance(value, bool):
                return f"expects true/false, got {value!r}"
        elif self.type == INT:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"expects an integer, got {value!r}"
        elif self.type == FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"expects a number, got {value!r}"
            if value != value:
                return "expects a number, got NaN"
        elif self.type == STRING and not isinstance(value, str):
            return f"expects a string, got {value!r}"
        spec = self.spec
        if spec.min is not None and value < spec.min:
            return f"value {value!r} is below the minimum {spec.min!r}"
        if spec.max is not None and value > spec.max:
            return f"value {value!r} is above the maximum {spec.max!r}"
        if spec.snap and spec.step and (value - (spec.min or 0)) % spec.step:
            if (spec.min or 0) % spec.step == 0:
                return f"value {value!r} is not a multiple of {spec.step}"
            return f"value {value!r} must be {spec.min or 0} plus a multiple of {spec.step}"
        choices = spec.choice_list()
        if choices is not None and spec.file is None and value not in choices:
            shown = ", ".join(map(repr, choices[:12])) + (" ..." if len(choices) > 12 else "")
            return f"value {value!r} is not one of the choices: {shown}"
        return None


@dataclass
class OutputDef:
    name: str
    type: str
    tooltip: str = ""
    is_list: bool = False  # the node returns a Python list here; consumers are mapped over it


@dataclass(frozen=True)
class ListOf:
    """An output declaration ``outputs={"seed": ListOf(INT)}``: a list of values, each a ``type``.

    A consumer whose input is not declared ``Spec(whole_list=True)`` runs once per element."""

    type: str
