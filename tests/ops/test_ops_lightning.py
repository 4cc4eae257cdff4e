"""Lightning attention ops: chunked and recurrent against the float64 quadratic oracle, and against transformers."""

import pytest
import torch

from minimax_gpt.ops import (
    lightning_attn_chunked,
    lightning_attn_chunked_packed,
    lightning_attn_naive,
    lightning_attn_recurrent,
    lightning_slopes,
)

F64 = torch.float64
# Decay rates spanning fast (exp(-1) per token) to almost none, so every decay term matters.
SLOPES = torch.tensor([1.0, 0.3, 0.02, 1e-4], dtype=F64)
B, H, D, DV = 2, 4, 6, 5  # D != Dv on purpose


def make_inputs(T, dtype=F64, with_state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, H, T, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, H, T, DV, generator=g, dtype=F64).to(dtype)
    s0 = torch.randn(B, H, D, DV, generator=g, dtype=F64) if with_state else None
    return q, k, v, s0


def run_with_grads(fn, q, k, v, s0, **kw):
    """Output, final state and the gradients of a fixed random loss w.r.t. q, k, v (and s0)."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    if s0 is not None:
        leaves.append(s0.clone().requires_grad_(True))
    init = leaves[3] if s0 is not None else None
    out, state = fn(*leaves[:3], SLOPES, init, **kw)
    g = torch.Generator().manual_seed(1)

    def weights(t):  # the same values in every dtype: bf16-representable random numbers
        return torch.randn(t.shape, generator=g, dtype=F64).bfloat16().to(t.dtype)

    loss = (out * weights(out)).sum() + (state * weights(state)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), state.detach(), grads


def assert_exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64, 65, 130, 300])
def test_fast_paths_match_oracle_fp64(T, with_state):
    q, k, v, s0 = make_inputs(T, with_state=with_state)
    ref_out, ref_state, ref_grads = run_with_grads(lightning_attn_naive, q, k, v, s0)
    candidates = [
        (lightning_attn_chunked, {"chunk_size": c, "backward": bw})
        for c in (16, 64, 256)
        for bw in ("fused", "autograd")
    ]
    candidates.append((lightning_attn_recurrent, {}))
    for fn, kw in candidates:
        out, state, grads = run_with_grads(fn, q, k, v, s0, **kw)
        assert out.dtype == F64 and state.dtype == F64
        assert out.shape == (B, H, T, DV) and state.shape == (B, H, D, DV)
        assert_exact(out, ref_out)
        assert_exact(state, ref_state)
        assert len(grads) == len(ref_grads)
        for grad, ref_grad in zip(grads, ref_grads):
            assert_exact(grad, ref_grad)


def test_fused_backward_gradcheck():
    """The hand-written backward against finite differences: two full chunks, a partial one, initial state."""
    q, k, v, s0 = (t[:1, :2] for t in make_inputs(10))  # B=1, H=2: keep the Jacobian small
    slopes = SLOPES[:2]
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s0)]

    def fn(q, k, v, s0):
        return lightning_attn_chunked(q, k, v, slopes, s0, chunk_size=4)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("use", ["out", "state"])
def test_fused_backward_with_one_output_unused(use):
    """Autograd hands the backward None for an unused output; the other's gradient must still be exact."""
    q, k, v, s0 = make_inputs(40)
    grads = {}
    for bw in ("fused", "autograd"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s0)]
        out, state = lightning_attn_chunked(*leaves[:3], SLOPES, leaves[3], chunk_size=16, backward=bw)
        (out if use == "out" else state).square().sum().backward()
        # Autograd leaves .grad at None for an input the used output does not depend on (q for the state).
        grads[bw] = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    for fused, ref in zip(grads["fused"], grads["autograd"]):
        assert_exact(fused, ref)


