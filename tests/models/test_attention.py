import pytest
import torch

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.models.attention import attention_math, repeat_kv
from minimax_gpt.models.context import causal_mask


@pytest.mark.parametrize("offset, T, padded", [(0, 9, False), (0, 9, True), (5, 1, False), (5, 4, True)])
def test_sdpa_equals_math_path(offset, T, padded):
    torch.manual_seed(0)
    B, H, D = 2, 4, 8
    S = offset + T
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    valid = None
    if padded:
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, :3] = False
    mask, is_causal = causal_mask(T, offset, valid, "cpu")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    math = attention_math(q, k, v, mask, is_causal)
    torch.testing.assert_close(sdpa, math, rtol=1e-5, atol=1e-6)
    # and both equal a loop over queries written from the definition
    for b in range(B):
        for t in range(T):
            keys = [s for s in range(offset + t + 1) if valid is None or valid[b, s] or s == offset + t]
            w = torch.softmax(q[b, :, t, None] @ k[b, :, keys].transpose(-1, -2) / D ** 0.5, dim=-1)  # (H, 1, S')
            torch.testing.assert_close(math[b, :, t], (w @ v[b, :, keys]).squeeze(1), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("name", ["dense_softmax", "gqa_partial_rope", "xpos"])
def test_model_flash_and_math_paths_agree(name):
    torch.manual_seed(0)
    fast = EnhancedMiniMaxGPT(tiny_config(name, use_flash_attn=True)).eval()
    slow = EnhancedMiniMaxGPT(tiny_config(name, use_flash_attn=False)).eval()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 61, (2, 17))
    mask = torch.ones(2, 17)
    mask[1, :6] = 0
    for m in (None, mask):
        torch.testing.assert_close(fast(ids, attention_mask=m).logits, slow(ids, attention_mask=m).logits,
                                   rtol=1e-5, atol=1e-5)


def test_repeat_kv_shares_heads_in_groups():
    x = torch.randn(1, 2, 3, 4)
    r = repeat_kv(x, 3)
    assert r.shape == (1, 6, 3, 4)
    for h in range(6):
        assert torch.equal(r[0, h], x[0, h // 3])


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_causal_attention_over_more_keys_than_queries_is_aligned_bottom_right(n_kv_head):
    """A sequence-parallel slice: T queries after S - T earlier keys, is_causal and no mask. SDPA (top-left by its
    own convention, shifted by leading zero queries) equals attention under an explicit bottom-right mask."""
    from minimax_gpt import MiniMaxConfig
    from minimax_gpt.models.attention import SoftmaxAttention

    torch.manual_seed(0)
    layer = SoftmaxAttention(MiniMaxConfig(n_embd=32, n_head=4, n_kv_head=n_kv_head, vocab_size=16), 0)
    T, S = 5, 12
    q = torch.randn(2, 4, T, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, n_kv_head, S, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fused = layer._attend(q, k, v, None, True)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query t sees keys 0 .. S - T + t
    n_rep = 4 // n_kv_head
    kr, vr = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ kr.transpose(-2, -1) / 8 ** 0.5).masked_fill(~mask, float("-inf"))  # float64 throughout
    want = scores.softmax(-1) @ vr
    torch.testing.assert_close(fused, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    grads = torch.autograd.grad((fused * g).sum(), (q, k, v))
    for got, ref in zip(grads, torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
