"""Adaptive MoE routing: top-p routing (arXiv 2403.07652) and auxiliary-loss-free balancing (DeepSeek-V3, arXiv
2412.19437) against the plain reference, the bias update, router statistics, and decoding equal to a full forward."""

import pytest
import torch

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.models.moe import moe_forward_reference
from test_moe import (assert_matches_reference, make, pad_mask, reference, run_with_grads, skewed_input,
                      vectorised)


def set_bias(m, values):
    with torch.no_grad():
        m.routing_bias.copy_(torch.tensor(values, dtype=torch.float32))


CASES = [
    pytest.param(dict(moe_top_p=0.5, moe_top_k=3), None, id="topp0.5-cap3-dropless"),
    pytest.param(dict(moe_top_p=0.8, moe_top_k=3, moe_capacity_factor=0.75), None, id="topp0.8-cap3-cf0.75"),
    pytest.param(dict(moe_bias_update_rate=0.01), [0.0, 0.3, -0.2, 0.45], id="bias-top2"),
    pytest.param(dict(moe_bias_update_rate=0.01, moe_capacity_factor=1.0), [0.2, 0.0, 0.0, 0.45], id="bias-cf1.0"),
    pytest.param(dict(moe_bias_update_rate=0.01, moe_top_p=0.6, moe_top_k=3, moe_capacity_factor=1.25),
                 [0.0, 0.3, -0.2, 0.45], id="bias-topp0.6-cf1.25"),
]


@pytest.mark.parametrize("impl", ["bmm", "loop", "auto"])
@pytest.mark.parametrize("kw, bias", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_adaptive_routing_matches_reference_fp64(kw, bias, masked, impl):
    """Output, every gradient, the statistics and the aux losses equal the plain reference (fp64); "auto" runs 9
    tokens: the few-token path (eval, or dropless training) or the per-expert loop (training under a capacity)."""
    m, cfg = make(**kw)
    if bias is not None:
        set_bias(m, bias)
    B, T, lengths = (1, 9, [6]) if impl == "auto" else (3, 11, [11, 7, 2])
    x = skewed_input(m, B, T, 16)
    mask = pad_mask(B, T, lengths) if masked else None
    for training in (True, False):
        m.train(training)
        got = run_with_grads(vectorised(impl), m, x, mask, cfg)
        assert_matches_reference(got, run_with_grads(reference, m, x, mask, cfg))
        s = got[1]
        if "moe_capacity_factor" in kw and training:
            assert s.dropped_fraction > 0  # the capacity cases do drop, and count it as the reference does
        if "moe_top_p" in kw:
            assert 1 < float(s.experts_per_token) < kw["moe_top_k"]  # a varying count, below the cap


@pytest.mark.parametrize("kw, bias", CASES[1::3])
def test_grouped_mm_with_adaptive_routing_matches_reference_fp32(kw, bias):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    m, cfg = make(dtype=torch.float32, **kw)
    if bias is not None:
        set_bias(m, bias)
    x = skewed_input(m, 3, 11, 16)
    mask = pad_mask(3, 11, [11, 7, 2])
    y, s, _, g = run_with_grads(vectorised("grouped_mm"), m, x, mask, cfg)
    yr, sr, _, gr = run_with_grads(reference, m, x, mask, cfg)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert float(s.dropped_fraction) == float(sr.dropped_fraction) > 0
    assert torch.equal(s.expert_counts, sr.expert_counts.to(s.expert_counts.dtype))


def test_bias_changes_selection_but_not_combine_weights():
    m, _ = make(moe_bias_update_rate=0.01)
    m.eval()
    x = torch.randn(40, 16, dtype=torch.float64)
    _, probs, w0, i0 = m.route(x)
    set_bias(m, [0.0, 0.0, 0.0, 2.0])  # larger than any probability gap: expert 3 is always chosen
    _, probs_b, w1, i1 = m.route(x)
    torch.testing.assert_close(probs_b, probs, rtol=0, atol=0)  # the router's probabilities ignore the bias
    assert (i1 == 3).any(dim=-1).all() and not torch.equal(i1, i0)
    # the weights are the *unbiased* probabilities of the chosen experts, renormalised
    chosen = torch.gather(probs, 1, i1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True), rtol=0, atol=0)
    # where the biased choice coincides with the unbiased one, the weights are bit-identical
    same = (i1.sort(-1).values == i0.sort(-1).values).all(-1)
    assert same.any()
    for n in torch.nonzero(same).flatten().tolist():
        for j in range(2):
            torch.testing.assert_close(w1[n, j], w0[n, (i0[n] == i1[n, j]).nonzero()[0, 0]], rtol=0, atol=0)


def test_bias_gets_no_gradient_and_is_a_checkpointed_buffer():
    m, _ = make(dtype=torch.float32, moe_bias_update_rate=0.01)
    assert "routing_bias" in m.state_dict() and "routing_bias" not in dict(m.named_parameters())
    assert torch.equal(m.routing_bias, torch.zeros(4)) and m.routing_bias.dtype == torch.float32
    plain, _ = make()
    assert "routing_bias" not in plain.state_dict()  # off: the state of other models is unchanged


def test_update_moves_bias_toward_balance():
    m, _ = make(moe_bias_update_rate=0.25)
    m.update_routing_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5: over, under, even, even
    assert m.routing_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    m.update_routing_bias(torch.tensor([1, 2, 3, 6]))  # integer counts too; mean 3
    assert m.routing_bias.tolist() == [0.0, 0.5, 0.0, -0.25]
    with pytest.raises(ValueError, match=r"expert_counts must have shape \(4,\)"):
        m.update_routing_bias(torch.ones(3))
    off, _ = make()
    with pytest.raises(ValueError, match="moe_bias_update_rate > 0"):
        off.update_routing_bias(torch.ones(4))


