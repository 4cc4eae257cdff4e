"""The short causal convolution of lightning layers (models/short_conv.py, config.short_conv)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.models.context import build_context
from minimax_gpt.models.lightning import LightningAttention
from minimax_gpt.models.short_conv import ShortConv


def test_equals_a_causal_depthwise_conv1d():
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)  # (B, T, C)
    # conv1d is a cross-correlation: with K-1 zeros on the left, y_t = sum_j w[j] x_{t-K+1+j}
    want = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight[:, None, :], groups=6).transpose(1, 2)
    y, past = conv(x)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(past, x[:, -3:], rtol=0, atol=0)  # the last K-1 inputs
    assert y[0, 0, 0].item() == pytest.approx((conv.weight[0, 3] * x[0, 0, 0]).item(), abs=1e-15)


def test_streaming_in_pieces_equals_one_call_exactly():
    torch.manual_seed(0)
    conv = ShortConv(5, 3)
    x = torch.randn(2, 10, 5)
    full, _ = conv(x)
    pieces, past = [], None
    for a, b in ((0, 1), (1, 2), (2, 6), (6, 7), (7, 10)):  # pieces shorter and longer than K-1
        y, past = conv(x[:, a:b], past)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=0)


def test_kernel_size_below_two_is_refused():
    with pytest.raises(ValueError, match="kernel_size >= 2"):
        ShortConv(4, 1)


def test_identity_kernel_gives_the_layer_without_convolution():
    torch.manual_seed(0)
    plain = LightningAttention(tiny_config("hybrid"), layer_idx=0)
    conv = LightningAttention(tiny_config("short_conv"), layer_idx=0)
    conv.load_state_dict({**plain.state_dict(), "short_conv.weight": conv.short_conv.weight.detach()})
    with torch.no_grad():
        conv.short_conv.weight.zero_()
        conv.short_conv.weight[:, -1] = 1.0  # only the current token
    x = torch.randn(2, 7, 32)
    ctx = build_context(torch.zeros(2, 7, dtype=torch.long), None, None)
    torch.testing.assert_close(conv(x, ctx), plain(x, ctx), rtol=0, atol=0)
    with torch.no_grad():
        conv.short_conv.weight[:, -2] = 0.5  # now the previous token counts: a different output
    assert (conv(x, ctx) - plain(x, ctx)).abs().max() > 1e-3


def test_decode_crop_and_reorder_with_a_convolution():
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("short_conv")).eval()
    ids = torch.randint(0, 61, (2, 12))
    full = model(ids).logits
    cache = model.new_cache(2, max_rollback=2)
    model(ids[:, :8], cache=cache)
    assert cache.conv_states[0].shape == (2, 3, 3 * 4 * 8)  # (B, K-1, 3*H*D)
    assert cache.conv_states[1] is None  # the softmax layer
    model(torch.randint(0, 61, (2, 3)), cache=cache)  # a rejected draft moves the convolution's inputs too
    cache.crop(8)
    torch.testing.assert_close(model(ids[:, 8:], cache=cache).logits, full[:, 8:], rtol=0, atol=1e-5)
    cache = model.new_cache(2)
    model(ids[:, :11], cache=cache)
    order = torch.tensor([1, 1, 0])
    cache.reorder(order)
    torch.testing.assert_close(model(ids[order, 11:], cache=cache).logits, full[order, 11:], rtol=0, atol=1e-5)


def test_sequence_parallelism_is_refused():
    layer = LightningAttention(tiny_config("short_conv"), layer_idx=0)
    ctx = build_context(torch.zeros(1, 4, dtype=torch.long), None, None)
    ctx.seq = object()  # a sequence-parallel handle: the layer must refuse before using it
    with pytest.raises(NotImplementedError, match="short_conv is not supported under sequence parallelism"):
        layer(torch.randn(1, 4, 32), ctx)
