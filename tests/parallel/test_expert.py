"""Expert parallelism on gloo (2 and 4 processes): a MoE layer whose experts are spread over the ranks equals the
same layer running every expert itself (outputs, auxiliary losses, router statistics, every gradient; fp32 1e-5),
dropless and with a capacity limit that drops tokens, including steps where a rank sends no token to some expert."""

import copy

import pytest
import torch

from gloo_cases import GlooCases
from minimax_gpt import MiniMaxConfig
from minimax_gpt.models.moe import MoEFeedForward, moe_aux_losses, moe_total_aux_loss

TOL = 1e-5
STATS = ("expert_counts", "prob_sum", "z_sum", "num_tokens", "diversity", "load", "dropped_fraction")


def _step(moe, config, x, grad_y):
    x = x.clone().requires_grad_()
    y, stats = moe(x)
    aux = moe_aux_losses([stats], config)
    ((y * grad_y).sum() + moe_total_aux_loss(aux, config)).backward()
    return y.detach(), stats, {k: v.detach() for k, v in aux.items()}, x.grad, {
        n: p.grad.clone() for n, p in moe.named_parameters()}


def _layer_matches_without_ep(rank, world, capacity_factor, tokens, top_p=None):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from minimax_gpt.parallel.expert import ExpertParallel

    torch.manual_seed(0)  # the same weights on every rank
    config = MiniMaxConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, intermediate_size=24, use_moe=True,
                           num_experts=4, moe_top_k=2, moe_capacity_factor=capacity_factor,
                           moe_diversity_loss_coef=0.01, moe_top_p=top_p)
    plain = MoEFeedForward(config, 0).train()
    spread = copy.deepcopy(plain)
    ExpertParallel.install(spread, init_device_mesh("cpu", (world,)))  # each rank keeps E / world experts
    assert spread.experts.w1.to_local().shape[0] == config.num_experts // world
    g = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank
    x, grad_y = torch.randn(2, tokens, 16, generator=g), torch.randn(2, tokens, 16, generator=g)
    want, got = _step(plain, config, x, grad_y), _step(spread, config, x, grad_y)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=TOL)
    for name in STATS:
        torch.testing.assert_close(getattr(got[1], name), getattr(want[1], name), rtol=0, atol=TOL, msg=name)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=TOL, msg=name)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=TOL, msg="dx")
    # an expert's gradient lives on the rank that runs it (summed over every rank's tokens); the router's on each
    # rank for its own tokens: summed over ranks, both equal the sum of the ranks' gradients without EP
    for name in want[4]:
        a, b = got[4][name], want[4][name]
        if hasattr(a, "full_tensor"):  # an expert weight: this rank's experts' gradient, summed over the tokens
            a = a.full_tensor()  # of every rank; gathered, all E experts'
        else:
            dist.all_reduce(a)
        dist.all_reduce(b)
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=f"d{name}")
    counts = want[1].expert_counts.clone()
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    return torch.stack(every), want[1].dropped_fraction


def _some_rank_sends_no_token_to_some_expert(rank, world):
    counts, _ = _layer_matches_without_ep(rank, world, None, 1)  # 2 tokens x top-2 over 4 experts per rank
    assert (counts == 0).any(), counts


def _capacity_drops(rank, world):
    _, dropped = _layer_matches_without_ep(rank, world, 0.5, 8)
    assert dropped > 0


def _cases(world: int) -> dict:
    return {"dropless": (_layer_matches_without_ep, (None, 12)),
            "capacity": (_capacity_drops, ()),
            "empty_experts": (_some_rank_sends_no_token_to_some_expert, ()),
            "top_p": (_layer_matches_without_ep, (None, 12, 0.6))}


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> GlooCases:
    return GlooCases(_cases, tmp_path_factory)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["dropless", "capacity", "empty_experts", "top_p"])
def test_a_moe_layer_with_its_experts_spread_over_ranks_equals_the_layer(groups, name, world):
    groups.check(name, world)


def test_num_experts_must_divide_over_the_expert_parallel_ranks():
    from types import SimpleNamespace

    from minimax_gpt.parallel import expert

    with pytest.raises(ValueError, match="num_experts = 4 must be divisible by parallel.ep = 3"):
        expert.ExpertParallel(SimpleNamespace(size=lambda: 3), 4)
