"""Triton kernels of lightning attention: the chunked forward, its two backward sweeps, and the recurrent step.

Imported only where Triton is importable (triton_ops.py launches them). Each program owns one (batch, head) and one
block of BV value columns, and walks the sequence chunk by chunk carrying its (D, BV) slice of the state in the
accumulation dtype ACC (float32, or float64 for float64 inputs). Per chunk of c <= BC tokens (naive.py has the
formula, chunk_fused.py the same algebra in PyTorch), with S the state entering it and G the gradient w.r.t. the state
leaving it:

    M[i, j] = exp(-lam (i - j)) for j <= i else 0,  qd_i = exp(-lam (i + 1)),  kd_j = exp(-lam (c - 1 - j)),
    cd = exp(-lam c)
    forward     o  = ((q k^T) * M) v + qd * (q S)              S' = cd S + k^T (kd * v)
    dq sweep    dq = ((do v^T) * M) k + qd * (do S^T)          (forward order, S recomputed: nothing is saved)
    dkv sweep   dv = ((q k^T) * M)^T do + kd * (k G)           (reverse order)
                dk = ((do v^T) * M)^T q + kd * (v G^T)         G_prev = cd G + q^T (qd * do)

dq and dk sum over the value columns, so each program writes its partial sum to its own slice of a (NV, B, H, T, D)
buffer (summed by the caller); dv and the state gradient are complete per program. Every tile is padded to a power
of two >= 16 (tl.dot's minimum), and the padded rows and columns are loaded as zeros and masked out of the stores.
The kernels call no @triton.jit function, not even Triton's own (tl.cdiv, tl.sum, tl.zeros): triton_ops.py rebuilds them for
Triton's interpreter when TRITON_INTERPRET=1 is set after Triton was imported, and a jit function compiled for the GPU
cannot be called from an interpreted kernel.

Pointer strides: q, k (B, H, T, D) and v, o, do (B, H, T, Dv) take their (b, h, t) strides as arguments (the last dim
is contiguous); states (B, H, D, Dv) and the partial-gradient buffers are contiguous.
"""

import triton
import triton.language as tl


