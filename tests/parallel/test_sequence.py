"""Sequence parallelism on gloo (2 and 4 processes): the lightning op split over ranks equals the single-process op
(output, state after each slice, every gradient), slices of any length; the bytes a lightning layer sends do not
depend on the sequence length; gathered keys and values give each rank the keys up to the end of its slice."""

import pytest
import torch

from gloo_cases import GlooCases
from minimax_gpt.ops.lightning import lightning_attn_chunked, lightning_slopes


def _cases(world: int) -> dict:
    if world == 4:
        return {"fp64_uneven_4": (_op_matches_one_process, ([16, 33, 1, 26], torch.float64, 1e-10, True))}
    return {"fp64_2": (_op_matches_one_process, ([40, 40], torch.float64, 1e-10, False)),
            "fp64_uneven_2": (_op_matches_one_process, ([37, 20], torch.float64, 1e-10, True)),
            "fp32_2": (_op_matches_one_process, ([48, 48], torch.float32, 1e-5, True)),
            "bytes": (_bytes_do_not_grow_with_length, ()),
            "gather_kv": (_gathered_keys, ())}


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> GlooCases:
    return GlooCases(_cases, tmp_path_factory)


def _inputs(lengths, dtype, H=3, D=8, initial=False):
    g = torch.Generator().manual_seed(0)
    T = sum(lengths)
    q, k, v = (torch.randn(2, H, T, D, generator=g, dtype=dtype) * 0.5 for _ in range(3))
    grad_o = torch.randn(2, H, T, D, generator=g, dtype=dtype)
    grad_s = torch.randn(2, H, D, D, generator=g, dtype=dtype)
    s0 = torch.randn(2, H, D, D, generator=g, dtype=dtype) * 0.1 if initial else None
    return q, k, v, grad_o, grad_s, s0


def _op_matches_one_process(rank, world, lengths, dtype, tol, initial):
    import torch.distributed as dist

    from minimax_gpt.parallel.sequence import SequenceParallel, lightning_attn_sequence_parallel

    H, chunk = 3, 16
    slopes = lightning_slopes(H, 1, 4).to(dtype)
    q, k, v, grad_o, grad_s, s0 = _inputs(lengths, dtype, H, initial=initial)
    # the whole sequence in this process: outputs, the state after every slice, gradients of one loss
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    s0_full = s0.clone().requires_grad_() if initial else None
    o, s_end = lightning_attn_chunked(*full, slopes, initial_state=s0_full, chunk_size=chunk)
    ((o * grad_o).sum() + (s_end * grad_s).sum()).backward()
    start, end = sum(lengths[:rank]), sum(lengths[: rank + 1])
    _, s_here = lightning_attn_chunked(q[:, :, :end], k[:, :, :end], v[:, :, :end], slopes, initial_state=s0,
                                       chunk_size=chunk)
    # this rank's slice only
    mine = [t[:, :, start:end].clone().requires_grad_() for t in (q, k, v)]
    s0_mine = s0.clone().requires_grad_() if initial else None
    sp = SequenceParallel(dist.group.WORLD)
    o_r, s_r = lightning_attn_sequence_parallel(*mine, slopes, sp, initial_state=s0_mine, chunk_size=chunk)
    loss = (o_r * grad_o[:, :, start:end]).sum() + ((s_r * grad_s).sum() if rank == world - 1 else 0)
    loss.backward()
    torch.testing.assert_close(o_r, o[:, :, start:end].detach(), rtol=0, atol=tol)
    torch.testing.assert_close(s_r, s_here, rtol=0, atol=tol)
    for name, got, want in zip("qkv", mine, full):
        torch.testing.assert_close(got.grad, want.grad[:, :, start:end], rtol=0, atol=tol, msg=f"d{name}")
    if initial:  # each rank holds its share of the initial state's gradient
        dist.all_reduce(s0_mine.grad)
        torch.testing.assert_close(s0_mine.grad, s0_full.grad, rtol=0, atol=tol)


@pytest.mark.parametrize("name, world", [
    ("fp64_2", 2),  # slices that are not multiples of the chunk size (16)
    ("fp64_uneven_2", 2),  # slices of different lengths, and a state before the sequence
    ("fp64_uneven_4", 4),  # four slices, one of a single token
    ("fp32_2", 2),
])
def test_the_lightning_op_split_over_ranks_equals_one_process(groups, name, world):
    groups.check(name, world)


def _bytes_do_not_grow_with_length(rank, world):
    import torch.distributed as dist

    from minimax_gpt.parallel.sequence import SENT_BYTES, SequenceParallel, lightning_attn_sequence_parallel

    sp = SequenceParallel(dist.group.WORLD)
    slopes = lightning_slopes(4, 0, 2)
    sent = []
    for T in (256, 1024):  # per rank
        q, k, v = (torch.randn(1, 4, T, 16, requires_grad=True) for _ in range(3))
        SENT_BYTES.clear()
        o, _ = lightning_attn_sequence_parallel(q, k, v, slopes, sp, chunk_size=64)
        o.sum().backward()
        sent.append(SENT_BYTES["lightning"])
    state = 4 * 16 * 16 * 4  # one (B, H, D, D) float32 state
    assert sent[0] == sent[1] == state + world * state, sent  # the gather, then its backward's all-reduce


def test_a_lightning_layer_sends_the_same_bytes_at_any_sequence_length(groups):
    groups.check("bytes", 2)


def _gathered_keys(rank, world):
    import torch.distributed as dist

    from minimax_gpt.parallel.sequence import SequenceParallel

    sp = SequenceParallel(dist.group.WORLD)
    C = 5
    full = torch.arange(2 * 2 * world * C * 3, dtype=torch.float64).view(2, 2, world * C, 3)  # (B, Hkv, T, D)
    sp.begin(C, full.device)
    mine = full[:, :, rank * C:(rank + 1) * C].clone().requires_grad_()
    k, v = sp.gather_kv(mine, 2 * mine)
    assert torch.equal(k, full[:, :, :(rank + 1) * C]) and torch.equal(v, 2 * full[:, :, :(rank + 1) * C])
    (k.sum() + v.sum()).backward()  # each key is used by this rank and every later one
    torch.testing.assert_close(mine.grad, torch.full_like(mine, 3.0 * (world - rank)))


def test_softmax_layers_gather_the_keys_up_to_the_end_of_each_slice(groups):
    groups.check("gather_kv", 2)
