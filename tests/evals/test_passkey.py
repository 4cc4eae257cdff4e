"""Passkey prompts: deterministic, of the asked length, the needle at its depth; a trial is judged by greedy
decoding (an oracle passes, a model that repeats its input fails)."""

import pytest
import torch

from minimax_gpt.data.tokenizer import build_tokenizer
from minimax_gpt.evals.passkey import (FILLER, INTRO, NEEDLE, evaluate_passkey, passkey_correct, passkey_prompt,
                                       passkey_prompts)

BYTES = build_tokenizer("bytes")


def test_same_seed_same_prompts():
    a = passkey_prompts(BYTES, 600, [0.0, 0.5, 1.0], trials=3, seed=7)
    assert a == passkey_prompts(BYTES, 600, [0.0, 0.5, 1.0], trials=3, seed=7)
    assert [p.passkey for p in a] != [p.passkey for p in passkey_prompts(BYTES, 600, [0.0, 0.5, 1.0], 3, seed=8)]
    assert all(10000 <= p.passkey < 100000 for p in a)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_fits_the_length_and_hides_the_key_at_its_depth(depth):
    n_tokens = 2000
    item = passkey_prompt(BYTES, n_tokens, depth, 31337)
    total = len(item.prompt) + len(item.answer)
    assert n_tokens - max(len(s) for s in FILLER) < total <= n_tokens
    assert BYTES.decode(item.answer) == " 31337"
    text = BYTES.decode(item.prompt)
    assert text.startswith(INTRO) and text.endswith("What is the pass key? The pass key is")
    count = sum(text.count(s) for s in FILLER)
    head = text[:text.index(NEEDLE.format(key=31337))]
    assert sum(head.count(s) for s in FILLER) == round(depth * count)


def test_short_prompts_fit_a_short_training_length():
    assert len(passkey_prompt(BYTES, 128, 0.5, 12345).prompt) + 6 <= 128


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_prompt(BYTES, 1000, 1.5, 12345)
    with pytest.raises(ValueError, match="passkey prompts need at least"):
        passkey_prompt(BYTES, 100, 0.5, 12345)  # 109 at least


class _Scripted(torch.nn.Module):
    """Logits that put all mass on `script(ids)`'s next token at every position."""

    def __init__(self, script):
        super().__init__()
        self.wte = torch.nn.Embedding(256, 1)
        self.script = script

    def forward(self, ids, logits_to_keep=0):
        out = torch.nn.functional.one_hot(self.script(ids), 256).float()  # (B, T, V)
        return type("Out", (), {"logits": out[:, -logits_to_keep:] if logits_to_keep else out})


def test_an_oracle_passes_and_a_model_repeating_its_input_fails():
    item = passkey_prompt(BYTES, 400, 0.5, 27182)
    full = torch.tensor([item.prompt + item.answer])
    oracle = _Scripted(lambda ids: full[:, 1:ids.shape[1] + 1])  # the true next token
    assert passkey_correct(oracle, item)
    assert not passkey_correct(_Scripted(lambda ids: ids), item)
    results = evaluate_passkey(oracle, BYTES, [400], [0.5], trials=1, seed=0)
    assert results[400]["tokens"] <= 400
