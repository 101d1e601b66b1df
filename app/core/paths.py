"""Where files live: the models folder (by kind), inputs and outputs, with confinement.

The models folder comes from ``DITGRAPH_MODELS`` (or :func:`configure`), default
``~/ditgraph/models``. Its subfolders are the kinds: checkpoints/, text_encoders/, vae/,
loras/, controlnets/. The repository's bundled ``models/`` folder is a second, read-only
root for checkpoints so shapes-dit works with nothing configured. Every path a workflow
names is resolved with symlinks followed and must stay inside one of its roots.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MODEL_KINDS = ("checkpoints", "text_encoders", "vae", "loras", "controlnets")
REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODELS = REPO_ROOT / "models"

_overrides: dict[str, Path] = {}


class PathRefused(ValueError):
    """A path that is missing, or escapes the folder it must stay in."""


class PathMissing(PathRefused):
    """A well-formed path inside its folder that names nothing (yet)."""


def configure(models: str | os.PathLike | None = None, inputs=None, outputs=None, subgraphs=None) -> None:
    """Set folders for this process (CLI flags); None leaves a setting as it is."""
    for key, value in (("models", models), ("inputs", inputs), ("outputs", outputs), ("subgraphs", subgraphs)):
        if value is not None:
            _overrides[key] = Path(value).expanduser().resolve()


def _folder(key: str, env: str, default: str) -> Path:
    if key in _overrides:
        return _overrides[key]
    return Path(os.environ.get(env) or Path.home() / "ditgraph" / default).expanduser().resolve()


def models_dir() -> Path:
    return _folder("models", "DITGRAPH_MODELS", "models")


def input_dir() -> Path:
    return _folder("inputs", "DITGRAPH_INPUTS", "input")


def output_dir() -> Path:
    return _folder("outputs", "DITGRAPH_OUTPUTS", "output")


def temp_dir() -> Path:
    """Where previews go (PreviewImage, video posters): $DITGRAPH_TEMP or <outputs>/../temp."""
    env = os.environ.get("DITGRAPH_TEMP")
    return Path(env).expanduser().resolve() if env else output_dir().parent / "temp"


def subgraphs_dir() -> Path:
    """The blueprint library: reusable subgraphs saved by name (``<name>.json``), beside the
    models and workflows folders."""
    return _folder("subgraphs", "DITGRAPH_SUBGRAPHS", "subgraphs")


def roots(kind: str) -> list[Path]:
    """Folders searched for a kind, user folder first."""
    if kind == "input":
        return [input_dir()]
    if kind == "output":
        return [output_dir()]
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown file kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    found = [models_dir() / kind]
    if kind == "checkpoints":
        found.append(BUNDLED_MODELS)
    return found


MAX_NAME_BYTES = 255  # one path component, as most file systems allow
MAX_PATH_BYTES = 4096


def confine(root: Path, relative: str) -> Path:
    """Resolve ``relative`` to a file or folder inside ``root`` (never ``root`` itself); PathRefused for
    absolute paths, escapes (../, symlinks), over-long names and anything else the OS would reject."""
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise PathRefused("empty or invalid file name")
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or relative.startswith(("/", "\\")) or ":" in parts[0]:
        raise PathRefused(f"{relative[:300]!r}: name a file inside {root} (absolute paths and '.' are refused)")
    if len(relative.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or any(
            len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in parts):
        raise PathRefused(f"{relative[:80]!r}...: a name over {MAX_NAME_BYTES} bytes (or a path over {MAX_PATH_BYTES})")
    try:
        real_root = root.resolve()
        candidate = (real_root / relative).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, names the OS refuses
        raise PathRefused(f"{relative[:300]!r}: {exc}") from None
    if candidate == real_root:
        raise PathRefused(f"{relative[:300]!r} names the folder {real_root} itself; name a file inside it")
    if real_root not in candidate.parents:
        raise PathRefused(f"{relative[:300]!r} resolves outside {real_root} (../ or a symlink); refused")
    return candidate


def resolve(kind: str, relative: str) -> Path:
    """The real path of a file or folder of ``kind`` named relative to its roots."""
    searched = []
    # adapters bundled with the repository (models/shapes-dit-*) resolve too, without being listed
    bundled = [BUNDLED_MODELS] if kind in ("loras", "controlnets") else []
    for root in roots(kind) + bundled:
        path = confine(root, relative)
        if path.exists():
            return path
        searched.append(str(root))
    raise PathMissing(f"{kind} {relative!r} not found (looked in {', '.join(searched)})")


def list_files(kind: str, suffixes: tuple[str, ...] = (".safetensors",), folders: bool = True) -> list[str]:
    """Names (relative paths) of the models of one kind: files with ``suffixes`` and, when
    ``folders``, diffusers-style folders (those holding a config.json or model_index.json)."""
    names: set[str] = set()
    for root in roots(kind):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            rel = here.relative_to(root)
            if folders and rel != Path(".") and {"config.json", "model_index.json", "ditgraph.json"} & set(filenames):
                names.add(rel.as_posix())
                dirnames.clear()  # a model folder's inner files are not separate models
                continue
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names.update(name for f in filenames if f.endswith(suffixes)
                         and _loadable(root, name := (rel / f).as_posix()))
    return sorted(names)


def _loadable(root: Path, relative: str) -> bool:
    """Whether :func:`resolve` would accept the name (a symlink out of the folder is listed nowhere)."""
    try:
        confine(root, relative)
        return True
    except PathRefused:
        return False


def fingerprint(path: Path) -> str:
    """Cheap identity of a file or folder: names, sizes and mtimes (ns) of its files.

    Changing, replacing or touching a file changes it, so nodes that read files re-run.
    """
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:32]
