"""The MQAR recipe's schedules, and that training and evaluation use the data they say."""

import pytest
import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.evals.mqar import MQARSpec
from minimax_gpt.evals.mqar_training import MQARRecipe, evaluate_mqar, train_mqar


def test_learning_rate_warms_up_then_decays_to_its_floor():
    r = MQARRecipe(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert r.lr_at(0) == pytest.approx(1e-3 / 11)
    assert r.lr_at(9) == pytest.approx(1e-3 * 10 / 11)
    assert r.lr_at(10) == pytest.approx(1e-3)
    assert r.lr_at(99) == pytest.approx(1e-4, rel=0.01)
    assert all(r.lr_at(i) >= r.lr_at(i + 1) for i in range(10, 99))


def test_curriculum_grows_the_pairs_from_one_to_all():
    r = MQARRecipe(steps=100, curriculum=0.5)
    pairs = [r.pairs_at(i, 8) for i in range(100)]
    assert pairs[0] == 1 and pairs[49] == 8 and pairs[-1] == 8
    assert pairs == sorted(pairs) and set(pairs) == set(range(1, 9))
    assert [MQARRecipe(steps=10, warmup_steps=0, curriculum=0.0).pairs_at(i, 8) for i in range(10)] == [8] * 10


@pytest.mark.parametrize("kwargs,message", [(dict(steps=0), "steps"), (dict(warmup_steps=2000), "warmup_steps"),
                                            (dict(lr=0.0), "lr"), (dict(curriculum=1.5), "curriculum")])
def test_bad_recipes_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQARRecipe(**kwargs)


def _tiny(spec, layer_types=("lightning", "softmax")):
    torch.manual_seed(0)
    return EnhancedMiniMaxGPT(MiniMaxConfig(vocab_size=spec.vocab_size, block_size=spec.seq_len, n_layer=2, n_head=2,
                                            n_embd=16, lightning_chunk_size=8, layer_types=list(layer_types)))


def test_training_is_deterministic_and_lowers_the_loss():
    spec = MQARSpec(seq_len=16, n_pairs=2, n_keys=4, n_values=4)
    recipe = MQARRecipe(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, curriculum=0.0)
    a, b = _tiny(spec), _tiny(spec)
    losses = train_mqar(a, spec, recipe, seed=1)
    assert losses == train_mqar(b, spec, recipe, seed=1)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert not a.training  # left in eval mode
    assert evaluate_mqar(a, spec, 40, seed=3) == evaluate_mqar(b, spec, 40, seed=3)


def test_evaluation_counts_query_positions_of_fresh_sequences():
    spec = MQARSpec(seq_len=16, n_pairs=2, n_keys=4, n_values=4)
    accuracy = evaluate_mqar(_tiny(spec), spec, 50, seed=0, batch_size=16)
    assert accuracy * 100 == pytest.approx(round(accuracy * 100))  # 50 sequences x 2 queries


def test_a_vocabulary_too_small_for_the_task_is_refused():
    spec = MQARSpec(seq_len=16, n_pairs=2, n_keys=4, n_values=4)
    with pytest.raises(ValueError, match="vocab_size .9. is below the MQAR vocabulary .17"):
        train_mqar(_tiny(MQARSpec(16, 2, 4, 4)), MQARSpec(16, 2, 8, 8), MQARRecipe(steps=1, warmup_steps=0), seed=0)
    assert spec.vocab_size == 9
