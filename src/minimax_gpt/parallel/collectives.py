"""Collectives whose backward is the adjoint exchange, for the model-parallel handles (sequence and expert
parallelism), and a count of the bytes each kind of layer sent."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

# bytes each kind of layer sent in collectives since the last reset (forward and backward), for tests and benchmarks
SENT_BYTES: Counter = Counter()
# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single; the package supports torch >= 2.4
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class AllGather(torch.autograd.Function):
    """(...) on each of the group's W ranks -> (W, ...) stacked in rank order. Backward: the ranks' gradients of the
    stacked tensor are summed (all-reduce) and each rank keeps its own slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, kind: str) -> torch.Tensor:
        ctx.group, ctx.kind = group, kind
        W = dist.get_world_size(group)
        out = x.new_empty(W * x.numel())
        all_gather_flat(out, x.reshape(-1), group=group)
        SENT_BYTES[kind] += x.numel() * x.element_size()
        return out.view(W, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        SENT_BYTES[ctx.kind] += grad.numel() * grad.element_size()
        return grad[dist.get_rank(ctx.group)], None, None


class AllToAll(torch.autograd.Function):
    """Rows x (sum(send), C) -> (sum(recv), C): rows [sum(send[:j]), sum(send[:j+1])) go to rank j, rank i's rows for
    this rank arrive in block i. Backward: the same exchange in reverse. Counts the bytes that leave the rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group, kind: str) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group, ctx.kind = recv, send, group, kind
        out = x.new_empty((sum(recv), x.shape[1]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        _count(kind, x, send, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), grad.shape[1]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        _count(ctx.kind, grad, ctx.recv, ctx.group)
        return out, None, None, None, None


def _count(kind: str, x: torch.Tensor, rows_to: list[int], group) -> None:
    """Bytes of x's rows sent to the other ranks of the group."""
    rows = sum(rows_to) - rows_to[dist.get_rank(group)]
    SENT_BYTES[kind] += rows * x.shape[1] * x.element_size()
