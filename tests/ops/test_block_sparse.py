"""Block-sparse (MoBA) attention: the fast path against the dense block-masked reference, in float64."""

import pytest
import torch
import torch.nn.functional as F

from minimax_gpt.ops.block_sparse import (
    add_block_sums,
    block_mask,
    block_means,
    block_sparse_attention,
    block_sparse_attention_naive,
    select_blocks,
)


def qkv(B, H, Hkv, T, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(True) for t in (q, k, v)]


CASES = {  # name: (B, H, Hkv, T, D, block, top_k)
    "multiple_of_block": (2, 2, 2, 32, 8, 4, 2),
    "ragged_tail": (2, 4, 4, 37, 8, 5, 2),
    "gqa": (2, 4, 2, 29, 8, 4, 3),
    "mqa": (1, 3, 1, 26, 4, 3, 1),
    "top_k_above_earlier_blocks": (1, 2, 2, 16, 4, 4, 5),
    "shorter_than_a_block": (1, 2, 1, 9, 4, 16, 2),
    "one_token": (1, 2, 2, 1, 4, 4, 2),
}


@pytest.mark.parametrize("kernel", ["fused", "bmm"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_equals_reference_outputs_and_gradients(name, kernel):
    B, H, Hkv, T, D, block, top_k = CASES[name]
    q, k, v = qkv(B, H, Hkv, T, D)
    ref = block_sparse_attention_naive(q, k, v, block, top_k)
    out = block_sparse_attention(q, k, v, block, top_k, kernel=kernel)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    grad = torch.randn_like(ref)
    for g_fast, g_ref, n in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad),
                                "qkv"):
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-10, msg=f"d{n}")


def test_float32_fast_path_close_to_reference():
    q, k, v = qkv(1, 4, 2, 70, 16, dtype=torch.float32)
    torch.testing.assert_close(block_sparse_attention(q, k, v, 8, 2), block_sparse_attention_naive(q, k, v, 8, 2),
                               rtol=1e-5, atol=1e-5)


def test_reference_is_dense_causal_when_every_earlier_block_fits_in_top_k():
    q, k, v = qkv(2, 4, 2, 23, 8)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(block_sparse_attention_naive(q, k, v, 4, 5), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(block_sparse_attention(q, k, v, 4, 5), dense, rtol=0, atol=1e-12)


def test_reference_in_query_chunks_equals_all_at_once():
    q, k, v = qkv(1, 2, 2, 40, 4)
    torch.testing.assert_close(block_sparse_attention_naive(q, k, v, 4, 2, query_chunk=7),
                               block_sparse_attention_naive(q, k, v, 4, 2), rtol=0, atol=1e-14)


def test_gate_picks_the_blocks_whose_mean_key_matches_the_query():
    # 4 blocks of 2 keys; block 2's mean key is e0, block 1's is e1, block 0's is -e0; the query is e0 + 0.5 e1
    k = torch.tensor([[-1.0, 0], [-1, 0], [0, 1], [0, 1], [1, 0], [1, 0], [0, 0], [0, 0]])[None, None]
    means = block_means(k, 2)
    torch.testing.assert_close(means[0, 0], torch.tensor([[-1.0, 0], [0, 1], [1, 0], [0, 0]]))
    q = torch.tensor([1.0, 0.5]).expand(1, 1, 8, 2)
    selected = select_blocks(q, means, (torch.arange(8) // 2)[None], top_k=2)  # (1, 1, 8, 2)
    assert selected[0, 0, 7].tolist() == [2, 1]  # the last query (block 3) takes blocks 2 and 1, not 0
    assert selected[0, 0, 3].tolist() == [0, -1]  # block 1's queries have one earlier block
    assert selected[0, 0, 0].tolist() == [-1, -1]
    mask = block_mask(selected, (torch.arange(8) // 2)[None], (torch.arange(8) // 2)[None])[0, 0]  # (T, S)
    assert mask[7].tolist() == [False, False, True, True, True, True, True, True]  # blocks 1, 2 and its own (3)
    assert mask[2].tolist() == [True, True, True, True, False, False, False, False]


def test_gate_is_per_query_head_with_shared_kv_heads():
    q, k, _ = qkv(1, 4, 2, 24, 8)
    blocks = (torch.arange(24) // 4)[None]
    sel = select_blocks(q, block_means(k, 4), blocks, 2)
    for h in range(4):  # head h reads kv head h // 2
        alone = select_blocks(q[:, h : h + 1], block_means(k[:, h // 2 : h // 2 + 1], 4), blocks, 2)
        assert torch.equal(sel[:, h : h + 1], alone)


def test_block_sums_follow_positions_so_left_padding_changes_nothing():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64)
    pad = 3
    padded = torch.cat((torch.randn(1, 2, pad, 3, generator=g, dtype=torch.float64), k), dim=2)
    valid = torch.tensor([[False] * pad + [True] * 7])
    positions = torch.tensor([[0] * pad + list(range(7))])
    sums = add_block_sums(torch.zeros(1, 2, 3, 3, dtype=torch.float64), padded, positions, valid, 3)
    expect = add_block_sums(torch.zeros(1, 2, 3, 3, dtype=torch.float64), k, torch.arange(7)[None], None, 3)
    torch.testing.assert_close(sums, expect, rtol=0, atol=0)
    torch.testing.assert_close(expect[:, :, :2] / 3, block_means(k, 3), rtol=0, atol=1e-15)


def test_bad_arguments_raise():
    q, k, v = qkv(1, 2, 2, 8, 4)
    with pytest.raises(ValueError, match="kernel"):
        block_sparse_attention(q, k, v, 4, 1, kernel="triton")
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, 0, 1)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        block_sparse_attention(q, k[:, :, :5], v[:, :, :5], 4, 1)
