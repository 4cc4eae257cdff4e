"""MiniMaxGPT: hackable MiniMax-01-style language models (hybrid lightning/softmax attention, Mixture-of-Experts).

The public names are imported on first use, so that `import minimax_gpt` (and the `minimax-gpt` command, before it
knows what to do) does not wait for torch: a Ctrl-C during that import then ends like any other interruption.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minimax_gpt.models.cache import ModelCache
    from minimax_gpt.config import MiniMaxConfig
    from minimax_gpt.models.model import CausalLMOutput, EnhancedMiniMaxGPT

_HOME = {"CausalLMOutput": "minimax_gpt.models.model", "EnhancedMiniMaxGPT": "minimax_gpt.models.model",
         "MiniMaxConfig": "minimax_gpt.config", "ModelCache": "minimax_gpt.models.cache"}
__all__ = sorted(_HOME)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'minimax_gpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
