"""The chunked (block) form of lightning attention in PyTorch, for training and prefill (naive.py has the formula).

With chunks of C tokens, position i of chunk n (0-based) gets
    o = [(q k^T) * M] v  +  exp(-lam * (i + 1)) q S_n,    M[i, j] = exp(-lam * (i - j)) for j <= i,
and the state carried across chunks is
    S_{n+1} = exp(-lam * C) S_n + sum_j exp(-lam * (C - 1 - j)) k_j^T v_j.
The hand-written forward and backward are the custom ops of chunk_fused.py; `backward="autograd"` differentiates the
same block form with plain autograd (a second reference, and the way to get gradients for the slopes).

Shape legend: B batch, H heads, T tokens, D query/key head dim, Dv value head dim, N chunks, C chunk size.
"""

from __future__ import annotations

import torch

from minimax_gpt.ops.lightning.chunk_fused import chunked_op, packed_op  # torch.ops.minimax_gpt.lightning_chunked*
from minimax_gpt.ops.lightning.decay import chunk_decays
from minimax_gpt.ops.lightning.inputs import check_chunk_size, check_inputs, state_dtype


def lightning_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    backward: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block form: a decay-masked quadratic product inside each chunk, a carried state across chunks.

    Cost is O(T C D + T D Dv): linear in T. Any T works; a final partial chunk is handled with its
    own (shorter) decays, so no padding copy is made. Arithmetic and the state are float32 (float64
    for float64 inputs); the output has the input dtype.

    ``backward`` picks how gradients are computed; both give the same values:
      - ``"fused"`` (default): a hand-written chunked backward (the custom op ``minimax_gpt::lightning_chunked``)
        that saves only q, k, v and the per-chunk states and recomputes the intra-chunk scores. The decay rates are
        fixed buffers, so it gives no gradient for ``slopes`` and raises if ``slopes`` requires one.
      - ``"autograd"``: the same block form differentiated by plain autograd (slower, saves the
        (B, H, N, C, C) scores); kept as a second reference and for gradients w.r.t. ``slopes``.
    """
    B, H, T, D, Dv = check_inputs(q, k, v, slopes, initial_state)
    check_chunk_size(chunk_size)
    if backward not in ("fused", "autograd"):
        raise ValueError(f"backward must be 'fused' or 'autograd', got {backward!r}")
    # The op chooses its own precision (float32 arithmetic and state for half inputs); autocast around it would
    # turn its matmuls to bf16 and mix dtypes between the forward's saved states and the backward.
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _chunked_dispatch(q, k, v, slopes, initial_state, chunk_size, backward)


def _chunked_dispatch(q, k, v, slopes, initial_state, chunk_size, backward):
    if backward == "autograd":
        return _chunked_autograd(q, k, v, slopes, initial_state, chunk_size)

    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, slopes, initial_state)
    )
    if grad_wanted and slopes.requires_grad:
        raise ValueError(
            "lightning_attn_chunked(backward='fused') gives no gradient for slopes (fixed decay rates); "
            "pass slopes without requires_grad, or use backward='autograd' to differentiate them"
        )
    out, state, _ = chunked_op(q, k, v, slopes, initial_state, chunk_size, grad_wanted)
    return out, state


def lightning_attn_chunked_packed(
    qkv: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lightning_attn_chunked`` (fused backward) for the layer's packed projection, without the layout copies.

    qkv (B, H, T, 3D): the head-major view ``silu(x W_qkv^T).view(B, T, H, 3D).transpose(1, 2)``, read as
    [q | k | v] along the last dim. Returns out (B, H, T, D), stored as (B, T, H, D) so that
    ``out.transpose(1, 2).reshape(B, T, H * D)`` is a view, and the final state. The gradient of qkv is written
    straight into the projection's (B, T, H, 3D) layout, where separate q, k, v inputs would have their gradients
    concatenated and then transposed (two more copies of q, k and v per backward). Same values as
    ``lightning_attn_chunked(*qkv.split(D, -1), ...)``.
    """
    if qkv.dim() != 4 or qkv.shape[-1] % 3 != 0:
        raise ValueError(f"qkv must have shape (B, H, T, 3D), got {tuple(qkv.shape)}")
    q, k, v = qkv.split(qkv.shape[-1] // 3, dim=-1)
    check_inputs(q, k, v, slopes, initial_state)
    check_chunk_size(chunk_size)
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qkv, slopes, initial_state))
    if grad_wanted and slopes.requires_grad:  # as lightning_attn_chunked: under no_grad there is nothing to refuse
        raise ValueError("lightning_attn_chunked_packed gives no gradient for slopes (fixed decay rates); pass slopes "
                         "without requires_grad, or use lightning_attn_chunked(backward='autograd')")
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        out, state, _ = packed_op(qkv, slopes, initial_state, chunk_size, grad_wanted)
        return out, state


