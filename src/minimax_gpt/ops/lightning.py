"""Lightning attention: causal linear attention with a per-head exponential decay (MiniMax-01).

Per head, with decay rate ``lam > 0`` and an optional initial state ``S_0`` (D x Dv):

    S_t = exp(-lam) * S_{t-1} + k_t^T v_t              (state in K^T V orientation)
    o_t = q_t S_t
        = sum_{s<=t} exp(-lam * (t - s)) (q_t . k_s) v_s  +  exp(-lam * (t + 1)) q_t S_0

No 1/sqrt(D) scale, no softmax, no normaliser. The initial state decays by exp(-lam) before the
first token is added, as in Hugging Face's ``MiniMaxLightningAttention`` recurrent branch.

Three functions compute the same thing, all ``fn(q, k, v, slopes, initial_state=None, **kw)
-> (out, final_state)``:

- ``lightning_attn_naive``: the quadratic formula above in float64, the oracle;
- ``lightning_attn_chunked``: the block form used for training and prefill. With chunks of C
  tokens, position i of chunk n (0-based) gets
      o = [(q k^T) * M] v  +  exp(-lam * (i + 1)) q S_n,    M[i, j] = exp(-lam * (i - j)) for j <= i,
  and the state carried across chunks is
      S_{n+1} = exp(-lam * C) S_n + sum_j exp(-lam * (C - 1 - j)) k_j^T v_j;
- ``lightning_attn_recurrent``: the token-by-token recurrence, used for decoding.

Shape legend: B batch, H heads, T tokens, D query/key head dim, Dv value head dim,
N chunks, C chunk size. q, k: (B, H, T, D); v: (B, H, T, Dv); slopes: (H,);
state: (B, H, D, Dv). States are float32 (float64 for float64 inputs); outputs have the input dtype.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "lightning_attn_chunked",
    "lightning_attn_chunked_packed",
    "lightning_attn_naive",
    "lightning_attn_recurrent",
    "lightning_slopes",
]


def lightning_slopes(n_head: int, layer_idx: int, n_layer: int) -> torch.Tensor:
    """Decay rates lam of one layer, (H,) float32: ``2^(-8(h+1)/H) * (1 - l/(L-1+1e-5) + 1e-5)``.

    ``layer_idx`` counts all layers (softmax ones too), as in MiniMax-01. The last layer decays
    almost not at all (factor 1e-5 + tiny), the first one the most.
    """
    if n_head < 1:
        raise ValueError(f"n_head must be >= 1, got {n_head}")
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    if not 0 <= layer_idx < n_layer:
        raise ValueError(f"layer_idx must be in [0, {n_layer}), got {layer_idx}")
    exponent = torch.arange(1, n_head + 1, dtype=torch.float64)
    base = 2.0 ** (-8.0 * exponent / n_head)  # (H,)
    factor = 1.0 - layer_idx / (n_layer - 1 + 1e-5) + 1e-5
    return (base * factor).to(torch.float32)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States (and all internal arithmetic) are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Validate shapes and return (B, H, T, D, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got rank {t.dim()} {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in (B, H, T), got v {tuple(v.shape)} and q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape (H,) = ({H},), got {tuple(slopes.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, D, Dv):
        raise ValueError(
            f"initial_state must have shape (B, H, D, Dv) = {(B, H, D, Dv)}, got {tuple(initial_state.shape)}"
        )
    return B, H, T, D, Dv


def _check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


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
    B, H, T, D, Dv = _check_inputs(q, k, v, slopes, initial_state)
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
    return out.to(q.dtype), state.to(_state_dtype(q.dtype))


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
    B, H, T, D, Dv = _check_inputs(q, k, v, slopes, initial_state)
    cdt = _state_dtype(q.dtype)
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


_logged_cuda_fallback = False


def _log_cuda_fallback_once() -> None:
    global _logged_cuda_fallback
    if not _logged_cuda_fallback:
        _logged_cuda_fallback = True
        logger.warning(
            "lightning_attn_chunked: no fused CUDA kernel is wired in; using the pure-PyTorch block form "
            "(correct, but slower than a fused kernel such as fla's chunk_simple_gla)."
        )


def _chunk_decays(lam: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay tensors of one chunk of C tokens, for lam (H, 1, 1) in the compute dtype.

    Returns
      mask:        (H, C, C)  exp(-lam (i - j)) for j <= i, else 0    (intra-chunk)
      query_decay: (H, C, 1)  exp(-lam (i + 1))                      (carried state -> position i)
      key_decay:   (H, C, 1)  exp(-lam (C - 1 - j))                  (position j -> end of chunk)
      chunk_decay: (H, 1, 1)  exp(-lam C)                            (state across a whole chunk)
    """
    pos = torch.arange(C, device=lam.device, dtype=lam.dtype)
    dist = pos[:, None] - pos[None, :]  # (C, C)
    mask = torch.exp(-lam * dist.clamp(min=0)) * (dist >= 0)
    query_decay = torch.exp(-lam * (pos + 1).view(C, 1))
    key_decay = torch.exp(-lam * (C - 1 - pos).view(C, 1))
    chunk_decay = torch.exp(-lam * C)
    return mask, query_decay, key_decay, chunk_decay


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
    B, H, T, D, Dv = _check_inputs(q, k, v, slopes, initial_state)
    _check_chunk_size(chunk_size)
    if backward not in ("fused", "autograd"):
        raise ValueError(f"backward must be 'fused' or 'autograd', got {backward!r}")
    if q.is_cuda:
        _log_cuda_fallback_once()
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
    out, state, _ = torch.ops.minimax_gpt.lightning_chunked(q, k, v, slopes, initial_state, chunk_size, grad_wanted)
    return out, state


