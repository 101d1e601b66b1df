"""Fixtures shared by several test modules."""

import pytest
import torch


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
