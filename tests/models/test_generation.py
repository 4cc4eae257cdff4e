import pytest
import torch

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.generation import sample_next, stream


def make(name="hybrid", **kw):
    torch.manual_seed(0)
    return EnhancedMiniMaxGPT(tiny_config(name, **kw)).eval()


@pytest.mark.parametrize("name", ["dense_softmax", "hybrid", "xpos", "learned_pos"])
def test_greedy_with_and_without_cache_identical(name):
    model = make(name)
    ids = torch.randint(0, 61, (2, 6))
    a = model.generate(ids, max_new_tokens=12, temperature=0)
    b = model.generate(ids, max_new_tokens=12, temperature=0, use_cache=False)
    assert a.shape == (2, 18) and torch.equal(a[:, :6], ids)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(ids, max_new_tokens=12, top_k=1), a)


def test_batched_left_padding_matches_single_prompts():
    model = make("hybrid")
    p1, p2 = torch.randint(0, 61, (1, 7)), torch.randint(0, 61, (1, 3))
    batch = torch.cat((p1, torch.cat((torch.zeros(1, 4, dtype=torch.long), p2), dim=1)))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :4] = 0
    out = model.generate(batch, max_new_tokens=8, temperature=0, attention_mask=mask)
    assert torch.equal(out[0:1, 7:], model.generate(p1, 8, temperature=0)[:, 7:])
    assert torch.equal(out[1:2, 7:], model.generate(p2, 8, temperature=0)[:, 3:])
    no_cache = model.generate(batch, max_new_tokens=8, temperature=0, attention_mask=mask, use_cache=False)
    assert torch.equal(out, no_cache)


def test_sampling_is_seeded_and_streams():
    model = make()
    ids = torch.randint(0, 61, (2, 4))
    seen = []
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = model.generate(ids, 10, temperature=0.8, top_k=10, top_p=0.9, generator=g1, streamer=seen.append)
    b = torch.cat([ids] + [t[:, None] for t in stream(model, ids, 10, 0.8, 10, 0.9, generator=g2)], dim=1)
    assert torch.equal(a, b)
    assert torch.equal(torch.stack(seen, 1), a[:, 4:])


def test_eos_stops_rows_and_generation():
    model = make()
    ids = torch.randint(0, 61, (1, 4))
    greedy = model.generate(ids, 10, temperature=0)
    eos = int(greedy[0, 6])  # the third generated token
    out = model.generate(ids, 10, temperature=0, eos_token_id=eos)
    first = (greedy[0, 4:] == eos).nonzero()[0].item()
    assert out.shape[1] == 4 + first + 1 and out[0, -1] == eos


def test_generation_past_block_size():
    rot = make("hybrid", block_size=8)
    assert rot.generate(torch.randint(0, 61, (1, 4)), 12, temperature=0).shape == (1, 16)
    learned = make("learned_pos", block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        learned.generate(torch.randint(0, 61, (1, 4)), 5)


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    ks = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert ks == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.23, 0.09, ...
    ps = {int(sample_next(logits, 1.0, top_p=float(probs[0] + 0.01), generator=g)) for _ in range(200)}
    assert ps == {0, 1}
    assert {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} == {0}


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(attention_mask=torch.tensor([[1, 0, 1, 1]])), "left-padded"),
])
def test_bad_generation_args(kwargs, match):
    args = dict(max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        make().generate(torch.randint(0, 61, (1, 4)), **args)
