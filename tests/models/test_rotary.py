import pytest
import torch

from minimax_gpt.models.rotary import AdaptiveXPos, RotaryEmbedding, apply_rotary, rope_reference, xpos_reference_scores


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_equals_plain_reference(rotary_dim):
    torch.manual_seed(0)
    T, D = 11, 16
    x = torch.randn(1, 1, T, D, dtype=torch.float64)
    pos = torch.arange(T)[None] + 3
    cos, sin = RotaryEmbedding(rotary_dim, 10000.0)(pos)
    out = apply_rotary(x, cos.double(), sin.double())
    ref = rope_reference(x[0, 0], pos[0], rotary_dim, 10000.0)
    torch.testing.assert_close(out[0, 0], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., rotary_dim:], x[..., rotary_dim:], rtol=0, atol=0)


def xpos_scores(xpos, rope, q, k, q_pos, k_pos):
    cos_q, sin_q = rope(q_pos[None])
    cos_k, sin_k = rope(k_pos[None])
    qs, ks = xpos.xpos_scales(q_pos[None], k_pos[None])
    qr = apply_rotary(q[None, None], cos_q, sin_q) * qs
    kr = apply_rotary(k[None, None], cos_k, sin_k) * ks
    return (qr @ kr.transpose(-1, -2))[0, 0]


def test_xpos_without_adaptation_equals_its_formula():
    torch.manual_seed(0)
    R = 8
    q, k = torch.randn(6, R), torch.randn(9, R)
    q_pos, k_pos = torch.arange(3, 9), torch.arange(9)
    xpos = AdaptiveXPos(R, 16.0, layer_idx=0, n_layer=1, trained_length=4, adapt=False)
    got = xpos_scores(xpos, RotaryEmbedding(R), q, k, q_pos, k_pos)
    ref = xpos_reference_scores(q, k, q_pos, k_pos, R, 10000.0, 16.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_xpos_scores_depend_on_distance_only():
    torch.manual_seed(0)
    R = 8
    q, k = torch.randn(5, R), torch.randn(5, R)
    xpos = AdaptiveXPos(R, 32.0, 0, 1, 64, adapt=False)
    rope = RotaryEmbedding(R)
    base = xpos_scores(xpos, rope, q, k, torch.arange(5), torch.arange(5))
    for shift in (7, 1000, 30000):
        shifted = xpos_scores(xpos, rope, q, k, torch.arange(5) + shift, torch.arange(5) + shift)
        torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)


def test_xpos_decays_with_distance():
    R = 8
    xpos = AdaptiveXPos(R, 16.0, 0, 1, 64, adapt=False)
    qs, ks = xpos.xpos_scales(torch.tensor([[100]]), torch.arange(101)[None])
    factor = (qs * ks)[0, 0]  # (S, R): the factor each key's score gets per dim
    assert torch.all(factor[1:] >= factor[:-1])  # nearer keys decay less
    torch.testing.assert_close(factor[-1], torch.ones(R))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapt", [False, True])
def test_xpos_finite_in_half_precision_at_32k(dtype, adapt):
    torch.manual_seed(0)
    R = 64
    xpos = AdaptiveXPos(R, 512.0, layer_idx=3, n_layer=4, trained_length=1024, adapt=adapt)
    q_pos = torch.arange(32760, 32768)[None]
    k_pos = torch.cat((torch.arange(0, 32768, 997), torch.arange(32760, 32768)))[None]
    qs, ks = xpos.xpos_scales(q_pos, k_pos)
    assert torch.isfinite(qs).all() and torch.isfinite(ks).all()
    q = torch.randn(1, 1, 8, R).to(dtype)
    k = torch.randn(1, 1, k_pos.shape[1], R).to(dtype)
    rope = RotaryEmbedding(R)
    cq, sq = rope(q_pos)
    ck, sk = rope(k_pos)
    scores = (apply_rotary(q, cq, sq).float() * qs) @ (apply_rotary(k, ck, sk).float() * ks).transpose(-1, -2)
    assert torch.isfinite(scores).all()
    assert torch.isfinite(scores.to(dtype)).all()


def test_adaptive_xpos_warp_and_depth():
    xpos = AdaptiveXPos(8, 100.0, layer_idx=2, n_layer=3, trained_length=50, adapt=True)
    assert xpos.gamma == pytest.approx(200.0)  # scale base doubles from the first to the last layer
    n = torch.tensor([10.0, 50.0, 100.0])
    torch.testing.assert_close(xpos.warp(n), torch.tensor([10.0, 50.0, 50.0 * (1 + torch.log(torch.tensor(2.0)))]))


def test_table_rows_equal_the_computed_angles():
    # the precomputed rows (positions < max_positions, served when the caller bounds the positions) are exactly what
    # the angles give; beyond the table, without a bound, or with a bound past it, the angles are computed
    rope = RotaryEmbedding(16, 10000.0, max_positions=64)
    pos = torch.tensor([[0, 1, 63, 5], [7, 7, 7, 40]])
    for got, want in zip(rope(pos, bound=64), rope.angles(pos)):
        assert got.shape == want.shape == (2, 1, 4, 16) and got.dtype == torch.float32
        assert torch.equal(got, want)
    far = torch.tensor([[100, 5000]])
    for got, want in zip(rope(far, bound=5001), rope.angles(far)):
        assert torch.equal(got, want)
    for got, want in zip(rope(pos.double().long()), rope.angles(pos)):
        assert torch.equal(got, want)
    assert "table" not in rope.state_dict()  # not in checkpoints