def _train_router(rate, steps=60, seed=0):
    """A MoE layer whose inputs favour expert 0 and starve expert 3, trained on a regression target with no
    load-balancing loss; with rate > 0 the bias is updated after every step. Returns the imbalance of the last
    step and the final bias."""
    m, _ = make(dtype=torch.float32, seed=seed, moe_bias_update_rate=rate or 0.0, moe_diversity_loss_coef=0.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        m.gate.weight[0, 0], m.gate.weight[3, 0] = 1.5, -1.5
    target = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    imbalance = []
    for _ in range(steps):
        x = torch.randn(4, 16, 16)
        x[..., 0] = x[..., 0].abs() + 0.5
        y, stats = m(x)
        loss = (y - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rate:
            m.update_routing_bias(stats.expert_counts)
        imbalance.append(float(stats.imbalance))
    return sum(imbalance[-10:]) / 10, m.routing_bias


def test_bias_lowers_load_imbalance_in_training():
    without, _ = _train_router(0)
    with_bias, bias = _train_router(0.02)
    assert without > 1.6  # expert 0 keeps far more than its share
    assert with_bias < 1.35 and with_bias < without - 0.4
    assert bias[0] < 0 < bias[3]  # the favoured expert is pushed down, the starved one up


def test_top_p_experts_per_token_moves_with_p_and_respects_the_cap():
    """For a fixed router, the mean experts per token is non-decreasing in p, 1 at a tiny p and the cap k at p = 1;
    no token takes more than k."""
    m, _ = make(moe_top_k=3)
    m.eval()
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    means = []
    for p in (0.01, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        m.top_p = p
        _, _, w, i = m.route(x.reshape(-1, 16))
        taken = (i < 4).sum(-1)
        assert taken.min() >= 1 and taken.max() <= 3
        torch.testing.assert_close(w.sum(-1), torch.ones(100), rtol=0, atol=2.4e-7)  # the router is fp32: 2 ulp
        _, stats = m(x)
        assert float(stats.experts_per_token) == float(taken.float().mean())
        means.append(float(stats.experts_per_token))
    assert means == sorted(means) and means[0] == 1.0 and means[-1] == 3.0 and len(set(means)) >= 4


def test_stats_report_experts_per_token_and_imbalance():
    m, _ = make()
    m.eval()
    x = skewed_input(m, 2, 9, 16)
    _, s = m(x, pad_mask(2, 9, [9, 4]))
    counts = s.expert_counts
    assert float(s.experts_per_token) == 2.0  # top-2: every real token takes two
    assert float(s.imbalance) == pytest.approx(float(counts.max() / counts.mean()))
    assert float(s.imbalance) > 1.0 and counts[-1] == 0  # skewed: expert 3 idle


@pytest.mark.parametrize("prefill, step", [(5, 1), (3, 4)])
def test_top_p_with_bias_decoding_equals_full_forward(prefill, step):
    """Dropless (eval) top-p routing with a routing bias: prefill + decode gives the full forward's logits."""
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("hybrid", use_moe=True, num_experts=4, moe_top_k=3, moe_top_p=0.6,
                                           moe_bias_update_rate=0.01)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.routing_bias.copy_(torch.randn(4) * 0.05)
            block.mlp.gate.weight.mul_(30.0)  # a confident router: some tokens stop before the cap
    ids = torch.randint(0, 61, (3, 17))
    out = model(ids)
    per_token = torch.stack([s.experts_per_token for s in out.moe_stats])
    assert (per_token > 1).all() and (per_token < 3).all()  # the count varies in every layer
    cache = model.new_cache(3, capacity=4)
    logits = [model(ids[:, :prefill], cache=cache).logits]
    for t in range(prefill, 17, step):
        logits.append(model(ids[:, t:t + step], cache=cache).logits)
    torch.testing.assert_close(torch.cat(logits, 1), out.logits, rtol=0, atol=1e-5)


def test_model_update_routing_bias_checks_its_input():
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("hybrid", use_moe=True, num_experts=4, moe_bias_update_rate=0.5))
    L = len(model.blocks)
    counts = torch.zeros(L, 4)
    counts[:, 0] = 8.0
    model.update_routing_bias(counts)
    for block in model.blocks:
        assert block.mlp.routing_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="expert_counts must be"):
        model.update_routing_bias(torch.zeros(L + 1, 4))
    dense = EnhancedMiniMaxGPT(tiny_config("hybrid", use_moe=True, num_experts=4))
    assert not dense.balances_routing and model.balances_routing
    with pytest.raises(ValueError, match="moe_bias_update_rate"):
        dense.update_routing_bias(counts)


@pytest.mark.parametrize("field, value, message", [
    ("moe_top_p", 0.0, "moe_top_p must be None"),
    ("moe_top_p", 1.5, "moe_top_p must be None"),
    ("moe_top_p", float("nan"), "moe_top_p must be None"),
    ("moe_bias_update_rate", -0.1, "moe_bias_update_rate must be a finite number >= 0"),
    ("moe_bias_update_rate", float("inf"), "moe_bias_update_rate must be a finite number >= 0"),
])
def test_config_rejects_bad_routing_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        MiniMaxConfig(use_moe=True, **{field: value})


def test_reference_is_plain_top_k_without_the_options():
    """Without top-p or bias the reference routes by plain top-k, as before."""
    m, _ = make()
    m.eval()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    y, _ = moe_forward_reference(m, x)
    torch.testing.assert_close(m(x)[0], y, rtol=1e-12, atol=1e-12)
