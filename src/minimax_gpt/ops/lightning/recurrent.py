"""The token-by-token recurrence of lightning attention, used for decoding (see naive.py for the formula)."""

from __future__ import annotations

import torch

from minimax_gpt.ops.lightning.inputs import check_inputs, state_dtype


def lightning_attn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence ``S_t = exp(-lam) S_{t-1} + k_t^T v_t, o_t = q_t S_t``.

    Constant memory in T; used for decoding (T is usually 1). State is float32 (float64 for
    float64 inputs).
    """
    B, H, T, D, Dv = check_inputs(q, k, v, slopes, initial_state)
    cdt = state_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    ratio = torch.exp(-slopes.to(device=q.device, dtype=cdt)).view(1, H, 1, 1)  # (1, H, 1, 1)
    if initial_state is None:
        state = q.new_zeros((B, H, D, Dv), dtype=cdt)
    else:
        state = initial_state.to(cdt)
    outs = []
    with torch.autocast(device_type=q.device.type, enabled=False):  # float32 arithmetic, as the chunked op
        if T == 1:  # one decoding step: the loop body below without the slicing and the concatenation
            state = torch.addcmul(kc.mT * vc, state, ratio)  # (B, H, D, Dv)
            return (qc @ state).to(q.dtype), state
        for t in range(T):
            kv = kc[:, :, t, :, None] * vc[:, :, t, None, :]  # (B, H, D, Dv) = k_t^T v_t
            state = torch.addcmul(kv, state, ratio)
            outs.append(qc[:, :, t, None, :] @ state)  # (B, H, 1, Dv)
    out = torch.cat(outs, dim=2) if T > 0 else vc.new_empty((B, H, 0, Dv))  # (B, H, T, Dv)
    return out.to(q.dtype), state

