"""MQAR: deterministic sequences whose answers can be checked, and accuracy that counts only the queries."""

import pytest
import torch

from minimax_gpt.evals.mqar import (FILLER, IGNORE_INDEX, MQARSpec, mqar_batch, random_guess_accuracy,
                                    recall_accuracy)


def _batch(spec, seed=0, batch_size=16):
    return mqar_batch(spec, batch_size, torch.Generator().manual_seed(seed))


def test_same_seed_same_batch_other_seed_other_batch():
    spec = MQARSpec(seq_len=64, n_pairs=8)
    a, b, c = _batch(spec, 3), _batch(spec, 3), _batch(spec, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("seq_len,n_pairs", [(24, 8), (64, 8), (128, 1), (48, 16)])
def test_every_query_answers_with_the_value_that_followed_its_key(seq_len, n_pairs):
    spec = MQARSpec(seq_len=seq_len, n_pairs=n_pairs, n_keys=20, n_values=7)
    inputs, targets = _batch(spec, seed=seq_len)
    assert inputs.shape == targets.shape == (16, seq_len)
    for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
        keys, values = row_in[0:2 * n_pairs:2], row_in[1:2 * n_pairs:2]
        assert len(set(keys)) == n_pairs and all(1 <= k <= 20 for k in keys)
        assert all(21 <= v <= 27 for v in values)
        memory = dict(zip(keys, values))
        asked = [(row_in[t], row_t[t]) for t in range(seq_len) if row_t[t] != IGNORE_INDEX]
        assert all(t >= 2 * n_pairs for t in range(seq_len) if row_t[t] != IGNORE_INDEX)
        assert sorted(k for k, _ in asked) == sorted(keys)  # every key asked once
        assert all(memory[k] == v for k, v in asked)
        rest = [row_in[t] for t in range(2 * n_pairs, seq_len) if row_t[t] == IGNORE_INDEX]
        assert rest == [FILLER] * (seq_len - 3 * n_pairs)


def _onehot(ids, vocab):
    return torch.nn.functional.one_hot(ids.clamp(min=0), vocab).float()


def test_accuracy_counts_only_the_queries():
    spec = MQARSpec(seq_len=64, n_pairs=8, n_keys=16, n_values=16)
    inputs, targets = _batch(spec, batch_size=64)
    assert recall_accuracy(_onehot(targets, spec.vocab_size), targets) == (64 * 8, 64 * 8)  # the oracle
    # a model that copies its input token answers every query with the key: never a value
    assert recall_accuracy(_onehot(inputs, spec.vocab_size), targets) == (0, 64 * 8)
    # right at every position but the queries scores 0: the other positions do not count
    next_tokens = torch.cat([inputs[:, 1:], inputs[:, :1]], dim=1)
    wrong_at_queries = torch.where(targets == IGNORE_INDEX, next_tokens, FILLER)
    assert recall_accuracy(_onehot(wrong_at_queries, spec.vocab_size), targets)[0] == 0


def test_a_uniform_guess_among_values_scores_the_chance_rate():
    spec = MQARSpec(seq_len=64, n_pairs=8, n_keys=16, n_values=16)
    inputs, targets = _batch(spec, batch_size=512)
    guesses = torch.randint(0, spec.n_values, inputs.shape, generator=torch.Generator().manual_seed(1)) + 17
    correct, counted = recall_accuracy(_onehot(guesses, spec.vocab_size), targets)
    assert counted == 512 * 8
    assert abs(correct / counted - spec.chance) < 0.015  # 4096 queries: 3 standard deviations of the rate


def test_random_guess_accuracy_is_the_harmonic_plateau():
    assert random_guess_accuracy(1) == 1.0
    assert random_guess_accuracy(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(seq_len=0, n_pairs=1), "seq_len"),
    (dict(seq_len=10, n_pairs=4), "seq_len .10. must be >= 3 \\* n_pairs"),
    (dict(seq_len=64, n_pairs=9, n_keys=8), "n_pairs .9. must be <= n_keys"),
    (dict(seq_len=64, n_pairs=2, n_values=True), "n_values"),
])
def test_bad_specs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQARSpec(**kwargs)


def test_bad_batch_size_is_named():
    with pytest.raises(ValueError, match="batch_size"):
        mqar_batch(MQARSpec(16, 2), 0, torch.Generator())
