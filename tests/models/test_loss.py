"""Chunked cross-entropy == the plain computation: loss and both gradients, in float64, including a chunk size that
does not divide the number of positions and ignored targets; and the model's loss_chunk_size path."""

import pytest
import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.models.loss import chunked_cross_entropy, cross_entropy_reference


def _inputs(B=3, T=7, C=8, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 2] = targets[-1, -1] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 5, 21, 64])
def test_chunked_equals_plain_fp64(chunk_size):
    hidden, weight, targets = _inputs()
    plain = cross_entropy_reference(hidden, weight, targets)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, targets, chunk_size)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_upstream_gradient():
    hidden, weight, targets = _inputs(B=2, T=5, C=4, V=11)
    assert torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy(h, w, targets, 3), (hidden, weight))
    # a non-unit upstream gradient scales both gradients
    g1 = torch.autograd.grad(3.0 * chunked_cross_entropy(hidden, weight, targets, 4), (hidden, weight))
    g2 = torch.autograd.grad(3.0 * cross_entropy_reference(hidden, weight, targets), (hidden, weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_all_ignored_is_nan_like_plain():
    hidden, weight, targets = _inputs()
    targets = torch.full_like(targets, -100)
    assert torch.isnan(chunked_cross_entropy(hidden, weight, targets, 4))
    assert torch.isnan(cross_entropy_reference(hidden, weight, targets))


def test_bad_arguments():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, targets, 0)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hidden, weight, targets[:, :3], 4)


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_chunk_size(tied):
    """float32 model: both paths take the softmax in float32; they differ only in summation order."""
    torch.manual_seed(0)
    config = MiniMaxConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, hybrid_period=2,
                           tie_word_embeddings=tied, use_moe=True)
    model = EnhancedMiniMaxGPT(config)
    x = torch.randint(0, 50, (2, 13))
    y = torch.randint(0, 50, (2, 13))
    plain = model(x, targets=y)
    grads_plain = torch.autograd.grad(plain.loss, list(model.parameters()))
    chunked = model(x, targets=y, loss_chunk_size=5)
    assert chunked.logits is None
    grads_chunked = torch.autograd.grad(chunked.loss, list(model.parameters()))
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.ce_loss, plain.ce_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_chunked, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_matches_plain_path():
    torch.manual_seed(0)
    config = MiniMaxConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, hybrid_period=2)
    model = EnhancedMiniMaxGPT(config)
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x, targets=x).loss
        chunked = model(x, targets=x, loss_chunk_size=7).loss
    # same bf16 logits, same float32 softmax: equal up to float32 summation order
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


def test_in_place_logsumexp_matches_torch_including_infinities():
    from minimax_gpt.models.loss import _logsumexp_

    inf = float("inf")
    x = torch.tensor([[0.0, 1.0, 2.0], [1e4, -1e4, 3.0], [-inf, -inf, -inf], [-inf, 0.5, inf], [88.0, 89.0, -inf]])
    want = torch.logsumexp(x, dim=-1)
    got = _logsumexp_(x.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_chunked_equals_plain_fp64_through_the_logits_buffer_with_a_short_last_chunk():
    """fp64 matmuls write every chunk's logits into the one reused (K, V) buffer; 45 positions in chunks of 16 leave a
    13-row last chunk, a partial view of it."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(45, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (45,), generator=g)
    want = cross_entropy_reference(h, w, t)
    dh, dw = torch.autograd.grad(want, (h, w))
    got = chunked_cross_entropy(h, w, t, chunk_size=16)
    gh, gw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, dh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, dw, rtol=1e-12, atol=1e-12)