# --- the fused (hand-written) forward and backward ----------------------------------------------------
#
# The sequence is cut into chunks of C tokens (a last partial chunk of R < C tokens gets its own decays),
# and the chunks into segments of about _SEGMENT_ELEMS elements per (B, H, tokens, D) block. Each segment's
# q, k, v (and do) are gathered once into contiguous blocks (B, H, n, C, D) of the compute dtype: this is the
# one deliberate copy (it is also the bf16 -> float32 cast). The layer
# passes views of a (B, T, H, 3D) tensor, whose (B, H, n) batch dims cannot be flattened for a batched
# matmul, so without it every matmul would make its own hidden copy (two per input in the forward, more in
# the backward). Working segment by segment keeps those blocks, the (B, H, n, C, C) scores and the
# per-chunk states in cache at any T, so the cost per token does not grow with T.
#
# Per chunk (state S entering it, do the output gradient, G the gradient w.r.t. the state leaving it):
#   forward   P = (q k^T) * M,  o = P v + qd * (q S),          S' = cd S + k^T (kd * v)
#   backward  dP = (do v^T) * M
#             dq = dP k + qd * (do S^T)
#             dk = dP^T q + kd * (v G^T)
#             dv = P^T do + kd * (k G)
#             dS = cd G + q^T (qd * do)                         (G of the previous chunk: a reverse scan)
# with M, qd, kd, cd from _chunk_decays. Matmul FLOPs per chunk: forward 2C^2(D + Dv) + 4 C D Dv,
# backward 2C^2(3D + 2Dv) + 8 C D Dv (the scores q k^T are recomputed rather than saved).

# Elements of one (B, H, tokens, D) block per segment: 2^17 float32 = 512 KiB, so a segment's dozen blocks and
# scores stay in cache (256 tokens at B*H = 8, D = 64). Measured with the packed op (the layer's call), B = 1, H = 8,
# D = 64, quiet machine, fwd+bwd for segments of 2^16 / 2^17 / 2^18 / 2^19 / 2^20 elements: T = 16k, 1 thread
# 542 / 457 / 495 / 525 / 581 ms; T = 8k, 2 threads 198 / 154 / 161 / 159 / 163 ms.
_SEGMENT_ELEMS = 2**17


