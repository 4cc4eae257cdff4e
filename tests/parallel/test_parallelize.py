"""`parallelize` applies activation checkpointing from outside the model (one process; the distributed engines are
tested in test_distributed.py): the blocks recompute in backward, gradients and parameter names do not change, and
it runs once, not on top of the model's own checkpointing."""

import copy

import pytest
import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.parallel.distributed import DistContext, apply_activation_checkpointing, parallelize, resolve_degrees


def _model(use_checkpoint: bool) -> EnhancedMiniMaxGPT:
    torch.manual_seed(0)
    config = MiniMaxConfig(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=32, hybrid_period=2,
                           use_moe=True, num_experts=4, dropout=0.1, use_checkpoint=use_checkpoint)
    return EnhancedMiniMaxGPT(config).train()


def _block_calls(model: EnhancedMiniMaxGPT) -> list[int]:
    calls = [0]
    model.blocks[0].norm1.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _step(model: EnhancedMiniMaxGPT, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout masks; the recomputation replays them (preserve_rng_state)
    _, loss = model(ids, targets=ids)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_checkpointing_applied_from_outside_recomputes_each_block_once_with_the_same_gradients():
    plain = _model(use_checkpoint=False)
    outside = _model(use_checkpoint=True)
    assert parallelize(outside, DistContext()) is outside  # one process, no compile: the model itself
    assert outside.gradient_checkpointing is False  # the model's own path is off: applied once
    ids = torch.randint(0, 64, (2, 40))
    calls = _block_calls(outside)
    want_loss, want = _step(plain, ids)
    got_loss, got = _step(outside, ids)
    assert calls[0] == 2  # forward, then the recomputation in backward
    assert got_loss == want_loss and list(got) == list(want)  # same parameter names (hooks, no wrapper module)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert list(outside.state_dict()) == list(plain.state_dict())


def test_checkpointing_is_applied_only_when_configured_and_only_once():
    plain = _model(use_checkpoint=False)
    apply_activation_checkpointing(plain)
    calls = _block_calls(plain)
    _step(plain, torch.randint(0, 64, (2, 16)))
    assert calls[0] == 1  # use_checkpoint off: nothing recomputed

    model = _model(use_checkpoint=True)
    apply_activation_checkpointing(model)
    apply_activation_checkpointing(model)  # a second call changes nothing
    calls = _block_calls(model)
    _step(model, torch.randint(0, 64, (2, 16)))
    assert calls[0] == 2


def test_incremental_decoding_still_equals_a_full_forward_with_checkpointing_applied():
    model = _model(use_checkpoint=True)
    reference = copy.deepcopy(model).eval()
    apply_activation_checkpointing(model)
    model.eval()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        full = reference(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, :30], cache=cache).logits, model(ids[:, 30:], cache=cache).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("degrees, world, want", [
    # a degree beyond data parallelism is one more mesh dimension, in table order, with -1 resolved around it
    ({"dp_replicate": 1, "dp_shard": -1, "sp": 2}, 8, ("fsdp", {"dp_replicate": 1, "dp_shard": 4, "sp": 2})),
    ({"dp_replicate": 2, "dp_shard": 1, "sp": -1}, 4, ("ddp", {"dp_replicate": 2, "dp_shard": 1, "sp": 2})),
])
def test_any_further_degree_is_one_more_mesh_dimension(degrees, world, want):
    assert resolve_degrees("none", degrees, world) == want


def test_sequences_that_do_not_split_over_the_sequence_parallel_ranks_are_refused():
    from minimax_gpt.parallel.distributed import check_split

    ctx = DistContext(parallel="fsdp", rank=1, world_size=4, dp_shard=2, sp=2)
    assert (ctx.dp_size, ctx.dp_rank, ctx.sp_rank) == (2, 0, 1)
    check_split(4, 16, ctx)
    with pytest.raises(ValueError, match=r"phases\.1\.seq_len = 15 must be divisible by parallel\.sp = 2"):
        check_split(4, 15, ctx, "phases.1.")
    with pytest.raises(ValueError, match=r"batch_size = 3 is the global micro-batch and must be divisible by the "
                                         r"number of data-parallel ranks \(2\)"):
        check_split(3, 16, ctx)
