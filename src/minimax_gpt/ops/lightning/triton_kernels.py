"""Triton kernels of lightning attention: the chunked forward and backward in two phases each, and the recurrent step.

Imported only where Triton is importable (triton_ops.py launches them). The sequence is cut into N chunks of BC
tokens (the last may be shorter, c <= BC tokens). Per chunk (naive.py has the formula, chunk_fused.py the same algebra
in PyTorch), with S_n the state entering chunk n and G_n the gradient w.r.t. the state leaving it:

    M[i, j] = exp(-lam (i - j)) for j <= i else 0,  qd_i = exp(-lam (i + 1)),  kd_j = exp(-lam (c - 1 - j)),
    cd = exp(-lam c),  P = (q k^T) * M,  dP = (do v^T) * M
    forward   S_{n+1} = cd S_n + k^T (kd * v)                              lightning_states_kernel: a scan over n
              o = P v + qd * (q S_n)                                       lightning_out_kernel: every chunk at once
    backward  G_{n-1} = cd G_n + q^T (qd * do)                             lightning_dstates_kernel: a reverse scan
              dq = dP k + qd * (do S_n^T)                                  lightning_bwd_dq_kernel: every chunk
              dk = dP^T q + kd * (v G_n^T),  dv = P^T do + kd * (k G_n)     lightning_bwd_dkv_kernel: every chunk

The scans carry one (D, BV) slice of the state per program in the accumulation dtype ACC (float32, or float64 for
float64 inputs) and write the state of every chunk to a (B*H, N, D, Dv) buffer; the per-chunk kernels then run one
program per (chunk, value block, batch*head), so the GPU is filled at any batch size. The backward's per-chunk work is
two kernels (dq; dk and dv) so that each fits in the shared memory of GPUs before Hopper: one kernel needed 224 KiB
(sm_90, fp32 tiles, D = 128, chunk 64), against 163 KiB on an A100. The backward recomputes the
forward's states (nothing but the inputs is saved). dq and dk sum over the value columns, so each program writes its
partial sum to its own slice of a (NV, B, H, T, D) buffer (summed by the caller); dv and the state gradient are
complete per program. Every tile is padded to a power of two >= 16 (tl.dot's minimum); padded rows and columns are
loaded as zeros and masked out of the stores.

The kernels call no @triton.jit function, not even Triton's own (tl.cdiv, tl.sum, tl.zeros): triton_ops.py rebuilds
them for Triton's interpreter when TRITON_INTERPRET=1 is set after Triton was imported, and a jit function compiled
for the GPU cannot be called from an interpreted kernel.

Pointer strides: q, k (B, H, T, D) and v, o, do (B, H, T, Dv) take their (b, h, t) strides as arguments (the last dim
is contiguous); states (B, H, D, Dv), the per-chunk state buffers and the partial-gradient buffers are contiguous.
"""

import triton
import triton.language as tl


