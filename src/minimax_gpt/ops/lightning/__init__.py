"""Lightning attention (MiniMax-01): causal linear attention with a per-head exponential decay.

Every function takes q, k (B, H, T, D), v (B, H, T, Dv), the decay rates (H,) and an optional initial state
(B, H, D, Dv), and returns ``(output, final_state)``; naive.py states the formula and is the reference the others
are tested against.

    naive.py        lightning_attn_naive: the quadratic formula in float64 (tests only)
    chunk.py        lightning_attn_chunked(_packed): the block form in PyTorch (training, prefill)
    chunk_fused.py  its hand-written forward and backward as torch.library custom ops
    recurrent.py    lightning_attn_recurrent: token by token (decoding)
    decay.py        lightning_slopes: the per-head decay rates of a layer
    triton_ops.py   lightning_attn_triton(_recurrent): the same through the Triton kernels of triton_kernels.py
                    (CUDA; CPU through TRITON_INTERPRET=1); imported on use, as Triton is optional
    backend.py      which of the two the lightning layer runs (config, environment, device), logged once
"""

from minimax_gpt.ops.lightning.chunk import lightning_attn_chunked, lightning_attn_chunked_packed
from minimax_gpt.ops.lightning.decay import lightning_slopes
from minimax_gpt.ops.lightning.naive import lightning_attn_naive
from minimax_gpt.ops.lightning.recurrent import lightning_attn_recurrent

__all__ = [
    "lightning_attn_chunked",
    "lightning_attn_chunked_packed",
    "lightning_attn_naive",
    "lightning_attn_recurrent",
    "lightning_slopes",
]
