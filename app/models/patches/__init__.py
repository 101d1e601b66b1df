"""Model patches that ship with ditgraph: LoRA (``lora``), ControlNet residuals (``controlnet``)
and condition-token control (``condition_tokens``).

Each is a :class:`app.models.handles.ModelPatch`: it changes the model only between ``begin_run`` and
``end_run`` of a sampling run, so the memoized base transformer (shared by every handle made
from it) is exactly as it was once a run ends.
"""