def test_fused_many_segments_and_strided_views():
    """A long input the fused path cuts into several cache-sized segments, passed as the layer passes it:
    non-contiguous views of one (B, T, H, 3D) tensor. Output, state and gradients equal the oracle's."""
    Bs, Hs, Ds, T = 1, 8, 64, 1100  # 512-token segments at chunk 16, and a partial last chunk
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(Bs, T, Hs, 3 * Ds, generator=g, dtype=F64) * 0.3
    s0 = torch.randn(Bs, Hs, Ds, Ds, generator=g, dtype=F64)
    slopes = lightning_slopes(Hs, 0, 4).double()
    results = []
    for fn, kw in ((lightning_attn_naive, {}), (lightning_attn_chunked, {"chunk_size": 16})):
        qkv_leaf, s0_leaf = qkv.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        q, k, v = qkv_leaf.transpose(1, 2).split(Ds, dim=-1)  # 3 x (B, H, T, D), non-contiguous views
        out, state = fn(q, k, v, slopes, s0_leaf, **kw)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum() + (state * s0).sum()
        loss.backward()
        results.append((out.detach(), state.detach(), qkv_leaf.grad, s0_leaf.grad))
    assert not q.is_contiguous()
    for actual, expected in zip(*reversed(results)):
        assert_exact(actual, expected)


def test_fused_no_grad_path_equals_grad_path():
    q, k, v, s0 = make_inputs(70)
    with torch.no_grad():
        out_ng, state_ng = lightning_attn_chunked(q, k, v, SLOPES, s0, chunk_size=16)
    out, state = lightning_attn_chunked(q.requires_grad_(True), k, v, SLOPES, s0, chunk_size=16)
    assert out.requires_grad and not out_ng.requires_grad
    torch.testing.assert_close(out_ng, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(state_ng, state.detach(), rtol=0, atol=0)


def test_slopes_gradient_only_through_autograd_backward():
    q, k, v, s0 = make_inputs(20)
    slopes = SLOPES.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="slopes"):
        lightning_attn_chunked(q, k, v, slopes, s0, chunk_size=8)
    with torch.no_grad():  # nothing is differentiated, so nothing to refuse
        lightning_attn_chunked(q, k, v, slopes, s0, chunk_size=8)
    grads = []
    for fn, kw in ((lightning_attn_naive, {}), (lightning_attn_chunked, {"chunk_size": 8, "backward": "autograd"})):
        out, state = fn(q, k, v, slopes, s0, **kw)
        grads.append(torch.autograd.grad(out.sum() + state.sum(), slopes)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


def test_oracle_matches_recurrence_written_out():
    """The oracle itself against S_t = exp(-lam) S_{t-1} + k_t^T v_t, o_t = q_t S_t, one head by hand."""
    q, k, v, s0 = make_inputs(9)
    out, state = lightning_attn_naive(q, k, v, SLOPES, s0)
    b, h = 1, 2
    S = s0[b, h].clone()
    for t in range(9):
        S = torch.exp(-SLOPES[h]) * S + torch.outer(k[b, h, t], v[b, h, t])
        assert_exact(out[b, h, t], q[b, h, t] @ S)
    assert_exact(state[b, h], S)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64, 1000])
def test_split_sequence_equals_full(chunk_size):
    q, k, v, s0 = make_inputs(100)
    full_out, full_state = lightning_attn_chunked(q, k, v, SLOPES, s0, chunk_size=chunk_size)
    cut = 37
    out1, state1 = lightning_attn_chunked(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], SLOPES, s0, chunk_size=chunk_size)
    out2, state2 = lightning_attn_chunked(
        q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], SLOPES, state1, chunk_size=chunk_size
    )
    assert_exact(torch.cat([out1, out2], dim=2), full_out)
    assert_exact(state2, full_state)


def test_prefill_then_decode_equals_full():
    q, k, v, _ = make_inputs(50)
    full_out, full_state = lightning_attn_chunked(q, k, v, SLOPES, chunk_size=16)
    out, state = lightning_attn_chunked(q[:, :, :40], k[:, :, :40], v[:, :, :40], SLOPES, chunk_size=16)
    outs = [out]
    for t in range(40, 50):
        o, state = lightning_attn_recurrent(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], SLOPES, state)
        outs.append(o)
    assert_exact(torch.cat(outs, dim=2), full_out)
    assert_exact(state, full_state)


def test_fp32_matches_oracle():
    q, k, v, s0 = make_inputs(130, dtype=torch.float32)
    s0 = s0.float()
    ref_out, ref_state = lightning_attn_naive(q.double(), k.double(), v.double(), SLOPES, s0.double())
    for fn, kw in ((lightning_attn_chunked, {"chunk_size": 64}), (lightning_attn_recurrent, {})):
        out, state = fn(q, k, v, SLOPES.float(), s0, **kw)
        assert out.dtype == torch.float32 and state.dtype == torch.float32
        # float32 unit roundoff is 6e-8; sums of ~100 O(1) terms stay well within 1e-5 of the scale.
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 * ref_out.abs().max().item())
        torch.testing.assert_close(state.double(), ref_state, rtol=1e-5, atol=1e-5 * ref_state.abs().max().item())


