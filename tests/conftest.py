"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(autouse=True)
def path_overrides_undone():
    """Each test ends with the path overrides it began with. The CLI's --models/--output-dir and
    paths.configure set process-wide overrides; one left behind by an in-process ``main(["run", ...,
    "--output-dir", ...])`` once sent a later test's video to the earlier test's folder. Taken after
    the module fixtures' own overrides, so those stay for the module."""
    from app.core import paths

    saved = dict(paths._overrides)
    yield
    paths._overrides.clear()
    paths._overrides.update(saved)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread; two spin-waiting threads on a busy 2-core box are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def summaries():
    """The summary of every cached sampling run during the test (app/models/accelerators listeners)."""
    from app.models import accelerators

    found: list[dict] = []
    remove = accelerators.add_listener(found.append)
    yield found
    remove()
