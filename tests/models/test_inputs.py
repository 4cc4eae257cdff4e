"""Bad inputs to the model and to `generate` (issue 9's list, one row each): a ValueError or TypeError whose message
names the argument and the allowed range, raised before any computation; also when nothing would be generated."""

import math

import numpy as np
import pytest
import torch

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.generation import check_sampling_args

V = 61  # tiny_config's vocab_size


def make(name="hybrid", **kw):
    torch.manual_seed(0)
    return EnhancedMiniMaxGPT(tiny_config(name, **kw)).eval()


def ids(B=2, T=6):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


MODEL_CASES = {
    "id too large": (dict(input_ids=torch.tensor([[1, V]])), ValueError, r"input_ids must be in \[0, vocab_size=61\)"),
    "negative id": (dict(input_ids=torch.tensor([[-1, 2]])), ValueError, r"input_ids must be in \[0, vocab_size"),
    "float ids": (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "input_ids must hold integer token ids"),
    "bool ids": (dict(input_ids=torch.ones(1, 3, dtype=torch.bool)), TypeError, "input_ids must hold integer"),
    "list ids": (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    "rank 1": (dict(input_ids=torch.tensor([1, 2])), ValueError, r"input_ids must have shape \(batch, seq_len\)"),
    "rank 3": (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, r"input_ids must have shape"),
    "empty sequence": (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "input_ids must not be empty"),
    "empty batch": (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), ValueError, "input_ids must not be empty"),
    "targets shape": (dict(targets=ids()[:, :5]), ValueError, r"targets must have the shape of input_ids \(2, 6\)"),
    "targets range": (dict(targets=torch.full((2, 6), V)), ValueError, r"targets must be in \[0, vocab_size=61\) or -100"),
    "float targets": (dict(targets=ids().float()), TypeError, "targets must be an integer tensor"),
    "bool targets": (dict(targets=ids() > 3), TypeError, "targets must be an integer tensor"),
    "mask shape": (dict(attention_mask=torch.ones(2, 5)), ValueError, r"attention_mask must have shape \(2, 6\)"),
    "mask rank": (dict(attention_mask=torch.ones(2, 6, 1)), ValueError, "attention_mask must have shape"),
    "mask values": (dict(attention_mask=torch.full((2, 6), 2)), ValueError, "attention_mask must contain only 0 and 1"),
    "mask type": (dict(attention_mask=[[1] * 6] * 2), TypeError, "attention_mask must be a torch.Tensor"),
    "logits_to_keep < 0": (dict(logits_to_keep=-1), ValueError, r"logits_to_keep must be an int >= 0"),
    "loss_chunk_size < 0": (dict(targets=ids(), loss_chunk_size=-4), ValueError, r"loss_chunk_size must be an int >= 0"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_rejects(case, monkeypatch):
    kwargs, exc, match = MODEL_CASES[case]
    model = make()
    called = []
    for block in model.blocks:  # "before any computation": no block may run
        monkeypatch.setattr(block, "forward", lambda *a, **k: called.append(1))
    kwargs = {"input_ids": ids(), **kwargs}
    with pytest.raises(exc, match=match):
        model(**kwargs)
    assert not called


def test_learned_positions_stop_at_block_size():
    model = make("learned_pos", block_size=8)
    model(ids(1, 8))
    with pytest.raises(ValueError, match=r"learned positions stop at block_size - 1 = 7"):
        model(ids(1, 9))
    cache = model.new_cache(1)
    model(ids(1, 8), cache=cache)
    with pytest.raises(ValueError, match="block_size"):  # through the cache too
        model(ids(1, 1), cache=cache)


GENERATE_CASES = {
    "max_new_tokens < 0": (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be an int >= 0"),
    "max_new_tokens float": (dict(max_new_tokens=2.5), TypeError, r"max_new_tokens must be an int"),
    "temperature < 0": (dict(temperature=-0.1), ValueError, r"temperature must be a finite number >= 0 \(0 = greedy\)"),
    "temperature nan": (dict(temperature=math.nan), ValueError, "temperature must be a finite number >= 0"),
    "temperature inf": (dict(temperature=math.inf), ValueError, "temperature must be a finite number >= 0"),
    "temperature str": (dict(temperature="hot"), TypeError, "temperature must be a number"),
    "top_p 0": (dict(top_p=0.0), ValueError, r"top_p must be None or in \(0, 1\]"),
    "top_p > 1": (dict(top_p=1.01), ValueError, r"top_p must be None or in \(0, 1\]"),
    "top_p nan": (dict(top_p=math.nan), ValueError, r"top_p must be None or in \(0, 1\]"),
    "top_k 0": (dict(top_k=0), ValueError, "top_k must be None or an int >= 1"),
    "top_k float": (dict(top_k=2.0), TypeError, "top_k must be an int or None"),
    "float prompt": (dict(input_ids=torch.ones(1, 3)), TypeError, "input_ids must hold integer token ids"),
    "prompt out of range": (dict(input_ids=torch.tensor([[V]])), ValueError, r"input_ids must be in \[0, vocab_size"),
    "empty prompt": (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids must not be empty"),
    "rank-1 prompt": (dict(input_ids=torch.tensor([1, 2])), ValueError, "input_ids must have shape"),
    "mask shape": (dict(attention_mask=torch.ones(2, 3)), ValueError, "attention_mask must have the shape"),
    "mask values": (dict(attention_mask=torch.full((2, 6), 3)), ValueError, "attention_mask must contain only 0 and 1"),
    "mask interior padding": (dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1]] * 2)), ValueError, "left-padded"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
@pytest.mark.parametrize("max_new_tokens", [0, 3])
def test_generate_rejects(case, max_new_tokens, monkeypatch):
    kwargs, exc, match = GENERATE_CASES[case]
    model = make()
    called = []
    monkeypatch.setattr(model.blocks[0], "forward", lambda *a, **k: called.append(1))
    kwargs = {"input_ids": ids(), "max_new_tokens": max_new_tokens, **kwargs}
    with pytest.raises(exc, match=match):
        model.generate(**kwargs)
    assert not called


def test_generate_learned_positions_bound_and_greedy_temperature_zero():
    model = make("learned_pos", block_size=8)
    with pytest.raises(ValueError, match=r"prompt \(6\) \+ max_new_tokens \(3\) exceeds block_size \(8\)"):
        model.generate(ids(), max_new_tokens=3)
    greedy = model.generate(ids(), max_new_tokens=2, temperature=0)
    assert torch.equal(greedy, model.generate(ids(), max_new_tokens=2, top_k=1))


def test_sampling_args_accept_numpy_scalars():
    check_sampling_args(np.int64(3), np.float32(0.7), np.int32(5), np.float64(0.9))
