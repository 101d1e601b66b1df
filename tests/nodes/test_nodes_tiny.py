"""Each tiny family factory (tests/fixtures/tiny_models.py) writes a folder our loader recognises."""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_models import FAMILIES, save_family


@pytest.mark.parametrize("family", FAMILIES)
def test_factory_folder_is_detected(family, tmp_path):
    from app.models.families import detect_folder_family

    folder = save_family(family, tmp_path / family)
    assert detect_folder_family(folder) == family
