"""Lightning attention's formula, computed as written: the reference every fast path is tested against.

Per head, with decay rate ``lam > 0`` and an optional initial state ``S_0`` (D x Dv):

    S_t = exp(-lam) * S_{t-1} + k_t^T v_t              (state in K^T V orientation)
    o_t = q_t S_t
        = sum_{s<=t} exp(-lam * (t - s)) (q_t . k_s) v_s  +  exp(-lam * (t + 1)) q_t S_0

No 1/sqrt(D) scale, no softmax, no normaliser. The initial state decays by exp(-lam) before the
first token is added, as in Hugging Face's ``MiniMaxLightningAttention`` recurrent branch.

Every implementation (chunk.py, recurrent.py, the Triton kernels) is ``fn(q, k, v, slopes, initial_state=None,
**kw) -> (out, final_state)`` and computes the same thing.

Shape legend: B batch, H heads, T tokens, D query/key head dim, Dv value head dim.
q, k: (B, H, T, D); v: (B, H, T, Dv); slopes: (H,); state: (B, H, D, Dv). States are float32 (float64 for
float64 inputs); outputs have the input dtype.
"""

from __future__ import annotations

import torch

from minimax_gpt.ops.lightning.inputs import check_inputs, state_dtype


def lightning_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quadratic formula in float64: the reference every fast path is tested against.

    Memory and time are O(T^2); use it for tests only.
    """
    B, H, T, D, Dv = check_inputs(q, k, v, slopes, initial_state)
    f64 = torch.float64
    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)
    lam = slopes.to(device=q.device, dtype=f64).view(H, 1, 1)  # (H, 1, 1)
    pos = torch.arange(T, device=q.device, dtype=f64)
    dist = pos[:, None] - pos[None, :]  # (T, T): t - s
    causal = dist >= 0
    decay = torch.exp(-lam * dist.clamp(min=0)) * causal  # (H, T, T), zero above the diagonal

    scores = q64 @ k64.transpose(-1, -2) * decay  # (B, H, T, T)
    out = scores @ v64  # (B, H, T, Dv)
    # state at the end: S_T = exp(-lam T) S_0 + sum_s exp(-lam (T-1-s)) k_s^T v_s
    key_decay = torch.exp(-lam * (T - 1 - pos).view(1, T, 1))  # (H, T, 1)
    state = (k64 * key_decay).transpose(-1, -2) @ v64  # (B, H, D, Dv)
    if initial_state is not None:
        s0 = initial_state.to(f64)
        query_decay = torch.exp(-lam * (pos + 1).view(1, T, 1))  # (H, T, 1)
        out = out + query_decay * (q64 @ s0)
        state = state + torch.exp(-lam * T) * s0
    return out.to(q.dtype), state.to(state_dtype(q.dtype))

