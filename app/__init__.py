"""ditgraph: a node-based workflow engine and editor for diffusion transformers."""

__version__ = "0.1.0"
