"""Tensor-level ops: functions of tensors returning ``(output, final_state)``, each with a naive reference."""

from minimax_gpt.ops.lightning import (
    lightning_attn_chunked,
    lightning_attn_chunked_packed,
    lightning_attn_naive,
    lightning_attn_recurrent,
    lightning_slopes,
)

__all__ = [
    "lightning_attn_chunked",
    "lightning_attn_chunked_packed",
    "lightning_attn_naive",
    "lightning_attn_recurrent",
    "lightning_slopes",
]