@pytest.mark.parametrize("backward", ["fused", "autograd"])
def test_bf16_gradients(backward):
    """bf16 q, k, v with a float32 initial state: gradients in the leaves' dtypes, float32-accurate before the
    final rounding of dq, dk, dv to bf16 (8 significant bits: relative error <= 2^-8)."""
    q, k, v, s0 = make_inputs(130, dtype=torch.bfloat16)
    s0 = s0.float()
    _, _, ref_grads = run_with_grads(lightning_attn_naive, q.double(), k.double(), v.double(), s0.double())
    out, state, grads = run_with_grads(lightning_attn_chunked, q, k, v, s0, chunk_size=16, backward=backward)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32]
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=2**-8, atol=1e-5 * ref.abs().max().item())
    # The initial-state gradient never passes through bf16.
    torch.testing.assert_close(grads[3].double(), ref_grads[3], rtol=1e-5, atol=1e-5 * ref_grads[3].abs().max().item())


@pytest.mark.parametrize("T", [65, 130])
def test_bf16_inputs_keep_float32_state(T):
    q, k, v, s0 = make_inputs(T, dtype=torch.bfloat16)
    s0 = s0.float()
    out, state = lightning_attn_chunked(q, k, v, SLOPES.float(), s0, chunk_size=16)
    assert out.dtype == torch.bfloat16
    assert state.dtype == torch.float32
    # Oracle on the very same (bf16-rounded) inputs, in float64.
    ref_out, ref_state = lightning_attn_naive(q.double(), k.double(), v.double(), SLOPES, s0.double())
    # The output is rounded once to bf16 (8 significant bits: relative error <= 2^-9); the float32
    # arithmetic before it adds ~1e-6 of the output scale.
    torch.testing.assert_close(out.double(), ref_out, rtol=2**-8, atol=1e-5 * ref_out.abs().max().item())
    # The state never passes through bf16, so it is float32-accurate: 2^-8 would hide a bf16 state.
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-5, atol=1e-5 * ref_state.abs().max().item())
    assert (state.double() - ref_state).abs().max() < 1e-3 * 2**-8 * ref_state.abs().max()


def test_empty_sequence_passes_state_through():
    q, k, v, s0 = make_inputs(0)
    for fn in (lightning_attn_naive, lightning_attn_chunked, lightning_attn_recurrent):
        out, state = fn(q, k, v, SLOPES, s0)
        assert out.shape == (B, H, 0, DV)
        assert_exact(state, s0)


def test_input_validation():
    q, k, v, s0 = make_inputs(8)
    bad_calls = [
        ((q[0], k, v, SLOPES), {}),  # rank 3
        ((q, k[:, :, :4], v, SLOPES), {}),  # T mismatch
        ((q, k, v[:, :2], SLOPES), {}),  # H mismatch in v
        ((q, k, v, SLOPES[:2]), {}),  # slopes shape
        ((q, k, v, SLOPES, s0[..., :2]), {}),  # state shape
        ((q, k.float(), v, SLOPES), {}),  # mixed dtypes
    ]
    for fn in (lightning_attn_naive, lightning_attn_chunked, lightning_attn_recurrent):
        for args, kw in bad_calls:
            with pytest.raises(ValueError):
                fn(*args, **kw)
    for chunk_size in (0, -1, 2.0):
        with pytest.raises(ValueError, match="chunk_size"):
            lightning_attn_chunked(q, k, v, SLOPES, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="backward"):
        lightning_attn_chunked(q, k, v, SLOPES, backward="triton")


# --- against transformers' MiniMaxLightningAttention ------------------------------------------------

def hf_layer(n_head, n_layer, layer_idx, head_dim=4, block_size=16):
    """transformers' lightning layer; the tests that call it (and only those) skip without transformers."""
    pytest.importorskip("transformers", reason="transformers is not installed (extra [hf])")
    modeling = pytest.importorskip("transformers.models.minimax.modeling_minimax",
                                   reason="this transformers has no MiniMax model")
    config = modeling.MiniMaxConfig(
        hidden_size=n_head * head_dim,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        head_dim=head_dim,
        num_hidden_layers=n_layer,
        intermediate_size=16,
        num_local_experts=2,
        block_size=block_size,
    )
    return modeling.MiniMaxLightningAttention(config, layer_idx)


