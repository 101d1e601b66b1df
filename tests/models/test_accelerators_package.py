"""The accelerators package: every method registered, tested, and its node built from its dataclass."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from app.core.registry import default_registry
from app.models import accelerators as hooks
from app.models.accelerators.method import SPEC, WIDGET
from tests.fixtures.cache_models import METHODS as TESTED
from tests.fixtures.cache_models import tiny


def test_every_registered_method_has_its_never_skip_and_aggressive_test():
    assert set(hooks.METHODS) == set(TESTED)
    shipped = {"fbc", "teacache", "magcache", "easycache", "taylorseer", "cgtaylor", "deltadit", "fora"}
    assert shipped <= set(hooks.METHODS)


@pytest.mark.parametrize("name", sorted(hooks.METHODS))
def test_node_widgets_are_the_dataclass_settings(name):
    cls = hooks.METHODS[name]
    node = default_registry().get(cls.node_name)
    assert node is not None, f"no node for {name}"
    assert node.display_name == cls.display_name and node.description == inspect.cleandoc(cls.__doc__)
    widgets = {k: v for k, v in node.inputs.items() if k != "model"}
    settings = {f.name: f for f in dataclasses.fields(cls) if SPEC in f.metadata}
    assert set(widgets) == set(settings)
    for field_name, f in settings.items():
        widget_default = f.metadata.get(WIDGET, (None, f.default))[1]
        assert widgets[field_name].default == widget_default
        assert widgets[field_name].spec is f.metadata[SPEC]


def test_methods_refuse_a_start_after_the_end():
    with pytest.raises(ValueError, match="must not exceed"):
        hooks.FORA(start=0.8, end=0.2)


def test_text_widgets_resolve_per_family():
    handle = tiny("shapes-dit").handle
    node = default_registry().get("TeaCache").function
    patch = node(model=handle, threshold=0.3, coefficients="auto", start=0.0, end=1.0, max_skips=0).patches[-1]
    assert patch.method.coefficients == tuple(hooks.teacache_coefficients("shapes-dit")) != (1.0, 0.0)
    assert patch.method.domain > 0
    custom = node(model=handle, threshold=0.3, coefficients="2, 0", start=0.0, end=1.0, max_skips=0).patches[-1]
    assert custom.method.coefficients == (2.0, 0.0) and custom.method.domain == 0.0
    mag = default_registry().get("MagCache").function
    with pytest.raises(ValueError, match="ratios"):
        mag(model=handle, threshold=0.1, ratios="1, x", start=0.2, end=1.0, max_skips=3)
