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
from minimax_gpt.ops.block_sparse_tiles import _buckets, _query_split, block_sparse_tiles, plan_tiles


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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("call_cost", [0, 64, 10**9])  # a bucket per distinct count, a few, one for all tiles
@pytest.mark.parametrize("kernel", ["fused", "bmm"])
def test_any_bucketing_and_query_split_equals_reference(kernel, call_cost, threads):
    # tiles of up to 616 queries (block 0 is chosen by most): on two threads a bucket of 4 such tiles (call_cost 64)
    # runs as 2 chunks of 308 each, and a bucket of one tile is always split
    B, H, Hkv, T, D, block, top_k = 1, 2, 1, 1203, 4, 64, 4
    q, k, v = qkv(B, H, Hkv, T, D)
    ref = block_sparse_attention_naive(q, k, v, block, top_k)
    selected = select_blocks(q, block_means(k, block), (torch.arange(T) // block)[None], top_k)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = block_sparse_tiles(q, k, v, selected, block, D ** -0.5, kernel == "fused", call_cost=call_cost)
        grad = torch.randn_like(ref)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for g_fast, g_ref, n in zip(grads, torch.autograd.grad(ref, (q, k, v), grad), "qkv"):
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-10, msg=f"d{n}")


def test_plan_puts_every_chosen_pair_in_its_own_slot_of_its_tile():
    B, H, T, block, top_k = 2, 3, 50, 5, 3
    q, k, _ = qkv(B, H, H, T, 4)
    selected = select_blocks(q, block_means(k, block), (torch.arange(T) // block)[None], top_k)  # (B, H, T, K)
    plan = plan_tiles(selected, block, call_cost=8)
    R, P = B * H, plan.rows.numel()
    choice = selected.permute(2, 0, 1, 3).reshape(T * R, top_k)  # (T * R, K), query row t * R + r
    slots = plan.pair_slots.t()  # (T * R, K)
    chosen = choice >= 0
    assert torch.equal(slots[~chosen], torch.full_like(slots[~chosen], P))  # no choice: the extra zero slot
    used = slots[chosen]
    assert used.unique().numel() == used.numel()  # one slot per pair
    rows = torch.arange(T * R)[:, None].expand(T * R, top_k)[chosen]
    assert torch.equal(plan.rows[used], rows) and torch.equal(plan.lse_rows[used], rows)
    padding = torch.ones(P, dtype=torch.bool)
    padding[used] = False
    assert torch.equal(plan.lse_rows[padding], torch.full_like(plan.lse_rows[padding], T * R))
    # the slot's bucket tile is (block, row) of the pair
    tile_of_slot = torch.empty(P, dtype=torch.long)
    for nb, L, first, g0 in plan.buckets:
        assert L % 8 == 0
        tile_of_slot[first : first + nb * L] = plan.tiles[g0 : g0 + nb].repeat_interleave(L)
    assert first + nb * L == P
    assert torch.equal(tile_of_slot[used], (choice * R + torch.arange(T * R)[:, None] % R)[chosen])
    assert torch.equal(plan.tile_places[plan.tiles], torch.arange(plan.tiles.numel()))


def test_buckets_minimise_padding_plus_call_cost():
    counts = [0, 100, 90, 10, 9, 0, 8]
    assert _buckets(counts, call_cost=0, max_slots=None) == [([1], 104), ([2], 96), ([3], 16), ([4], 16), ([6], 8)]
    assert _buckets(counts, call_cost=50, max_slots=None) == [([1, 2], 104), ([3, 4, 6], 16)]
    assert _buckets(counts, call_cost=10**6, max_slots=None) == [([1, 2, 3, 4, 6], 104)]
    assert _buckets(counts, call_cost=10**6, max_slots=250) == [([1, 2], 104), ([3, 4, 6], 16)]  # 2 x 100 <= 250
    assert _buckets(counts, call_cost=10**6, max_slots=50) == [([1], 104), ([2], 96), ([3, 4, 6], 16)]


def test_query_split_gives_every_call_two_parallel_items_and_long_chunks():
    assert _query_split(1, 8, threads=1) == 2  # a single (batch, head) would run its products multithreaded
    assert _query_split(1, 8, threads=2) == 2
    assert _query_split(3, 8, threads=2) == 1
    assert _query_split(1, 4096, threads=2) == 8  # 8 chunks of 512
    assert _query_split(1, 768, threads=2) == 2  # chunks of >= 256 only
    assert _query_split(16, 4096, threads=2) == 1  # 16 tiles already feed 4 chunks per thread


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