@pytest.mark.parametrize(
    "n_head, n_layer, layer_idx",
    [(4, 4, 0), (4, 4, 1), (4, 4, 3), (8, 8, 5), (64, 80, 0), (64, 80, 45), (64, 80, 79), (6, 1, 0)],
)
def test_slopes_match_transformers(n_head, n_layer, layer_idx):
    ours = lightning_slopes(n_head, layer_idx, n_layer)
    assert ours.dtype == torch.float32 and ours.shape == (n_head,)
    layer = hf_layer(n_head, n_layer, layer_idx)
    # Their get_slope_rate evaluates in the default dtype. In float64 it is the exact formula, and ours
    # must be that value rounded to float32 (within one float32 ulp, 2^-23 relative).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        theirs64 = layer.get_slope_rate().flatten()
    finally:
        torch.set_default_dtype(previous)
    assert theirs64.dtype == F64
    torch.testing.assert_close(ours.double(), theirs64, rtol=2**-23, atol=0)
    # Their float32 buffer raises a float32-rounded base to the power h+1, so its error grows to about
    # (h + 2) float32 ulps; ours is the correctly rounded value, hence this wider bound.
    theirs32 = layer.slope_rate.flatten()
    torch.testing.assert_close(ours, theirs32, rtol=(n_head + 2) * 2**-24, atol=0)


def test_slopes_validation():
    for args in ((0, 0, 4), (4, 4, 4), (4, -1, 4), (4, 0, 0)):
        with pytest.raises(ValueError):
            lightning_slopes(*args)


@pytest.mark.parametrize("T", [48, 37])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_matches_transformers_block_loop(T, chunk_size):
    """Core output and final state of our op equal transformers' block loop on the same q, k, v."""
    torch.manual_seed(0)
    layer = hf_layer(n_head=4, n_layer=4, layer_idx=1, head_dim=4, block_size=16).double()
    # Their decay buffers were computed in float32 at init; recompute them in float64 so the
    # comparison tests the algorithm, not float32 rounding of their buffers.
    query_decay, key_decay, diagonal_decay = layer.decay_factors(layer.slope_rate)
    layer.query_decay, layer.key_decay, layer.diagonal_decay = query_decay, key_decay, diagonal_decay

    captured = {}
    layer.norm.register_forward_pre_hook(lambda mod, args: captured.setdefault("core", args[0]))
    x = torch.randn(2, T, layer.num_attention_heads * layer.head_dim, dtype=F64)
    with torch.no_grad():
        _, their_state = layer(x, position_embeddings=None, attention_mask=None)
        qkv = torch.nn.functional.silu(layer.qkv_proj(x))  # (B, T, H*3*D), head-major [q_h | k_h | v_h]
    qkv = qkv.view(2, T, layer.num_attention_heads, 3 * layer.head_dim).transpose(1, 2)  # (B, H, T, 3D)
    q, k, v = qkv.split(layer.head_dim, dim=-1)  # each (B, H, T, D)
    slopes = layer.slope_rate.flatten()  # (H,)
    out, state = lightning_attn_chunked(q, k, v, slopes, chunk_size=chunk_size)
    their_core = captured["core"].view(2, T, layer.num_attention_heads, layer.head_dim).transpose(1, 2)
    assert_exact(out, their_core)
    assert_exact(state, their_state)


