"""Import every ComfyUI workflow of a corpus folder, validate it, and count what happened.

    python bench/comfy_corpus.py CORPUS_DIR [--out bench/results/comfy_corpus.json]

CORPUS_DIR holds JSON workflows and PNG/WEBP/MP4/WebM files with embedded ones (any depth);
assemble it from public official ComfyUI examples and templates (see docs/comfy_import.md),
outside the repository. For each file: accepted (validates, or validates except for model
files this machine does not have), accepted but invalid (other problems), refused (one line,
grouped by reason) or crashed (any other exception: a bug). Accepted workflows are also
exported back to ComfyUI's API format and re-imported: the round trip must give the same nodes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.workflow import Workflow, errors, validate  # noqa: E402
from app.fronts.cli import make_registry  # noqa: E402
from app.fronts.comfy import (  # noqa: E402
    ComfyImportError,
    EmbeddedWorkflowError,
    convert,
    families,  # noqa: E402
    import_file,
    to_api,
)
from app.fronts.comfy.export import ComfyExportError, export_comfy  # noqa: E402
from app.fronts.comfy.metadata import read_embedded_workflow  # noqa: E402
from app.fronts.comfy.regroup import inline  # noqa: E402

SUFFIXES = {".json", ".png", ".webp", ".mp4", ".webm", ".mov", ".mkv", ".flac", ".glb"}
MISSING_FILE = re.compile(r"not found \(looked in")


def reason_of(message: str) -> str:
    """Group refusals: the family, 'unmapped: <types>', or the message without file-specific parts."""
    if " workflow (from " in message and "ditgraph runs" in message:
        return "family: " + message.split(" workflow (from ")[0]
    needs = re.match(r"(.+) workflow needs (.+?) \(node ", message)
    if needs:  # a capability the family lacks (families.NEEDS)
        return f"needs: {needs.group(2)} ({needs.group(1)})"
    if "have no ditgraph equivalent here:" in message:
        return "unmapped node types"
    return re.sub(r"node [^ ]+ ", "node N ", message)[:120]


def family_of(path: Path) -> str:
    try:
        found = read_embedded_workflow(path)
        document = found.get("document") or found.get("workflow") or found.get("prompt")
        return families.summary(to_api(document)[0])
    except (ComfyImportError, EmbeddedWorkflowError, ValueError, TypeError, KeyError, AttributeError):
        return "unknown"


def round_trip(document: dict, registry) -> bool:
    """Export -> import gives the same nodes (types and inputs)."""
    try:
        again = convert(export_comfy(document), registry)
    except (ComfyExportError, ComfyImportError):
        return False
    strip = lambda nodes: {k: {"type": v["type"], "inputs": v["inputs"]} for k, v in nodes.items()}  # noqa: E731
    return strip(again["nodes"]) == strip(inline(document)["nodes"])  # the API format has no subgraphs


def judge(path: Path, registry) -> dict:
    """One file's outcome: status, reason/problems, family, unmapped types, round trip."""
    entry = {"file": path.name, "family": family_of(path)}
    try:
        document = import_file(path, registry, name=path.stem)
    except (ComfyImportError, EmbeddedWorkflowError) as exc:
        return {**entry, "status": "refused", "reason": reason_of(str(exc)), "message": str(exc),
                "unmapped": getattr(exc, "unmapped", [])}
    except Exception as exc:  # noqa: BLE001 - a crash is what this benchmark looks for
        return {**entry, "status": "crash", "message": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=3)}
    problems = errors(validate(Workflow.from_dict(document), registry))
    other = [str(p) for p in problems if not (p.kind == "bad_value" and MISSING_FILE.search(p.message))]
    status = "accepted" if not other else "invalid"
    return {**entry, "status": status, "missing_files": len(problems) - len(other), "problems": other[:10],
            "notes": len(document["meta"].get("import_notes", [])), "round_trip": round_trip(document, registry)}


def summarize(results: list[dict]) -> dict:
    per_family: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        per_family[r["family"]][r["status"]] += 1
    unmapped = Counter(t for r in results for t in r.get("unmapped", []))
    runnable = [r for r in results if families.runnable(r["family"])]
    ok = sum(r["status"] == "accepted" for r in runnable)
    return {
        "files": len(results),
        "counts": dict(Counter(r["status"] for r in results)),
        "refused_by_reason": dict(Counter(r["reason"] for r in results if r["status"] == "refused").most_common()),
        "crashes": [r for r in results if r["status"] == "crash"],
        "per_family": {k: dict(v) for k, v in sorted(per_family.items())},
        "runnable_families": {"files": len(runnable), "accepted": ok,
                              "rate": round(ok / len(runnable), 3) if runnable else None},
        "round_trip": dict(Counter(r["round_trip"] for r in results if "round_trip" in r)),
        "most_wanted_unmapped": dict(unmapped.most_common(40)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "comfy_corpus.json")
    args = parser.parse_args(argv)
    registry = make_registry([])
    files = sorted(p for p in args.corpus.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    results = [judge(path, registry) for path in files]
    report = {"summary": summarize(results), "files": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in report["summary"].items() if k != "crashes"}, indent=1))
    print(f"crashes: {len(report['summary']['crashes'])}; written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
