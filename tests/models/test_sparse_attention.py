"""The "sparse" layer (MoBA block-sparse attention) inside the model: decoding, padding, gradients, config."""

import pytest
import torch

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from test_model import incremental_logits

# blocks of 4 positions and one earlier block per query: at T=19 most queries skip most of the past
SPARSE = dict(layer_types=["sparse", "lightning", "sparse"], sparse_block_size=4, sparse_top_k=1, n_kv_head=2)


def make(**overrides) -> EnhancedMiniMaxGPT:
    torch.manual_seed(0)
    return EnhancedMiniMaxGPT(tiny_config("hybrid", **{**SPARSE, **overrides})).double().eval()


def left_padded(B, T):
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :2] = 0
    return mask


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("prefill, step", [(5, 1), (6, 4), (8, 3)])  # prompts ending mid-block and on a boundary
def test_incremental_decode_equals_full_forward(padded, prefill, step):
    model = make()
    ids = torch.randint(0, 61, (3, 19), generator=torch.Generator().manual_seed(prefill))
    mask = left_padded(3, 19) if padded else None
    full = model(ids, attention_mask=mask).logits
    inc = incremental_logits(model, ids, mask, prefill, step)
    keep = torch.ones(3, 19, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(inc[keep], full[keep], rtol=0, atol=1e-10)


def test_crop_and_reorder_keep_the_block_sums():
    model = make(layer_types=["sparse", "softmax", "sparse"])  # lightning states crop only to snapshots
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    cache = model.new_cache(2, capacity=8)
    model(ids[:, :13], cache=cache)
    cache.crop(10)  # back into the middle of a block
    logits = [model(ids[:, t : t + 1], cache=cache).logits for t in range(10, 17)]
    torch.testing.assert_close(torch.cat(logits, dim=1), full[:, 10:], rtol=0, atol=1e-10)
    cache.reorder(torch.tensor([1, 1]))
    step = model(ids[1:, 16:17].expand(2, 1), cache=cache).logits  # row 1's context twice
    torch.testing.assert_close(step[0], step[1], rtol=0, atol=0)


def test_top_k_covering_every_block_equals_softmax_layers():
    sparse = make(sparse_top_k=8)
    dense = EnhancedMiniMaxGPT(sparse.config.replace(layer_types=["softmax", "lightning", "softmax"])).double()
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sparse(ids).logits, dense.eval()(ids).logits, rtol=0, atol=1e-12)
    fewer = make()  # top-1 of up to 7 earlier blocks: a different function
    assert (fewer(ids).logits - dense(ids).logits).abs().max() > 1e-3


def test_fast_path_gradients_equal_the_masked_path():
    """A causal training forward takes the fast path; with an attention mask (all ones) the same layer applies the
    block mask densely through SDPA. Same loss, same gradient for every parameter."""
    fast = make().train()
    ref = EnhancedMiniMaxGPT(fast.config).double().train()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 61, (2, 23), generator=torch.Generator().manual_seed(5))
    ones = torch.ones(2, 22, dtype=torch.long)
    losses = [fast(ids[:, :-1], targets=ids[:, 1:]).loss,
              ref(ids[:, :-1], targets=ids[:, 1:], attention_mask=ones).loss]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("kwargs, field", [
    (dict(sparse_block_size=0), "sparse_block_size"),
    (dict(sparse_top_k=0), "sparse_top_k"),
    (dict(n_layer=1, layer_types=["sparse"], adaptive_xpos=True), "adaptive_xpos"),
    (dict(n_layer=1, layer_types=["spares"]), "sparse"),  # the message lists the allowed types
])
def test_bad_sparse_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MiniMaxConfig(**kwargs)


def test_sparse_fields_round_trip_through_json():
    c = MiniMaxConfig(n_layer=2, layer_types=["sparse", "lightning"], sparse_block_size=64, sparse_top_k=2)
    d = MiniMaxConfig.from_json(c.to_json())
    assert (d.layer_types, d.sparse_block_size, d.sparse_top_k) == (["sparse", "lightning"], 64, 2)
