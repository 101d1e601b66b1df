"""The base of every cache method: common settings, field metadata for widgets, the registry.

A method is one frozen dataclass. Its fields are its settings; each field declared with
:func:`setting` carries the widget's range and tooltip (a :class:`Spec`), so the node in
``nodes/cache.py`` is built from the dataclass and nothing is declared twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from app.core.types import Spec
from app.models.accelerators.runtime import Plan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from app.models.accelerators.runtime import CacheRun, Slot

SPEC = "ditgraph_spec"  # field metadata key: the widget's Spec
WIDGET = "ditgraph_widget"  # field metadata key: (widget type, widget default) when they differ from the field's
COMMON = ("start", "end", "max_skips")  # listed after a method's own widgets

METHODS: dict[str, type[CacheMethod]] = {}


def setting(default: Any, *, tooltip: str, min: float | None = None, max: float | None = None,
            step: float | None = None, widget: tuple[type, Any] | None = None) -> Any:
    """A method setting shown as a node widget. ``widget=(str, "auto")`` when the node takes a
    text the method resolves (see :meth:`CacheMethod.from_widgets`)."""
    metadata: dict[str, Any] = {SPEC: Spec(min=min, max=max, step=step, tooltip=tooltip)}
    if widget is not None:
        metadata[WIDGET] = widget
    return field(default=default, metadata=metadata)


START_TIP = "No skipping before this fraction of the steps."
END_TIP = "No skipping from this fraction of the steps on."
MAX_SKIPS_TIP = "Most steps skipped in a row (0 = no limit)."


@dataclass(frozen=True)
class CacheMethod:
    """Settings common to every method. Subclasses implement :meth:`plan` (and maybe
    :meth:`after_head`); :meth:`store` keeps a computed range's residual."""

    start: float = setting(0.0, min=0.0, max=1.0, step=0.01, tooltip=START_TIP)
    end: float = setting(1.0, min=0.0, max=1.0, step=0.01, tooltip=END_TIP)
    max_skips: int = setting(0, min=0, max=1000, tooltip=MAX_SKIPS_TIP)
    name: ClassVar[str] = "cache"
    node_name: ClassVar[str] = ""  # the node type; empty for methods without a node (calibration)
    display_name: ClassVar[str] = ""
    hooks_attention: ClassVar[bool] = False  # also hook the blocks' attention modules (see attention())

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"start ({self.start}) must not exceed end ({self.end}); both within 0..1")

    @classmethod
    def from_widgets(cls, family: str, **widgets: Any) -> CacheMethod:
        """The method from its node's widget values (a method with text widgets resolves them)."""
        return cls(**widgets)

    def settings(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def plan(self, rt: CacheRun, slot: Slot, block0: nn.Module, args: tuple, kwargs: dict) -> Plan:
        return Plan(track=(0, rt.n))

    def after_head(self, rt: CacheRun, slot: Slot, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        return None

    def store(self, rt: CacheRun, slot: Slot, rng: tuple[int, int], residual: tuple,
              h_entry: torch.Tensor, h_exit: torch.Tensor) -> None:
        slot.residuals[rng] = residual

    def skip(self, rng: tuple[int, int], residual: tuple, label: str = "") -> Plan:
        return Plan(skip=rng, residual=residual, label=label)

    def attention(self, rt: CacheRun, slot: Slot, key: tuple, module: nn.Module, args: tuple, kwargs: dict,
                  forward: Callable) -> tuple[Any, bool]:
        """One attention call (methods with ``hooks_attention``): (its output, whether it was reused)."""
        return forward(*args, **kwargs), False


@dataclass(frozen=True)
class AttentionMethod(CacheMethod):
    """A method that reuses attention outputs inside the blocks (every block still runs): it
    implements :meth:`attention`; the block plan computes everything and records nothing.
    ``start``/``end`` bound where reuse is allowed; its own intervals bound reuse in a row."""

    max_skips: int = 0  # not a widget: the method's intervals bound consecutive reuse
    hooks_attention = True

    def plan(self, rt: CacheRun, slot: Slot, block0: nn.Module, args: tuple, kwargs: dict) -> Plan:
        return Plan()


@dataclass(frozen=True)
class HeadGatedMethod(CacheMethod):
    """A method that decides after block 0 ran (in :meth:`after_head`) whether to skip the rest."""

    def plan(self, rt: CacheRun, slot: Slot, block0: nn.Module, args: tuple, kwargs: dict) -> Plan:
        return Plan(track=(1, rt.n), deferred=True)


def register(cls: type[CacheMethod]) -> type[CacheMethod]:
    """Class decorator: make a method known by its ``name`` (and give it a node)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"cache method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def widget_parameters(cls: type[CacheMethod]) -> list[inspect.Parameter]:
    """The node parameters of a method: its own settings, then start/end/max_skips, each
    ``Annotated[type, Spec]`` with its default, as the registry reads a signature."""
    settings = [f for f in fields(cls) if SPEC in f.metadata]
    ordered = [f for f in settings if f.name not in COMMON] + [f for f in settings if f.name in COMMON]
    params = []
    for f in ordered:
        kind, default = f.metadata.get(WIDGET, (None, f.default))
        if default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a widget setting needs a default")
        kind = kind or type(default)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, f.metadata[SPEC]]))
    return params
