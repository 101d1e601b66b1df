"""The NiceGUI element that hosts the editor application."""

from __future__ import annotations

from nicegui import ui


class EditorComponent(ui.element, component="editor_component.js"):
    """Mounts ``static/ditgraph/editor.js`` into this element (all editor logic runs in the browser)."""

    def __init__(self, *, static_url: str, version: str, default_workflow: str) -> None:
        super().__init__()
        self._props["staticUrl"] = static_url
        self._props["version"] = version
        self._props["defaultWorkflow"] = default_workflow