@triton.jit
def lightning_states_kernel(k, v, slopes, s0, h, s_final, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, T,
                            H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                            BV: tl.constexpr, HAS_S0: tl.constexpr, PRECISION: tl.constexpr):
    """h[bh, n] = S_n, the state entering chunk n (S_0 = s0 or 0); s_final = S_N. Grid (NV, B*H)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets past 2^31
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    state_offs = offs_d[:, None] * DV + offs_v[None, :]  # (BD, BV) within one (D, Dv) state
    state_mask = mask_d[:, None] & mask_v[None, :]
    if HAS_S0:
        S = tl.load(s0 + i_bh * D * DV + state_offs, mask=state_mask, other=0.0).to(ACC)  # (BD, BV)
    else:
        S = tl.full([BD, BV], 0.0, ACC)
    pos = offs_c.to(ACC)
    N = (T + BC - 1) // BC
    for n in range(0, N):
        tl.store(h + (i_bh * N + n) * D * DV + state_offs, S, mask=state_mask)
        t = n * BC + offs_c
        mask_t = t < T
        c = tl.minimum(T - n * BC, BC).to(ACC)
        kd = tl.where(mask_t, tl.exp(-lam * tl.maximum(c - 1.0 - pos, 0.0)), 0.0)  # (BC,)
        kb = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :],
                     mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(ACC)  # (BC, BD)
        vb = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_v[None, :],
                     mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(ACC)  # (BC, BV)
        S = tl.exp(-lam * c) * S + tl.dot(tl.trans(kb), vb * kd[:, None], input_precision=PRECISION)
    tl.store(s_final + i_bh * D * DV + state_offs, S, mask=state_mask)


@triton.jit
def lightning_out_kernel(q, k, v, slopes, h, o, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                         so_b, so_h, so_t, T, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr,
                         BD: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """o of chunk n: P v + qd * (q S_n). Grid (N, NV, B*H)."""
    n, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64 offsets
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    t = n * BC + offs_c
    mask_t = t < T
    pos = offs_c.to(ACC)
    dist = pos[:, None] - pos[None, :]  # (BC, BC)
    M = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)
    qd = tl.exp(-lam * (pos + 1.0))  # (BC,)
    N = (T + BC - 1) // BC
    S = tl.load(h + (i_bh * N + n) * D * DV + offs_d[:, None] * DV + offs_v[None, :],
                mask=mask_d[:, None] & mask_v[None, :], other=0.0)  # (BD, BV)
    qb = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :],
                 mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(ACC)  # (BC, BD)
    kb = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :],
                 mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(ACC)  # (BC, BD)
    vb = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_v[None, :],
                 mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(ACC)  # (BC, BV)
    P = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * M  # (BC, BC)
    ob = tl.dot(P, vb, input_precision=PRECISION) + qd[:, None] * tl.dot(qb, S, input_precision=PRECISION)
    tl.store(o + i_b * so_b + i_h * so_h + t[:, None] * so_t + offs_v[None, :], ob.to(o.dtype.element_ty),
             mask=mask_t[:, None] & mask_v[None, :])


@triton.jit
def lightning_dstates_kernel(q, do, slopes, ds_final, dh, ds0, sq_b, sq_h, sq_t, sdo_b, sdo_h, sdo_t, T,
                             H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                             BV: tl.constexpr, HAS_DS: tl.constexpr, PRECISION: tl.constexpr):
    """dh[bh, n] = G_n, the gradient w.r.t. the state leaving chunk n (G_{N-1} = ds_final or 0); ds0 = the gradient
    w.r.t. the initial state. Grid (NV, B*H)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets past 2^31
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    state_offs = offs_d[:, None] * DV + offs_v[None, :]  # (BD, BV)
    state_mask = mask_d[:, None] & mask_v[None, :]
    if HAS_DS:
        G = tl.load(ds_final + i_bh * D * DV + state_offs, mask=state_mask, other=0.0).to(ACC)  # (BD, BV)
    else:
        G = tl.full([BD, BV], 0.0, ACC)
    pos = offs_c.to(ACC)
    qd = tl.exp(-lam * (pos + 1.0))  # (BC,)
    N = (T + BC - 1) // BC
    for i in range(0, N):
        n = N - 1 - i
        tl.store(dh + (i_bh * N + n) * D * DV + state_offs, G, mask=state_mask)
        t = n * BC + offs_c
        mask_t = t < T
        c = tl.minimum(T - n * BC, BC).to(ACC)
        qb = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :],
                     mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(ACC)  # (BC, BD)
        dob = tl.load(do + i_b * sdo_b + i_h * sdo_h + t[:, None] * sdo_t + offs_v[None, :],
                      mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(ACC)  # (BC, BV)
        G = tl.exp(-lam * c) * G + tl.dot(tl.trans(qb), dob * qd[:, None], input_precision=PRECISION)
    tl.store(ds0 + i_bh * D * DV + state_offs, G, mask=state_mask)


@triton.jit
def lightning_bwd_dq_kernel(k, v, do, slopes, h, dq_part, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, T,
                            B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr,
                            BD: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """dq of chunk n (partial over this value block): dP k + qd * (do S_n^T). Grid (N, NV, B*H)."""
    n, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64 offsets
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    t = n * BC + offs_c
    mask_t = t < T
    mask_td, mask_tv = mask_t[:, None] & mask_d[None, :], mask_t[:, None] & mask_v[None, :]
    pos = offs_c.to(ACC)
    dist = pos[:, None] - pos[None, :]
    M = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)  # (BC, BC)
    qd = tl.exp(-lam * (pos + 1.0))  # (BC,)
    N = (T + BC - 1) // BC
    S = tl.load(h + (i_bh * N + n) * D * DV + offs_d[:, None] * DV + offs_v[None, :],
                mask=mask_d[:, None] & mask_v[None, :], other=0.0)  # (BD, BV) entering the chunk
    kb = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :], mask=mask_td,
                 other=0.0).to(ACC)  # (BC, BD)
    vb = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_v[None, :], mask=mask_tv,
                 other=0.0).to(ACC)  # (BC, BV)
    dob = tl.load(do + i_b * sdo_b + i_h * sdo_h + t[:, None] * sdo_t + offs_v[None, :], mask=mask_tv,
                  other=0.0).to(ACC)  # (BC, BV)
    dP = tl.dot(dob, tl.trans(vb), input_precision=PRECISION) * M  # (BC, BC)
    dqb = tl.dot(dP, kb, input_precision=PRECISION) + qd[:, None] * tl.dot(dob, tl.trans(S),
                                                                         input_precision=PRECISION)  # (BC, BD)
    part = (i_v * B * H + i_bh) * T * D  # this program's (T, D) slice of (NV, B, H, T, D)
    tl.store(dq_part + part + t[:, None] * D + offs_d[None, :], dqb, mask=mask_td)