def _chunked_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block form in differentiable tensor ops: ``lightning_attn_chunked(..., backward="autograd")``."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]

    cdt = state_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)  # no copy when already in cdt
    lam = slopes.to(device=q.device, dtype=cdt).view(H, 1, 1)  # (H, 1, 1)
    if initial_state is None:
        state = q.new_zeros((B, H, D, Dv), dtype=cdt)
    else:
        state = initial_state.to(cdt)

    C = min(chunk_size, T) if T > 0 else 1
    N, R = divmod(T, C)  # N full chunks, R leftover tokens
    outs = []

    if N > 0:
        mask, query_decay, key_decay, chunk_decay = chunk_decays(lam, C)
        # Views, not copies: split T into (N, C).
        qb = qc[:, :, : N * C].unflatten(2, (N, C))  # (B, H, N, C, D)
        kb = kc[:, :, : N * C].unflatten(2, (N, C))  # (B, H, N, C, D)
        vb = vc[:, :, : N * C].unflatten(2, (N, C))  # (B, H, N, C, Dv)
        mask_b = mask.unsqueeze(1)  # (H, 1, C, C), broadcasts over (B, H, N, C, C)

        # Each chunk's own contribution to the state at its end: (k * key_decay)^T v.
        chunk_kv = (kb * key_decay.unsqueeze(1)).transpose(-1, -2) @ vb  # (B, H, N, D, Dv)

        # Carried state entering each chunk: a short scan over N (the only Python loop). unbind, not
        # chunk_kv[:, :, n]: the backward of N indexings would zero-fill N full-size gradients.
        starts = [state]
        for kv in chunk_kv.unbind(2):  # each (B, H, D, Dv)
            state = torch.addcmul(kv, state, chunk_decay)
            starts.append(state)
        start_states = torch.stack(starts[:-1], dim=2)  # (B, H, N, D, Dv)

        # Intra-chunk: one batched matmul over all (B, H, N). The in-place mask multiply is safe:
        # matmul does not save its output for backward, and mask needs no gradient.
        scores = (qb @ kb.transpose(-1, -2)).mul_(mask_b)  # (B, H, N, C, C)
        out = scores @ vb  # (B, H, N, C, Dv)
        # Inter-chunk: (q * query_decay) S_n == query_decay * (q S_n), which avoids a scaled copy of q.
        out = out.addcmul_(qb @ start_states, query_decay.unsqueeze(1))  # (B, H, N, C, Dv)
        outs.append(out.flatten(2, 3))  # (B, H, N*C, Dv)

    if R > 0:
        # Leftover tokens: one more chunk of length R with its own decays.
        mask, query_decay, key_decay, chunk_decay = chunk_decays(lam, R)
        qt, kt, vt = qc[:, :, N * C :], kc[:, :, N * C :], vc[:, :, N * C :]  # (B, H, R, *)
        scores = (qt @ kt.transpose(-1, -2)).mul_(mask)  # (B, H, R, R)
        out = (scores @ vt).addcmul_(qt @ state, query_decay)  # (B, H, R, Dv)
        outs.append(out)
        state = torch.addcmul((kt * key_decay).transpose(-1, -2) @ vt, state, chunk_decay)  # (B, H, D, Dv)

    if not outs:  # T == 0
        out = vc.new_empty((B, H, 0, Dv))
    elif len(outs) == 1:
        out = outs[0]
    else:
        out = torch.cat(outs, dim=2)  # (B, H, T, Dv)
    return out.to(q.dtype), state
