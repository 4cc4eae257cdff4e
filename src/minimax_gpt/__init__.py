"""MiniMaxGPT: hackable MiniMax-01-style language models (hybrid lightning/softmax attention, Mixture-of-Experts)."""

from minimax_gpt.cache import ModelCache
from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.model import CausalLMOutput, EnhancedMiniMaxGPT

__all__ = ["CausalLMOutput", "EnhancedMiniMaxGPT", "MiniMaxConfig", "ModelCache"]
__version__ = "0.1.0"
