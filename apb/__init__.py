"""apb-retain: retaining heads for a frozen LLM and APB sequence-parallel sparse prefill."""

from apb.heads import ModelShape, ProjectionCapture, RetainingHeads, build_heads

__version__ = "0.1.0"

__all__ = ["ModelShape", "ProjectionCapture", "RetainingHeads", "build_heads", "__version__"]
