"""MiniMaxGPT: hackable MiniMax-01-style language models (hybrid lightning/softmax attention, Mixture-of-Experts)."""

from minimax_gpt.config import MiniMaxConfig

__all__ = ["MiniMaxConfig"]
__version__ = "0.1.0"