@triton.jit
def lightning_bwd_dkv_kernel(q, k, v, do, slopes, dh, dk_part, dv,
                             sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, T,
                             B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr,
                             BD: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """dk of chunk n (partial over this value block): dP^T q + kd * (v G_n^T), and its dv: P^T do + kd * (k G_n).
    Grid (N, NV, B*H)."""
    n, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64 offsets
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    t = n * BC + offs_c
    mask_t = t < T
    mask_td, mask_tv = mask_t[:, None] & mask_d[None, :], mask_t[:, None] & mask_v[None, :]
    pos = offs_c.to(ACC)
    dist = pos[:, None] - pos[None, :]
    M = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)  # (BC, BC)
    c = tl.minimum(T - n * BC, BC).to(ACC)
    kd = tl.where(mask_t, tl.exp(-lam * tl.maximum(c - 1.0 - pos, 0.0)), 0.0)  # (BC,)
    N = (T + BC - 1) // BC
    G = tl.load(dh + (i_bh * N + n) * D * DV + offs_d[:, None] * DV + offs_v[None, :],
                mask=mask_d[:, None] & mask_v[None, :], other=0.0)  # (BD, BV) gradient w.r.t. the state leaving
    qb = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :], mask=mask_td,
                 other=0.0).to(ACC)  # (BC, BD)
    kb = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :], mask=mask_td,
                 other=0.0).to(ACC)  # (BC, BD)
    vb = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_v[None, :], mask=mask_tv,
                 other=0.0).to(ACC)  # (BC, BV)
    dob = tl.load(do + i_b * sdo_b + i_h * sdo_h + t[:, None] * sdo_t + offs_v[None, :], mask=mask_tv,
                  other=0.0).to(ACC)  # (BC, BV)
    Pt = tl.dot(kb, tl.trans(qb), input_precision=PRECISION) * tl.trans(M)  # (BC, BC) = P^T
    dPt = tl.dot(vb, tl.trans(dob), input_precision=PRECISION) * tl.trans(M)  # (BC, BC) = dP^T
    dkb = tl.dot(dPt, qb, input_precision=PRECISION) + kd[:, None] * tl.dot(
        vb, tl.trans(G), input_precision=PRECISION)  # (BC, BD)
    dvb = tl.dot(Pt, dob, input_precision=PRECISION) + kd[:, None] * tl.dot(
        kb, G, input_precision=PRECISION)  # (BC, BV)
    part = (i_v * B * H + i_bh) * T * D
    tl.store(dk_part + part + t[:, None] * D + offs_d[None, :], dkb, mask=mask_td)
    tl.store(dv + i_bh * T * DV + t[:, None] * DV + offs_v[None, :], dvb, mask=mask_tv)


@triton.jit
def lightning_recurrent_kernel(q, k, v, slopes, s0, o, s_final,
                               sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t, T,
                               H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                               BV: tl.constexpr, HAS_S0: tl.constexpr, PRECISION: tl.constexpr):
    """S_t = exp(-lam) S_{t-1} + k_t^T v_t, o_t = q_t S_t, token by token (decoding: T is 1 or a few).

    q_t S_t is a tl.dot of a 16-row tile whose row 0 is q_t and the others zero (tl.dot's minimum; tl.sum is a jit
    function, see the module docstring); only row 0 is stored."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets past 2^31
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_d, rows = tl.arange(0, BD), tl.arange(0, 16)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    state_ptrs = i_bh * D * DV + offs_d[:, None] * DV + offs_v[None, :]  # (BD, BV)
    state_mask = mask_d[:, None] & mask_v[None, :]
    if HAS_S0:
        S = tl.load(s0 + state_ptrs, mask=state_mask, other=0.0).to(ACC)
    else:
        S = tl.full([BD, BV], 0.0, ACC)
    ratio = tl.exp(-lam)
    first = rows[:, None] == 0  # (16, 1)
    for t in range(0, T):
        q_row = tl.load(q + i_b * sq_b + i_h * sq_h + t * sq_t + rows[:, None] * 0 + offs_d[None, :],
                        mask=first & mask_d[None, :], other=0.0).to(ACC)  # (16, BD): q_t in row 0
        kt = tl.load(k + i_b * sk_b + i_h * sk_h + t * sk_t + offs_d, mask=mask_d, other=0.0).to(ACC)  # (BD,)
        vt = tl.load(v + i_b * sv_b + i_h * sv_h + t * sv_t + offs_v, mask=mask_v, other=0.0).to(ACC)  # (BV,)
        S = ratio * S + kt[:, None] * vt[None, :]
        o_row = tl.dot(q_row, S, input_precision=PRECISION)  # (16, BV): o_t in row 0
        tl.store(o + i_b * so_b + i_h * so_h + t * so_t + rows[:, None] * 0 + offs_v[None, :],
                 o_row.to(o.dtype.element_ty), mask=first & mask_v[None, :])
    tl.store(s_final + state_ptrs, S, mask=state_mask)
