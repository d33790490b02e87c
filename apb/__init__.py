"""apb-retain: retaining heads for a frozen LLM and APB sequence-parallel sparse prefill."""

from apb.adapter import AdapterConfig, load_heads, save_adapter
from apb.api import load
from apb.chat import chat_inputs
from apb.config import APBConfig
from apb.fusion import compile_layers
from apb.heads import ModelShape, ProjectionCapture, RetainingHeads, build_heads
from apb.hub import push_to_hub
from apb.model import APBModel
from apb.plan import Calibration, CostModel, HostPlan, HostView

__version__ = "0.1.0"

__all__ = ["ModelShape", "ProjectionCapture", "RetainingHeads", "build_heads", "__version__"]
__all__ += ["AdapterConfig", "load_heads", "push_to_hub", "save_adapter"]
__all__ += [
    "APBConfig",
    "APBModel",
    "Calibration",
    "CostModel",
    "HostPlan",
    "HostView",
    "chat_inputs",
    "load",
]
__all__ += ["compile_layers"]
