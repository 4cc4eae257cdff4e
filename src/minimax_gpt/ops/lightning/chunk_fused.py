"""The hand-written chunked forward and backward of lightning attention, as torch.library custom ops.

chunk.py holds the public functions that call them; naive.py the formula they are tested against.
"""

from __future__ import annotations

import torch

from minimax_gpt.ops.lightning.decay import chunk_decays
from minimax_gpt.ops.lightning.inputs import state_dtype

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
# with M, qd, kd, cd from chunk_decays. Matmul FLOPs per chunk: forward 2C^2(D + Dv) + 4 C D Dv,
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
    cdt = state_dtype(q.dtype)
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
            decays[c] = chunk_decays(lam, c)
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
    cdt = state_dtype(q.dtype)
    lam = slopes.to(device=q.device, dtype=cdt).view(H, 1, 1)  # (H, 1, 1)
    # G: gradient w.r.t. the state leaving the current chunk, scanned from the end.
    G = q.new_zeros((B, H, D, Dv), dtype=cdt) if d_state is None else d_state.to(cdt)
    own = grads is None
    dq, dk, dv = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)) if own else grads
    decays = {}
    views = _state_views(kept, q.shape, Dv, chunk_size)
    for (start, n, c), states in reversed(list(zip(_segments(q.shape, chunk_size), views))):
        if c not in decays:
            decays[c] = chunk_decays(lam, c)
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
    return q.new_empty((n,), dtype=state_dtype(q.dtype))


def _not_an_input(t: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """A custom op may not return one of its inputs (the T = 0 state gradient can be d_state itself)."""
    return t.clone() if t is given else t


@torch.library.custom_op("minimax_gpt::lightning_chunked", mutates_args=())
def chunked_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                initial_state: torch.Tensor | None, chunk_size: int,
                keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused_forward(q, k, v, slopes, initial_state, chunk_size, keep_states)


@chunked_op.register_fake
def _(q, k, v, slopes, initial_state, chunk_size, keep_states):
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    return (v.new_empty((B, H, T, Dv)), q.new_empty((B, H, D, Dv), dtype=state_dtype(q.dtype)),
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
            q.new_empty((B, H, D, v.shape[-1]), dtype=state_dtype(q.dtype)))


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


chunked_op.register_autograd(_chunked_backward, setup_context=_setup_context)


@torch.library.custom_op("minimax_gpt::lightning_chunked_packed", mutates_args=())
def packed_op(qkv: torch.Tensor, slopes: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int,
               keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = qkv.split(qkv.shape[-1] // 3, dim=-1)
    return _fused_forward(q, k, v, slopes, initial_state, chunk_size, keep_states, _packed_out(qkv), qkv)


@packed_op.register_fake
def _(qkv, slopes, initial_state, chunk_size, keep_states):
    B, H, _, D3 = qkv.shape
    q = qkv[..., : D3 // 3]
    return (_packed_out(qkv), qkv.new_empty((B, H, D3 // 3, D3 // 3), dtype=state_dtype(qkv.dtype)),
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
    return _packed_grad(qkv), qkv.new_empty((B, H, D3 // 3, D3 // 3), dtype=state_dtype(qkv.dtype))


def _packed_grad(qkv: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, 3D) gradient in the projection's (B, T, H, 3D) layout."""
    B, H, T, D3 = qkv.shape
    return qkv.new_empty((B, T, H, D3)).transpose(1, 2)


def _packed_backward(ctx, d_out, d_state, _d_kept):
    qkv, slopes, kept = ctx.saved_tensors
    d_qkv, d_init = torch.ops.minimax_gpt.lightning_chunked_packed_backward(qkv, slopes, kept, d_out, d_state,
                                                                            ctx.chunk_size)
    return d_qkv, None, _d_init(ctx, d_init), None, None


packed_op.register_autograd(_packed_backward, setup_context=_setup_context)
