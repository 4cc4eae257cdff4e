"""Log-likelihoods on the cache equal those of one plain forward pass; rolling windows predict each token once."""

import pytest
import torch

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.evals.scoring import fit_context, greedy_until, rolling_windows, score_continuations, score_rolling


def _model(layout):
    torch.manual_seed(0)
    return EnhancedMiniMaxGPT(tiny_config(layout)).eval()


def _plain(model, context, continuation):
    """(log p(continuation | context), greedy?) from one forward pass over both, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0, :-1].double()  # (T - 1, V)
    logp = torch.log_softmax(logits, dim=-1)[len(context) - 1:]  # (len(continuation), V)
    t = torch.tensor(continuation)
    return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


@pytest.mark.parametrize("layout", ["dense_softmax", "hybrid", "lightning_rope", "moe"])
def test_continuations_on_a_shared_cache_equal_plain_forwards(layout):
    model = _model(layout)
    g = torch.Generator().manual_seed(1)
    context = torch.randint(0, 61, (13,), generator=g).tolist()
    continuations = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (1, 4, 11, 2)]
    for got, cont in zip(score_continuations(model, context, continuations), continuations):
        want = _plain(model, context, cont)
        assert got[0] == pytest.approx(want[0], abs=1e-5) and got[1] == want[1]


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation():
    model = _model("hybrid")
    context = [3, 14, 15, 9, 26]
    greedy = model.generate(torch.tensor([context]), 5, temperature=0.0)[0, 5:].tolist()
    (_, is_greedy), (_, other) = score_continuations(model, context, [greedy, greedy[:-1] + [(greedy[-1] + 1) % 61]])
    assert is_greedy and not other


def test_fit_context_keeps_what_fits_from_the_right():
    assert fit_context(list(range(10)), [7, 7, 7], max_length=8) == [4, 5, 6, 7, 8, 9]  # 6 + 3 - 1 = 8 tokens
    assert fit_context([1, 2], [7], max_length=8) == [1, 2]
    with pytest.raises(ValueError, match="does not fit in max_length=2"):
        fit_context([1], [7, 7, 7], max_length=2)


def test_rolling_windows_predict_every_token_once_with_the_most_context():
    windows = list(rolling_windows(list(range(10)), prefix=-1, max_length=4))
    # lm_eval's documented example: inputs P012 -> 0123, 3456 -> 4567, 5678 -> 89
    assert windows == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    for n in range(1, 30):
        ws = list(rolling_windows(list(range(n)), prefix=-1, max_length=7))
        assert sum((t for _, t in ws), []) == list(range(n))
        assert all(len(c) + len(t) - 1 <= 7 for c, t in ws)


def test_rolling_score_is_the_sum_of_plain_window_scores():
    model = _model("hybrid")
    tokens = torch.randint(0, 61, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    want = sum(_plain(model, c, t)[0] for c, t in rolling_windows(tokens, 0, 8))
    assert score_rolling(model, tokens, prefix=0, max_length=8) == pytest.approx(want, abs=1e-5)
    # with room for the whole document it is one plain forward pass after the prefix
    assert score_rolling(model, tokens, prefix=0, max_length=48) == pytest.approx(_plain(model, [0], tokens)[0],
                                                                                   abs=1e-5)


class _Letters:
    """A tokenizer of the letters a..z, enough for greedy_until."""
    eos_token_id = None

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_greedy_until_cuts_before_the_first_stop_string():
    model = _model("hybrid")
    context = [1, 2, 3]
    text = _Letters().decode(model.generate(torch.tensor([context]), 8, temperature=0.0)[0, 3:].tolist())
    assert greedy_until(model, _Letters(), context, [], 8) == text
    stop = text[3:5]
    assert greedy_until(model, _Letters(), context, [stop, "never"], 8) == text[:text.find(stop)]