@triton.jit
def lightning_fwd_kernel(q, k, v, slopes, s0, o, s_final,
                         sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t, T,
                         H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                         BV: tl.constexpr, HAS_S0: tl.constexpr, PRECISION: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    state_ptrs = i_bh * D * DV + offs_d[:, None] * DV + offs_v[None, :]  # (BD, BV)
    state_mask = mask_d[:, None] & mask_v[None, :]
    if HAS_S0:
        S = tl.load(s0 + state_ptrs, mask=state_mask, other=0.0).to(ACC)  # (BD, BV)
    else:
        S = tl.full([BD, BV], 0.0, ACC)
    pos = offs_c.to(ACC)
    dist = pos[:, None] - pos[None, :]  # (BC, BC)
    M = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)
    qd = tl.exp(-lam * (pos + 1.0))  # (BC,)
    for n in range(0, (T + BC - 1) // BC):
        t = n * BC + offs_c
        mask_t = t < T
        c = tl.minimum(T - n * BC, BC).to(ACC)
        kd = tl.where(mask_t, tl.exp(-lam * tl.maximum(c - 1.0 - pos, 0.0)), 0.0)
        cd = tl.exp(-lam * c)
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
        S = cd * S + tl.dot(tl.trans(kb), vb * kd[:, None], input_precision=PRECISION)
    tl.store(s_final + state_ptrs, S, mask=state_mask)


@triton.jit
def lightning_bwd_dq_kernel(k, v, do, slopes, s0, dq_part,
                            sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, T,
                            B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr,
                            BD: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, PRECISION: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    state_mask = mask_d[:, None] & mask_v[None, :]
    if HAS_S0:
        S = tl.load(s0 + i_bh * D * DV + offs_d[:, None] * DV + offs_v[None, :], mask=state_mask, other=0.0).to(ACC)
    else:
        S = tl.full([BD, BV], 0.0, ACC)
    pos = offs_c.to(ACC)
    dist = pos[:, None] - pos[None, :]
    M = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)  # (BC, BC)
    qd = tl.exp(-lam * (pos + 1.0))
    dq_base = dq_part + (i_v * B * H + i_bh) * T * D  # this program's (T, D) slice of (NV, B, H, T, D)
    for n in range(0, (T + BC - 1) // BC):
        t = n * BC + offs_c
        mask_t = t < T
        c = tl.minimum(T - n * BC, BC).to(ACC)
        kd = tl.where(mask_t, tl.exp(-lam * tl.maximum(c - 1.0 - pos, 0.0)), 0.0)
        cd = tl.exp(-lam * c)
        kb = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :],
                     mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(ACC)  # (BC, BD)
        vb = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_v[None, :],
                     mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(ACC)  # (BC, BV)
        dob = tl.load(do + i_b * sdo_b + i_h * sdo_h + t[:, None] * sdo_t + offs_v[None, :],
                      mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(ACC)  # (BC, BV)
        dP = tl.dot(dob, tl.trans(vb), input_precision=PRECISION) * M  # (BC, BC)
        dqb = tl.dot(dP, kb, input_precision=PRECISION) + qd[:, None] * tl.dot(dob, tl.trans(S),
                                                                             input_precision=PRECISION)
        tl.store(dq_base + t[:, None] * D + offs_d[None, :], dqb, mask=mask_t[:, None] & mask_d[None, :])
        S = cd * S + tl.dot(tl.trans(kb), vb * kd[:, None], input_precision=PRECISION)


@triton.jit
def lightning_bwd_dkv_kernel(q, k, v, do, slopes, ds_final, dk_part, dv, ds0,
                             sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, T,
                             B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BC: tl.constexpr,
                             BD: tl.constexpr, BV: tl.constexpr, HAS_DS: tl.constexpr, PRECISION: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    lam = tl.load(slopes + i_h)
    ACC = slopes.dtype.element_ty
    offs_c, offs_d = tl.arange(0, BC), tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d, mask_v = offs_d < D, offs_v < DV
    state_ptrs = i_bh * D * DV + offs_d[:, None] * DV + offs_v[None, :]  # (BD, BV)
    state_mask = mask_d[:, None] & mask_v[None, :]
    if HAS_DS:
        G = tl.load(ds_final + state_ptrs, mask=state_mask, other=0.0).to(ACC)  # (BD, BV)
    else:
        G = tl.full([BD, BV], 0.0, ACC)
    pos = offs_c.to(ACC)
    dist = pos[:, None] - pos[None, :]
    M = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)  # (BC, BC)
    qd = tl.exp(-lam * (pos + 1.0))
    dk_base = dk_part + (i_v * B * H + i_bh) * T * D
    dv_base = dv + i_bh * T * DV
    N = (T + BC - 1) // BC
    for i in range(0, N):
        n = N - 1 - i
        t = n * BC + offs_c
        mask_t = t < T
        c = tl.minimum(T - n * BC, BC).to(ACC)
        kd = tl.where(mask_t, tl.exp(-lam * tl.maximum(c - 1.0 - pos, 0.0)), 0.0)
        cd = tl.exp(-lam * c)
        mask_td, mask_tv = mask_t[:, None] & mask_d[None, :], mask_t[:, None] & mask_v[None, :]
        qb = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :], mask=mask_td,
                     other=0.0).to(ACC)  # (BC, BD)
        kb = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :], mask=mask_td,
                     other=0.0).to(ACC)  # (BC, BD)
        vb = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_v[None, :], mask=mask_tv,
                     other=0.0).to(ACC)  # (BC, BV)
        dob = tl.load(do + i_b * sdo_b + i_h * sdo_h + t[:, None] * sdo_t + offs_v[None, :], mask=mask_tv,
                      other=0.0).to(ACC)  # (BC, BV)
        P = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * M  # (BC, BC)
        dP = tl.dot(dob, tl.trans(vb), input_precision=PRECISION) * M  # (BC, BC)
        dvb = tl.dot(tl.trans(P), dob, input_precision=PRECISION) + kd[:, None] * tl.dot(
            kb, G, input_precision=PRECISION)  # (BC, BV)
        dkb = tl.dot(tl.trans(dP), qb, input_precision=PRECISION) + kd[:, None] * tl.dot(
            vb, tl.trans(G), input_precision=PRECISION)  # (BC, BD)
        tl.store(dv_base + t[:, None] * DV + offs_v[None, :], dvb, mask=mask_tv)
        tl.store(dk_base + t[:, None] * D + offs_d[None, :], dkb, mask=mask_td)
        G = cd * G + tl.dot(tl.trans(qb), dob * qd[:, None], input_precision=PRECISION)
    tl.store(ds0 + state_ptrs, G, mask=state_mask)


@triton.jit
def lightning_recurrent_kernel(q, k, v, slopes, s0, o, s_final,
                               sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t, T,
                               H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                               BV: tl.constexpr, HAS_S0: tl.constexpr, PRECISION: tl.constexpr):
    """S_t = exp(-lam) S_{t-1} + k_t^T v_t, o_t = q_t S_t, token by token (decoding: T is 1 or a few).

    q_t S_t is a tl.dot of a 16-row tile whose row 0 is q_t and the others zero (tl.dot's minimum; tl.sum is a jit
    function, see the module docstring); only row 0 is stored."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
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
