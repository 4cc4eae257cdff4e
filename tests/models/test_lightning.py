"""The lightning layer and its cache inside the model (the ops themselves: test_ops_lightning.py)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.models.context import build_context
from minimax_gpt.models.lightning import LightningAttention


def plain_lightning_layer(layer: LightningAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer written from the formula in fp64: per head, o_t = sum_{s<=t} exp(-lam (t-s)) (q_t.k_s) v_s."""
    H, D = layer.n_head, layer.head_dim
    x = x.double()
    W = {n: p.detach().double() for n, p in layer.named_parameters()}
    qkv = x @ W["qkv_proj.weight"].T  # (B, T, 3HD)
    B, T, _ = qkv.shape
    if "short_conv.weight" in W:  # y_t = sum_j w[:, j] * qkv_{t-K+1+j}, zeros before the first token
        w = W["short_conv.weight"]  # (3HD, K)
        K = w.shape[1]
        padded = torch.cat((qkv.new_zeros(B, K - 1, qkv.shape[2]), qkv), dim=1)
        qkv = sum(w[:, j] * padded[:, j:j + T] for j in range(K))
    qkv = F.silu(qkv)
    out = torch.zeros(B, T, H * D, dtype=torch.float64)
    for h in range(H):
        q, k, v = qkv[..., h * 3 * D:(h + 1) * 3 * D].split(D, dim=-1)
        lam = layer.slopes[h].double()
        for t in range(T):
            w = torch.exp(-lam * (t - torch.arange(t + 1, dtype=torch.float64)))  # (t+1,)
            scores = (q[:, t, None, :] * k[:, : t + 1]).sum(-1) * w  # (B, t+1)
            out[:, t, h * D:(h + 1) * D] = (scores[..., None] * v[:, : t + 1]).sum(1)
    normed = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * W["norm.weight"]
    gate = torch.sigmoid(x @ W["output_gate.weight"].T)
    return (normed * gate) @ W["out_proj.weight"].T


@pytest.mark.parametrize("short_conv", [0, 3])
def test_layer_equals_plain_formula(short_conv):
    torch.manual_seed(0)
    config = MiniMaxConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=10, lightning_chunk_size=4,
                           short_conv=short_conv)
    layer = LightningAttention(config, layer_idx=1).double()
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    ctx = build_context(torch.zeros(2, 11, dtype=torch.long), None, None)
    torch.testing.assert_close(layer(x, ctx), plain_lightning_layer(layer, x), rtol=0, atol=1e-10)


def test_padding_neither_adds_to_nor_decays_the_state():
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("lightning_rope")).eval()
    ids = torch.randint(0, 61, (1, 9))
    padded = torch.cat((torch.full((1, 6), 7), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 6), torch.ones(1, 9)), dim=1)
    cache_a, cache_b = model.new_cache(1), model.new_cache(1)
    model(ids, cache=cache_a)
    model(padded, attention_mask=mask, cache=cache_b)
    for a, b in zip(cache_a.states, cache_b.states):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_interior_padding_is_refused_for_lightning_models():
    model = EnhancedMiniMaxGPT(tiny_config("hybrid")).eval()
    with pytest.raises(ValueError, match="padding between real tokens"):
        model(torch.randint(0, 61, (1, 5)), attention_mask=torch.tensor([[1, 1, 0, 1, 1]]))
    model(torch.randint(0, 61, (1, 5)), attention_mask=torch.tensor([[0, 1, 1, 1, 0]]))  # left + trailing: fine


@pytest.mark.parametrize("layer_types", [["lightning"] * 3, ["softmax"] * 3, ["softmax", "lightning", "softmax"]])
def test_all_lightning_all_softmax_and_mixed_layouts_decode_exactly(layer_types):
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("hybrid", n_layer=3, layer_types=layer_types)).eval()
    ids = torch.randint(0, 61, (2, 21))
    full = model(ids).logits
    cache = model.new_cache(2)
    steps = [model(ids[:, :9], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                      for t in range(9, 21)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert cache.length == 21  # the cache's own counter, whatever layer 0 is


def test_lightning_cache_memory_does_not_grow():
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("hybrid", n_layer=2, layer_types=["lightning"] * 2)).eval()
    cache = model.new_cache(1, capacity=8)
    model(torch.randint(0, 61, (1, 4)), cache=cache)
    state_bytes = sum(s.numel() * s.element_size() for s in cache.states)
    assert state_bytes == 2 * 1 * 4 * 8 * 8 * 4  # layers x (B, H, D, D) float32
    for _ in range(100):
        model(torch.randint(0, 61, (1, 1)), cache=cache)
    assert sum(s.numel() * s.element_size() for s in cache.states) == state_bytes
    assert all(k is None for k in cache.keys)


def test_reorder_for_beam_search_both_cache_kinds():
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("hybrid")).eval()
    ids = torch.randint(0, 61, (3, 8))
    nxt = torch.randint(0, 61, (3, 1))
    cache = model.new_cache(3)
    model(ids, cache=cache)
    order = torch.tensor([2, 0, 0, 1])
    cache.reorder(order)
    got = model(nxt[order], cache=cache).logits
    want = model(torch.cat((ids, nxt), 1)[order]).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_crop_both_cache_kinds():
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("hybrid")).eval()
    ids = torch.randint(0, 61, (2, 12))
    cache = model.new_cache(2, max_rollback=2)
    model(ids[:, :8], cache=cache)
    model(torch.randint(0, 61, (2, 3)), cache=cache)  # a rejected draft
    cache.crop(8)
    got = model(ids[:, 8:], cache=cache).logits
    torch.testing.assert_close(got, model(ids).logits[:, 8:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_rollback"):
        cache.crop(5)  # inside a forward call: no lightning snapshot there
    softmax_only = EnhancedMiniMaxGPT(tiny_config("dense_softmax")).eval()
    c = softmax_only.new_cache(2)
    softmax_only(ids, cache=c)
    c.crop(5)
    torch.testing.assert_close(softmax_only(ids[:, 5:], cache=c).logits, softmax_only(ids).logits[:, 5:],
                               rtol=0, atol=1e-5)