@pytest.mark.parametrize("backward", ["fused", "autograd"])
def test_autocast_does_not_change_the_op(backward):
    """Under bf16 autocast the op keeps its own float32 arithmetic: same output, state and gradients as without."""
    q, k, v, s0 = (t.float() if t is not None else None for t in make_inputs(70, with_state=True))
    results = []
    for autocast in (False, True):
        qq, kk, vv, ss = (t.detach().clone().requires_grad_() for t in (q, k, v, s0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, state = lightning_attn_chunked(qq, kk, vv, SLOPES.float(), ss, chunk_size=16, backward=backward)
            rec, rec_state = lightning_attn_recurrent(qq, kk, vv, SLOPES.float(), ss)
        (out.sum() + state.sum() + rec.sum()).backward()
        results.append((out, state, rec, rec_state, qq.grad, kk.grad, vv.grad, ss.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def square_inputs(T, dtype, with_state):
    """make_inputs with Dv == D, as packing needs: v and the state get D columns."""
    q, k, _, _ = make_inputs(T, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(q.shape, generator=g, dtype=F64).to(dtype)
    s0 = torch.randn(B, H, D, D, generator=g, dtype=F64) if with_state else None
    return q, k, v, s0


def packed(q, k, v, slopes, initial_state=None, chunk_size=64):
    """The packed op called as the layer calls it: q, k, v side by side in a (B, T, H, 3D) tensor, viewed as
    (B, H, T, 3D). Gradients reach q, k, v through the concatenation."""
    qkv = torch.cat([q, k, v], dim=-1).transpose(1, 2).contiguous().transpose(1, 2)
    out, state = lightning_attn_chunked_packed(qkv, slopes, initial_state, chunk_size=chunk_size)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) in memory: the layer's reshape is a view
    return out, state


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("chunk_size", [16, 64, 256])
def test_packed_matches_oracle_fp64(T, with_state, chunk_size):
    q, k, v, s0 = square_inputs(T, F64, with_state)
    ref = run_with_grads(lightning_attn_naive, q, k, v, s0)
    got = run_with_grads(packed, q, k, v, s0, chunk_size=chunk_size)
    for a, e in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        assert_exact(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_unpacked(dtype):
    """Same arithmetic as lightning_attn_chunked on separate q, k, v: equal outputs, states and gradients, with and
    without grad, in float32 and bf16 (where the gradients come back in bf16)."""
    q, k, v, s0 = square_inputs(300, dtype, True)
    ref = run_with_grads(lightning_attn_chunked, q, k, v, s0, chunk_size=64)
    got = run_with_grads(packed, q, k, v, s0, chunk_size=64)
    for a, e in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    with torch.no_grad():
        out, state = packed(q, k, v, SLOPES, s0, chunk_size=64)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(state, ref[1], rtol=0, atol=0)


def test_packed_input_validation():
    qkv = torch.randn(1, 2, 5, 7)
    with pytest.raises(ValueError, match="3D"):
        lightning_attn_chunked_packed(qkv, torch.ones(2))
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attn_chunked_packed(torch.randn(1, 2, 5, 6), torch.ones(2), chunk_size=0)
    with pytest.raises(ValueError, match="slopes"):
        lightning_attn_chunked_packed(torch.randn(1, 2, 5, 6), torch.ones(3))


def test_packed_refuses_slopes_gradient_only_when_differentiating():
    qkv, slopes = torch.randn(1, 2, 5, 6), SLOPES[:2].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="slopes"):
        lightning_attn_chunked_packed(qkv, slopes)
    with pytest.raises(ValueError, match="slopes"):
        lightning_attn_chunked_packed(qkv.requires_grad_(True), slopes)
    with torch.no_grad():  # nothing is differentiated: the same values as with plain slopes
        out, state = lightning_attn_chunked_packed(qkv, slopes)
        ref = lightning_attn_chunked_packed(qkv, slopes.detach())
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(state, ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("T", [0, 5, 37])
def test_custom_ops_pass_opcheck(T):
    """The fused forward/backward are torch.library custom ops (torch.compile calls them instead of tracing the
    segment loop): opcheck tests their schema, fake (meta) functions, autograd registration and, with dynamic
    shapes, that the fake outputs match the real ones; with states kept (a backward follows) and without."""
    B, H, D, C = 2, 3, 8, 16
    g = torch.Generator().manual_seed(T)
    slopes = lightning_slopes(H, 0, 4)
    for init in (None, torch.randn(B, H, D, D, generator=g)):
        for keep in (True, False):
            qkv = torch.randn(B, T, H, 3 * D, generator=g).transpose(1, 2).requires_grad_(keep)
            s0 = None if init is None else init.clone().requires_grad_(keep)
            torch.library.opcheck(torch.ops.minimax_gpt.lightning_chunked_packed.default, (qkv, slopes, s0, C, keep))
            q, k, v = (t.detach().contiguous().requires_grad_(keep) for t in qkv.split(D, dim=-1))
            torch.library.opcheck(torch.ops.minimax_gpt.lightning_chunked.default, (q, k, v, slopes, s0, C, keep))


def test_custom_op_refuses_a_backward_without_kept_states():
    qkv = torch.randn(1, 2, 5, 12).requires_grad_(True)
    with pytest.raises(ValueError, match="keep_states"):
        torch.ops.minimax_gpt.lightning_chunked_packed(qkv, SLOPES[:2].float(), None, 4, False)