def _segments(shape: tuple[int, ...], chunk_size: int) -> list[tuple[int, int, int]]:
    """(start, n_chunks, chunk_len) of each segment of a (B, H, T, D) input; full chunks, then the partial one."""
    B, H, T, D = shape
    if T == 0:
        return []
    C = min(chunk_size, T)
    N, R = divmod(T, C)
    per_segment = max(1, _SEGMENT_ELEMS // (B * H * max(D, 1) * C))  # chunks per segment
    segs = [(n * C, min(per_segment, N - n), C) for n in range(0, N, per_segment)]
    if R > 0:
        segs.append((N * C, 1, R))
    return segs


def _gather(x: torch.Tensor, start: int, n: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    """x[:, :, start : start + n c] as a contiguous (B, H, n, c, D) block in ``dtype`` (one copy at most)."""
    block = x[:, :, start : start + n * c].to(dtype)
    return block.contiguous().unflatten(2, (n, c))


def _gather_qkv(q, k, v, packed, start: int, n: int, c: int, dtype: torch.dtype):
    """A segment's q, k, v blocks (B, H, n, c, D|Dv). From the packed (B, H, T, 3D) tensor when there is one: a single
    gather reads each head's [q | k | v] row in one pass and the three blocks are views of it (row stride 3D, which
    the batched matmuls take as is); else one gather each."""
    if packed is None:
        return tuple(_gather(x, start, n, c, dtype) for x in (q, k, v))
    return _gather(packed, start, n, c, dtype).split(q.shape[-1], dim=-1)


def _put(dst: torch.Tensor, start: int, block: torch.Tensor, replace: bool = True) -> torch.Tensor:
    """Write a (B, H, n, c, D) block into dst[:, :, start : start + n c] (casting), or return it if it is all of dst
    and `replace` (dst is our own buffer, not one the caller gave to be written into)."""
    flat = block.flatten(2, 3)  # (B, H, n c, D)
    if replace and flat.shape == dst.shape and flat.dtype == dst.dtype:
        return flat
    dst[:, :, start : start + flat.shape[2]].copy_(flat)
    return dst


def _n_state_elems(shape, Dv: int, chunk_size: int):
    """Elements of the states entering every chunk, (B, H, ceil(T / chunk_size), D, Dv); also for a symbolic T."""
    B, H, T, D = shape
    return B * H * ((T + chunk_size - 1) // chunk_size) * D * Dv


def _state_views(kept: torch.Tensor, shape, Dv: int, chunk_size: int) -> list[torch.Tensor]:
    """The states entering each segment's chunks, (B, H, n, D, Dv) each: contiguous pieces of the flat `kept`, one
    after the other (one tensor to save and return, whose size a compiler can tell from T)."""
    B, H, _, D = shape
    views, offset = [], 0
    for _, n, _ in _segments(shape, chunk_size):
        size = B * H * n * D * Dv
        views.append(kept[offset : offset + size].view(B, H, n, D, Dv))
        offset += size
    return views


def _fused_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    keep_states: bool,
    out: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the block form; returns (out, final_state, the states entering every chunk, flat: `_state_views`;
    empty unless keep_states).
    out: a (B, H, T, Dv) buffer of any strides to write into (default: a new contiguous one).
    packed: the (B, H, T, 3D) tensor q, k, v are views of, to gather them in one pass (`_gather_qkv`)."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    cdt = _state_dtype(q.dtype)
    lam = slopes.detach().to(device=q.device, dtype=cdt).view(H, 1, 1)  # (H, 1, 1)
    state = q.new_zeros((B, H, D, Dv), dtype=cdt) if initial_state is None else initial_state.detach().to(cdt)
    own = out is None
    if own:
        out = v.new_empty((B, H, T, Dv))  # (B, H, T, Dv), input dtype
    kept = q.new_empty((_n_state_elems(q.shape, Dv, chunk_size) if keep_states else 0,), dtype=cdt)
    views = _state_views(kept, q.shape, Dv, chunk_size) if keep_states else None
    decays = {}
    for seg, (start, n, c) in enumerate(_segments(q.shape, chunk_size)):
        if c not in decays:
            decays[c] = _chunk_decays(lam, c)
        mask, qd, kd, cd = decays[c]
        mask, qd, kd = mask.unsqueeze(1), qd.unsqueeze(1), kd.unsqueeze(1)  # (H, 1, c, c), (H, 1, c, 1) x2
        qb, kb, vb = _gather_qkv(q, k, v, packed, start, n, c, cdt)  # (B, H, n, c, D|Dv)

        # States entering each chunk: S_0 = state, S_i = cd S_{i-1} + k_{i-1}^T (kd * v_{i-1}).
        kv = kb.transpose(-1, -2) @ (vb * kd)  # (B, H, n, D, Dv)
        states = views[seg] if keep_states else kv.new_empty(kv.shape)  # (B, H, n, D, Dv)
        states[:, :, 0] = state
        for i in range(1, n):
            states[:, :, i] = torch.addcmul(kv[:, :, i - 1], states[:, :, i - 1], cd)  # (no out=: torch.compile)
        state = torch.addcmul(kv[:, :, n - 1], states[:, :, n - 1], cd)  # (B, H, D, Dv)

        scores = (qb @ kb.transpose(-1, -2)).mul_(mask)  # (B, H, n, c, c)
        ob = (scores @ vb).addcmul_(qb @ states, qd)  # (B, H, n, c, Dv)
        out = _put(out, start, ob, own)
    if T == 0:
        state = state.clone()  # never hand back the caller's tensor as a new output
    return out, state, kept


def _fused_backward(q, k, v, slopes, kept, d_out, d_state, chunk_size, grads=None, packed=None):
    """Gradients (dq, dk, dv, d_initial_state in the compute dtype) of the block form, from the per-chunk states the
    forward kept.
    grads: (dq, dk, dv) buffers of any strides to write into (default: new contiguous ones); packed: as in
    `_fused_forward`."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    cdt = _state_dtype(q.dtype)
    lam = slopes.to(device=q.device, dtype=cdt).view(H, 1, 1)  # (H, 1, 1)
    # G: gradient w.r.t. the state leaving the current chunk, scanned from the end.
    G = q.new_zeros((B, H, D, Dv), dtype=cdt) if d_state is None else d_state.to(cdt)
    own = grads is None
    dq, dk, dv = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)) if own else grads
    decays = {}
    views = _state_views(kept, q.shape, Dv, chunk_size)
    for (start, n, c), states in reversed(list(zip(_segments(q.shape, chunk_size), views))):
        if c not in decays:
            decays[c] = _chunk_decays(lam, c)
        mask, qd, kd, cd = decays[c]
        mask, qd, kd = mask.unsqueeze(1), qd.unsqueeze(1), kd.unsqueeze(1)
        qb, kb, vb = _gather_qkv(q, k, v, packed, start, n, c, cdt)  # (B, H, n, c, D|Dv)
        if d_out is None:
            dob = vb.new_zeros(vb.shape)
        else:
            dob = _gather(d_out, start, n, c, cdt)  # (B, H, n, c, Dv)

        # Gradients w.r.t. the states leaving each chunk: G_{n-1} = G, G_{i-1} = cd G_i + q_i^T (qd * do_i).
        u = qb.transpose(-1, -2) @ (dob * qd)  # (B, H, n, D, Dv)
        grads_after = u.new_empty(u.shape)  # (B, H, n, D, Dv)
        grads_after[:, :, n - 1] = G
        for i in range(n - 1, 0, -1):
            grads_after[:, :, i - 1] = torch.addcmul(u[:, :, i], grads_after[:, :, i], cd)
        G = torch.addcmul(u[:, :, 0], grads_after[:, :, 0], cd)  # entering the segment

        scores = (qb @ kb.transpose(-1, -2)).mul_(mask)  # (B, H, n, c, c), recomputed
        dvb = (scores.transpose(-1, -2) @ dob).addcmul_(kb @ grads_after, kd)  # (B, H, n, c, Dv)
        dscores = (dob @ vb.transpose(-1, -2)).mul_(mask)  # (B, H, n, c, c)
        dqb = (dscores @ kb).addcmul_(dob @ states.transpose(-1, -2), qd)  # (B, H, n, c, D)
        dkb = (dscores.transpose(-1, -2) @ qb).addcmul_(vb @ grads_after.transpose(-1, -2), kd)
        dq, dk, dv = _put(dq, start, dqb, own), _put(dk, start, dkb, own), _put(dv, start, dvb, own)

    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), G


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
    _check_inputs(q, k, v, slopes, initial_state)
    _check_chunk_size(chunk_size)
    if qkv.is_cuda:
        _log_cuda_fallback_once()
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qkv, slopes, initial_state))
    if grad_wanted and slopes.requires_grad:  # as lightning_attn_chunked: under no_grad there is nothing to refuse
        raise ValueError("lightning_attn_chunked_packed gives no gradient for slopes (fixed decay rates); pass slopes "
                         "without requires_grad, or use lightning_attn_chunked(backward='autograd')")
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        out, state, _ = torch.ops.minimax_gpt.lightning_chunked_packed(qkv, slopes, initial_state, chunk_size,
                                                                       grad_wanted)
        return out, state


def _packed_out(qkv: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, D) output stored as (B, T, H, D)."""
    B, H, T, D3 = qkv.shape
    return qkv.new_empty((B, T, H, D3 // 3)).transpose(1, 2)


# --- the fused forward and backward as PyTorch custom ops ---------------------------------------------------------
#
# Registered with torch.library so that torch.compile calls them as they are instead of tracing their segment loop:
# traced, the op ran 8x slower at T = 8192 (2.3 s against 0.28 s forward+backward, 1 thread, after 191 s of
# compiling) and 19% slower at the training shape B8 x T256 (19 s of compiling); as custom ops it runs as in eager
# (249 / 253 ms at 8192) after 4 s. `keep_states` (whether a backward will follow) keeps the per-chunk states the
# backward reads, in one flat tensor (`_state_views`) whose size a compiler can tell from T; without it the forward
# keeps nothing.

def _fake_kept(q: torch.Tensor, Dv: int, chunk_size: int, keep_states: bool) -> torch.Tensor:
    n = _n_state_elems(q.shape, Dv, chunk_size) if keep_states else 0
    return q.new_empty((n,), dtype=_state_dtype(q.dtype))


def _not_an_input(t: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """A custom op may not return one of its inputs (the T = 0 state gradient can be d_state itself)."""
    return t.clone() if t is given else t


@torch.library.custom_op("minimax_gpt::lightning_chunked", mutates_args=())
def _chunked_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                initial_state: torch.Tensor | None, chunk_size: int,
                keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused_forward(q, k, v, slopes, initial_state, chunk_size, keep_states)


@_chunked_op.register_fake
def _(q, k, v, slopes, initial_state, chunk_size, keep_states):
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    return (v.new_empty((B, H, T, Dv)), q.new_empty((B, H, D, Dv), dtype=_state_dtype(q.dtype)),
            _fake_kept(q, Dv, chunk_size, keep_states))


@torch.library.custom_op("minimax_gpt::lightning_chunked_backward", mutates_args=())
def _chunked_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, kept: torch.Tensor,
                         d_out: torch.Tensor | None, d_state: torch.Tensor | None,
                         chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, d_init = _fused_backward(q, k, v, slopes, kept, d_out, d_state, chunk_size)
    return dq, dk, dv, _not_an_input(d_init, d_state)


@_chunked_backward_op.register_fake
def _(q, k, v, slopes, kept, d_out, d_state, chunk_size):
    B, H, _, D = q.shape
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((B, H, D, v.shape[-1]), dtype=_state_dtype(q.dtype)))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    """Both ops' autograd context: the inputs as given (views, no copy) and the per-chunk states the forward kept
    (output[2]); the scores are recomputed in the backward."""
    *tensors, slopes, initial_state, chunk_size, keep_states = inputs
    kept = output[2]
    if not keep_states:
        raise ValueError("the lightning op was called with keep_states=False on inputs that require grad: it keeps no "
                         "states for a backward (call it under torch.no_grad, or with keep_states=True)")
    ctx.save_for_backward(*tensors, slopes, kept)
    ctx.chunk_size = chunk_size
    ctx.init_dtype = None if initial_state is None else initial_state.dtype


def _d_init(ctx, d_init: torch.Tensor) -> torch.Tensor | None:
    return None if ctx.init_dtype is None else d_init.to(ctx.init_dtype)


def _chunked_backward(ctx, d_out, d_state, _d_kept):
    q, k, v, slopes, kept = ctx.saved_tensors
    dq, dk, dv, d_init = torch.ops.minimax_gpt.lightning_chunked_backward(q, k, v, slopes, kept, d_out, d_state,
                                                                          ctx.chunk_size)
    return dq, dk, dv, None, _d_init(ctx, d_init), None, None


_chunked_op.register_autograd(_chunked_backward, setup_context=_setup_context)


@torch.library.custom_op("minimax_gpt::lightning_chunked_packed", mutates_args=())
def _packed_op(qkv: torch.Tensor, slopes: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int,
               keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = qkv.split(qkv.shape[-1] // 3, dim=-1)
    return _fused_forward(q, k, v, slopes, initial_state, chunk_size, keep_states, _packed_out(qkv), qkv)


@_packed_op.register_fake
def _(qkv, slopes, initial_state, chunk_size, keep_states):
    B, H, _, D3 = qkv.shape
    q = qkv[..., : D3 // 3]
    return (_packed_out(qkv), qkv.new_empty((B, H, D3 // 3, D3 // 3), dtype=_state_dtype(qkv.dtype)),
            _fake_kept(q, D3 // 3, chunk_size, keep_states))


@torch.library.custom_op("minimax_gpt::lightning_chunked_packed_backward", mutates_args=())
def _packed_backward_op(qkv: torch.Tensor, slopes: torch.Tensor, kept: torch.Tensor, d_out: torch.Tensor | None,
                        d_state: torch.Tensor | None, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    D3 = qkv.shape[-1]
    q, k, v = qkv.split(D3 // 3, dim=-1)
    d_qkv = _packed_grad(qkv)
    *_, d_init = _fused_backward(q, k, v, slopes, kept, d_out, d_state, chunk_size, grads=d_qkv.split(D3 // 3, dim=-1),
                                 packed=qkv)
    return d_qkv, _not_an_input(d_init, d_state)


@_packed_backward_op.register_fake
def _(qkv, slopes, kept, d_out, d_state, chunk_size):
    B, H, _, D3 = qkv.shape
    return _packed_grad(qkv), qkv.new_empty((B, H, D3 // 3, D3 // 3), dtype=_state_dtype(qkv.dtype))


def _packed_grad(qkv: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, 3D) gradient in the projection's (B, T, H, 3D) layout."""
    B, H, T, D3 = qkv.shape
    return qkv.new_empty((B, T, H, D3)).transpose(1, 2)


def _packed_backward(ctx, d_out, d_state, _d_kept):
    qkv, slopes, kept = ctx.saved_tensors
    d_qkv, d_init = torch.ops.minimax_gpt.lightning_chunked_packed_backward(qkv, slopes, kept, d_out, d_state,
                                                                            ctx.chunk_size)
    return d_qkv, None, _d_init(ctx, d_init), None, None


_packed_op.register_autograd(_packed_backward, setup_context=_setup_context)


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

    cdt = _state_dtype(q.dtype)
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
        mask, query_decay, key_decay, chunk_decay = _chunk_decays(lam, C)
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
        mask, query_decay, key_decay, chunk_decay = _chunk_decays(lam, R)
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
