"""Run events sent from inside a sampling run (phases, warnings) to the node's run context."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def emit(event: dict) -> None:
    """Send ``event`` to the current run's listeners; outside a run (or on failure), nothing.
    Reporting must never fail a run."""
    try:
        from app.core.context import current

        ctx = current()
        ctx.emit({"run_id": ctx.run_id, "node": ctx.node_id, **event})
    except Exception as exc:
        log.debug("event not sent: %s", exc)


def warn(message: str, source: str = "") -> None:
    """A warning the user sees: logged and sent as ``{"type": "warning", "message": ...}``."""
    log.warning("%s%s", f"{source}: " if source else "", message)
    emit({"type": "warning", "source": source, "message": message})
