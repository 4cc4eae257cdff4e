"""Data-parallel training from outside the model: process group set-up, `parallelize`, and rank-aware helpers.

    torchrun --nproc_per_node 4 -m minimax_gpt train --config default --train.parallel fsdp

`[train] parallel` picks the engine: "none" (one process), "ddp" (DistributedDataParallel: every rank holds the whole
model and optimizer, gradients are all-reduced) or "fsdp" (FSDP2, `torch.distributed.fsdp.fully_shard` on every
block, then on the root: parameters, gradients and optimizer state are sharded across ranks and all-gathered block by
block). The backend is NCCL on CUDA (each rank takes `cuda:LOCAL_RANK`) and gloo on CPU. Started without torchrun,
"ddp" / "fsdp" run as a group of one (a HashStore, no ports), so a config means the same thing under both launchers.
The model file never imports torch.distributed: everything here wraps it (torchtitan's `parallelize`).

The global batch does not depend on the number of ranks. `phases.batch_size` is the *global* micro-batch: every rank
draws the same batch_size window starts from the same seeded generator (a DistributedSampler in spirit) and reads
only its own batch_size / W rows of them, so the ranks read disjoint parts of every batch, the tokens of a step are
batch_size * seq_len * grad_accum_steps whatever W is, and W ranks train on exactly the batches one process would.
That is what makes "W ranks == 1 process" testable end to end and lets a run resume on a different number of ranks
with the same data order.

Reductions, each applied exactly once (`GlobalBatchLoss`):

* Cross-entropy. Each rank's loss is its local token mean scaled by n_r * W / N (n_r its target tokens, N the
  all-reduced total), so the data-parallel *mean* of the ranks' gradients, which DDP and FSDP compute, is the gradient
  of the global token mean. With equal rows per rank and no ignored targets the scale is 1.
* MoE auxiliary losses. The balance loss E * sum_e f_e P_e is not linear in the batch, so averaging per-rank balance
  losses is *not* the global-batch loss. The router statistics (expert_counts, prob_sum, z_sum, num_tokens of every
  layer) are summed over ranks with an autograd-aware all-reduce (`_AllReduceSum`) and the losses
  are computed once from the global sums, identically on every rank. Its backward sums the W ranks' identical upstream
  gradients (x W) and the data-parallel mean divides by W: the gradient of the global aux loss, counted once (not
  W times, the known bug of adding per-rank aux losses on top of an all-reduce). The diversity loss depends on the
  weights only and is the same on every rank. Capacity limits (moe_capacity_factor) stay per rank and per micro-batch,
  as they are per micro-batch under gradient accumulation: exact equality with one process holds for dropless routing.
* The reported loss is the mean over ranks of the ranks' losses (`all_reduce_mean`), i.e. the global-batch loss, and
  gradient accumulation divides by grad_accum_steps in the training loop, once.

Only rank 0 logs at INFO, draws the progress bar, and writes metrics, summaries and plots; the other ranks log
warnings and errors only.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

from minimax_gpt.training.run_config import PARALLEL_MODES  # ("none", "ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among world_size, the device it trains on, the engine ("none", "ddp",
    "fsdp" or "hsdp"), and the device mesh whose named dimensions are the parallel degrees (None for one process).
    dp_replicate x dp_shard x sp = world_size; ranks are numbered with sp innermost, so the sp ranks of one group
    are consecutive and read the same rows of every batch (each its own slice of the sequence)."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    ep: int = 1  # expert-parallel group size (groups of ep consecutive ranks; not a dimension of `mesh`)
    expert_mesh: Any = None  # (ep_dp, ep): ranks holding the same experts x one expert-parallel group
    mesh: Any = None

    @property
    def enabled(self) -> bool:
        """A process group is in use (parallel is "ddp", "fsdp" or "hsdp")."""
        return self.parallel != "none"

    @property
    def sharded(self) -> bool:
        """Parameters are sharded by FSDP2 (alone, or inside each replica of HSDP)."""
        return self.parallel in ("fsdp", "hsdp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: groups that read different rows."""
        return self.world_size // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        """This rank's slice of every sequence, 0 .. sp - 1."""
        return self.rank % self.sp


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_degrees(parallel: str, degrees: dict[str, int] | None, world_size: int) -> tuple[str, dict[str, int]]:
    """(data-parallel engine, degrees with -1 resolved) from `train.parallel` (a shorthand for the data-parallel
    degrees) and the [parallel] degrees, in mesh order; ValueError naming the degrees and the world size when their
    product is not the world size. Any degree beyond dp_replicate and dp_shard is one more mesh dimension."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"train.parallel is {parallel!r}; allowed: {', '.join(PARALLEL_MODES)}")
    given = {"dp_replicate": 1, "dp_shard": 1, **(degrees or {})}
    ep = given.pop("ep", 1)  # expert parallelism borrows data-parallel ranks: not a mesh dimension
    if parallel != "none":  # the shorthand: every rank replicates (ddp) or shards (fsdp)
        given.update({"dp_replicate": -1, "dp_shard": 1} if parallel == "ddp" else {"dp_replicate": 1, "dp_shard": -1})
    elif ep > 1 and all(v == 1 for v in given.values()):
        given["dp_shard"] = -1  # ep alone: FSDP2 over every rank, as torchtitan
    known = math.prod(v for v in given.values() if v != -1)
    resolved = {k: (world_size // known if v == -1 and world_size % known == 0 else v) for k, v in given.items()}
    if math.prod(resolved.values()) != world_size or -1 in resolved.values():
        shown = " x ".join(f"parallel.{k} {v}" for k, v in given.items())
        launch = ("this is one process: launch with torchrun --nproc_per_node N" if world_size == 1
                  else f"launched as WORLD_SIZE={world_size} (torchrun)")
        raise ValueError(f"{shown} must multiply to the world size {world_size} ({launch}); -1 takes the rest")
    if world_size % ep:
        raise ValueError(f"parallel.ep = {ep} must divide the world size {world_size} (expert-parallel groups of ep "
                         "consecutive ranks)")
    if ep > 1:
        resolved["ep"] = ep
    if parallel != "none":
        if ep > 1 and parallel == "ddp":
            raise ValueError(f"parallel.ep = {ep} shards the experts with FSDP2, which DDP cannot hold: use "
                             "--train.parallel fsdp, or the [parallel] degrees (ep alone means dp_shard = -1)")
        return parallel, resolved
    r, s = resolved["dp_replicate"], resolved["dp_shard"]
    if ep > 1:  # FSDP2 over every rank (dp_shard x sp) holds the experts' shards: never DDP
        return ("hsdp" if r > 1 else "fsdp"), resolved
    # parameters are replicated over any other dimension (sequence parallelism): DDP averages their gradients
    return ("hsdp" if r > 1 and s > 1 else "fsdp" if s > 1 else "ddp" if world_size > 1 else "none"), resolved


def setup(parallel: str, device_name: str = "auto", degrees: dict[str, int] | None = None) -> DistContext:
    """The DistContext of this process; initialises the default process group and the device mesh for a parallel
    engine (once per process; destroyed at exit) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT, or as a group of one without them (`train.parallel` ddp / fsdp only). `degrees`: the [parallel]
    table. Raises ValueError for an unknown mode, degrees that do not multiply to the world size, or one process
    of a multi-process launch without an engine (every rank would train alone and overwrite the others' files)."""
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if parallel == "none" and world_size > 1 and not any(v != 1 for v in (degrees or {}).values()):
        raise ValueError(f"launched as rank {rank} of WORLD_SIZE={world_size} (torchrun) but train.parallel is "
                         "'none' and every [parallel] degree is 1; set --train.parallel ddp or --train.parallel "
                         "fsdp, or the degrees (--parallel.dp_replicate -1 for DDP, --parallel.dp_shard -1 for FSDP)")
    mode, resolved = resolve_degrees(parallel, degrees, world_size)
    if mode == "none":
        from minimax_gpt.training.devices import resolve_device

        return DistContext(device=resolve_device(device_name))
    device = _rank_device(mode, device_name, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    device_id=device if device.type == "cuda" else None)
        else:
            if world_size > 1:
                raise ValueError(f"WORLD_SIZE={world_size} without MASTER_ADDR / MASTER_PORT: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(teardown)
    from torch.distributed.device_mesh import init_device_mesh

    dims = {k: v for k, v in resolved.items() if k != "ep"}
    mesh = init_device_mesh(device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
    ep = resolved.get("ep", 1)
    expert_mesh = None
    if ep > 1:  # not a slice of `mesh`: ep borrows data-parallel ranks, the ep ranks of a group are consecutive
        from torch.distributed.device_mesh import DeviceMesh

        expert_mesh = DeviceMesh(device.type, torch.arange(world_size).view(world_size // ep, ep),
                                 mesh_dim_names=("ep_dp", "ep"))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger("minimax_gpt").setLevel(logging.WARNING)
    return DistContext(parallel=mode, rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       dp_replicate=resolved["dp_replicate"], dp_shard=resolved["dp_shard"],
                       sp=resolved.get("sp", 1), ep=ep, expert_mesh=expert_mesh, mesh=mesh)


def _rank_device(mode: str, device_name: str, local_rank: int) -> torch.device:
    if device_name == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = torch.device(device_name).type
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train.device is {device_name!r} but CUDA is not available")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"train.parallel = {mode!r} runs on cpu (gloo) or cuda (NCCL), not {device_name!r}")
    if device_type != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                         "use --nproc_per_node <= the number of GPUs")
    device = torch.device("cuda", local_rank)  # one GPU per rank: train.device's index is ignored
    torch.cuda.set_device(device)
    return device


def teardown() -> None:
    """Destroy the default process group if one is up (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled and ctx.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(ctx: DistContext):
    """Rank 0 runs the block first (e.g. preparing data), then the others (which then find its output)."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a detached tensor; `t` itself when there is no group of two or more."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is True on any rank (a MAX all-reduce): ranks decide together, e.g. to stop
    when a signal reached only some of them, or at different steps. `flag` itself without a group."""
    if not ctx.enabled or ctx.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] without a group."""
    if not ctx.enabled or ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def seed_rank(seed: int, ctx: DistContext, step: int = 0) -> None:
    """Give ranks > 0 their own torch RNG stream (dropout, router jitter) after the model was initialised from the
    shared seed; rank 0 keeps the stream of a single-process run. With step > 0 (a resume that has no saved stream for
    this rank) every rank > 0 gets a fresh, deterministic stream for that step."""
    if ctx.rank == 0:
        return
    digest = hashlib.sha256(f"{seed}/{ctx.rank}/{step}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# --- data -------------------------------------------------------------------------------------------------------
class RankBatches:
    """`get_batch` of a TokenDataset, returning this rank's rows of the global batch.

    All ranks draw the same batch_size window starts from their (identically seeded) generators, exactly as
    `TokenDataset.get_batch` does, and data-parallel rank d reads rows [d * b, (d + 1) * b) with b = batch_size /
    dp_size: disjoint rows, and the union over ranks is the batch one process would read. Under sequence parallelism
    the sp ranks of a group read the same rows and each keeps its slice of seq_len / sp columns."""

    def __init__(self, dataset, ctx: DistContext):
        self.dataset, self.ctx = dataset, ctx

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, batch_size: int, seq_len: int, generator: torch.Generator):
        W, r = self.ctx.dp_size, self.ctx.dp_rank
        check_split(batch_size, seq_len, self.ctx)
        tokens = self.dataset.tokens
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the training split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator).numpy()
        b = batch_size // W
        index = starts[r * b:(r + 1) * b, None] + np.arange(seq_len + 1)  # (b, T+1)
        xy = torch.from_numpy(tokens[index].astype(np.int64))  # (b, T+1)
        return sequence_slice(xy[:, :-1], self.ctx), sequence_slice(xy[:, 1:], self.ctx)  # x, y: (b, T / sp)


def check_split(batch_size: int, seq_len: int, ctx: DistContext, where: str = "") -> None:
    """ValueError naming the numbers when a batch's rows do not split over the data-parallel ranks or its sequences
    over the sequence-parallel ranks."""
    if batch_size % ctx.dp_size:
        raise ValueError(f"{where}batch_size = {batch_size} is the global micro-batch and must be divisible by the "
                         f"number of data-parallel ranks ({ctx.dp_size})")
    if seq_len % ctx.sp:
        raise ValueError(f"{where}seq_len = {seq_len} must be divisible by parallel.sp = {ctx.sp} (each "
                         "sequence-parallel rank takes an equal slice)")


def sequence_slice(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous slice of the columns (B, T) -> (B, T / sp)."""
    if ctx.sp == 1:
        return x.contiguous()
    return x.tensor_split(ctx.sp, dim=1)[ctx.sp_rank].contiguous()


def shard_training_data(dataset, phases, ctx: DistContext):
    """`dataset` for one process, else its RankBatches; checks that every phase's batch_size divides by the ranks."""
    if ctx.world_size == 1:
        return dataset
    for i, phase in enumerate(phases):
        check_split(phase.batch_size, phase.seq_len, ctx, f"phases.{i}.")
    return RankBatches(dataset, ctx)


@torch.no_grad()
def evaluate_sharded(model: nn.Module, batches, ctx: DistContext, precision: str = "fp32",
                     loss_chunk_size: int = 0) -> tuple[float, int]:
    """`train.evaluate` with every batch's rows split over the data-parallel ranks (and its sequences over the
    sequence-parallel ranks) and the sums all-reduced: the same
    (mean cross-entropy per token, tokens) as one process evaluating all of them. Every rank runs the same number of
    forwards (FSDP needs it): a rank whose share of a short last batch is empty runs one row with weight 0."""
    from minimax_gpt.training.devices import autocast_context

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for x, y in batches:
        check_split(ctx.dp_size, x.shape[1], ctx, "evaluation ")  # any number of rows; the sequence must split
        rows = torch.tensor_split(torch.arange(x.shape[0]), ctx.dp_size)[ctx.dp_rank]
        weight = 1.0
        if rows.numel() == 0:
            rows, weight = torch.arange(1), 0.0
        xr, yr = (sequence_slice(t[rows], ctx).to(ctx.device) for t in (x, y))
        with autocast_context(ctx.device, precision):
            out = model(xr, targets=yr, loss_chunk_size=loss_chunk_size)
        total += float(out.ce_loss) * yr.numel() * weight
        count += yr.numel() * weight
    model.train(was_training)
    if ctx.world_size > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    if count.item() == 0:
        raise ValueError("evaluation got no batches")
    return total.item() / count.item(), int(count.item())


class NullMetricsLog:
    """MetricsLog's interface for ranks other than 0: nothing is written."""

    records: list = []

    def write(self, record) -> None:
        pass

    def close(self) -> None:
        pass


# --- the model --------------------------------------------------------------------------------------------------
def parallelize(model: nn.Module, ctx: DistContext, compile: bool = False) -> nn.Module:
    """The module to train with, built from outside the model in torchtitan's order: activation checkpointing (when
    `model.config.use_checkpoint`), the data-parallel engine of `ctx` (DDP on dp_replicate, FSDP2 on dp_shard, HSDP on
    both), then `torch.compile` when `compile`. Each step is one function of (model, ctx); a new mesh dimension adds
    one more (sequence or expert parallelism go between checkpointing and the data-parallel engine, as in
    torchtitan). Returns `model` itself for one process without compile; else `GlobalBatchLoss` around DDP(model),
    or around `model` after fully_shard on every block and then on the root (in place: `model`'s parameters become
    sharded DTensors, so build the optimizer after this call). Weights must be identical on every rank before the
    call (same seed); DDP also broadcasts rank 0's."""
    from minimax_gpt.training.devices import compile_for_training

    apply_activation_checkpointing(model)
    apply_sequence_parallel(model, ctx)
    apply_expert_parallel(model, ctx)
    wrapped = _data_parallel(model, ctx)
    return compile_for_training(wrapped, model.config) if compile else wrapped


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (`model.config.use_checkpoint`), with
    torch's composable `checkpoint` (non-reentrant; forward hooks, so parameter names and state dicts do not change
    and FSDP2 shards the same modules). The model's own per-block checkpointing is switched off, so it runs once.
    A no-op when use_checkpoint is off or it was applied already."""
    if not model.config.use_checkpoint or not model.gradient_checkpointing:
        return
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)
    model.gradient_checkpointing = False


def apply_sequence_parallel(model: nn.Module, ctx: DistContext) -> None:
    """Split every sequence over the `sp` mesh dimension (minimax_gpt.parallel.sequence): the model's layers call the
    installed handle for the exchanges; forwards without a cache use it. A no-op for sp = 1."""
    if ctx.sp == 1:
        return
    unsupported = sorted({t for t in model.config.layer_types if t not in ("lightning", "softmax")})
    if unsupported:
        raise ValueError(f"parallel.sp = {ctx.sp}: sequence parallelism splits lightning and softmax layers; this "
                         f"model also has {unsupported} layers")
    from minimax_gpt.parallel.sequence import SequenceParallel

    model.sequence_parallel = SequenceParallel(ctx.mesh["sp"].get_group())


def apply_expert_parallel(model: nn.Module, ctx: DistContext) -> None:
    """Keep E / ep of each MoE layer's experts on each rank of an ep group (minimax_gpt.parallel.expert): the layers
    send their kept rows to the experts' ranks and back. A no-op for ep = 1."""
    if ctx.ep == 1:
        return
    if not model.config.use_moe:
        raise ValueError(f"parallel.ep = {ctx.ep} spreads MoE experts over ranks, but model.use_moe is false")
    from minimax_gpt.models.moe import MoEFeedForward
    from minimax_gpt.parallel.expert import ExpertParallel

    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            ExpertParallel.install(module, ctx.expert_mesh["ep"])


def _shard_mesh(ctx: DistContext):
    """The mesh FSDP2 shards over: dp_shard, flattened with sp when sequence parallelism is on (the sp ranks hold
    the same parameters, so they shard them too, as torchtitan does with its context-parallel dimension); HSDP adds
    dp_replicate as the outer, replicated dimension."""
    if ctx.sp == 1:
        return ctx.mesh[("dp_replicate", "dp_shard")] if ctx.parallel == "hsdp" else ctx.mesh["dp_shard"]
    flat = ctx.mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
    return ctx.mesh[("dp_replicate", "dp_shard_sp")] if ctx.parallel == "hsdp" else flat


def _data_parallel(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.enabled:
        return model
    if ctx.sharded:  # FSDP2 over dp_shard; HSDP (replicated over dp_replicate, sharded within) on the 2-D mesh
        from torch.distributed.fsdp import fully_shard

        mesh = _shard_mesh(ctx)
        if ctx.ep > 1:
            from minimax_gpt.parallel.expert import fully_shard_experts

            fully_shard_experts(model, ctx.expert_mesh["ep_dp"], ctx.world_size)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return GlobalBatchLoss(model, ctx)
    return GlobalBatchLoss(model, ctx, ddp=True)


def reshard(model: nn.Module) -> None:
    """Shard FSDP2 parameters that a forward left gathered. FSDP2 keeps the root module's parameters gathered after
    a forward for its backward; after an evaluation or sampling forward no backward comes, and until the next
    training step `model.parameters()` would hand out the gathered tensors, not the sharded parameters the
    optimizer holds (a `freeze` applied then would miss them) and the full weights would stay in memory."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class GlobalBatchLoss(nn.Module):
    """Wraps the data-parallel model so that each rank's `out.loss` is its share of the *global-batch* loss (module
    docstring): cross-entropy weighted by the rank's share of target tokens, plus the MoE auxiliary losses computed
    from router statistics summed over ranks. `out.ce_loss`, `out.aux_losses` and `out.moe_stats` become the global
    values (detached where they are for logging). For "ddp" the DDP wrapper is built here, and rebuilt when the set of
    trainable parameters changes (a phase's `freeze`), since DDP fixes it at construction."""

    def __init__(self, model: nn.Module, ctx: DistContext, ddp: bool = False):
        super().__init__()
        self.model, self.ctx, self.ddp = model, ctx, ddp
        self._trainable: tuple[bool, ...] | None = None
        self._engine: nn.Module = model
        self._rebuild_if_needed()

    def _rebuild_if_needed(self) -> None:
        """DDP fixes its set of trainable parameters at construction: rebuild it when a phase's freeze changed it.
        FSDP2 follows requires_grad of the sharded parameters (`reshard` before changing it after an evaluation)."""
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable == self._trainable:
            return
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self._engine = DDP(self.model, device_ids=ids)
        self._trainable = trainable

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, **kwargs):
        self._rebuild_if_needed()
        out = self._engine(input_ids, targets=targets, **kwargs)
        if targets is None or self.ctx.world_size == 1:
            return out
        from minimax_gpt.models.model import IGNORE_INDEX, CausalLMOutput
        from minimax_gpt.models.moe import moe_aux_losses, moe_total_aux_loss

        W = self.ctx.world_size
        valid = targets != IGNORE_INDEX
        if kwargs.get("attention_mask") is not None:
            valid = valid & kwargs["attention_mask"][:, -targets.shape[1]:].bool()
        n_local = valid.sum().to(torch.float32)
        stats = out.moe_stats
        L = len(stats)
        pieces = [n_local.reshape(1)]
        if L:
            pieces += [torch.stack([s.expert_counts for s in stats]).flatten(),  # (L*E,)
                       torch.stack([s.prob_sum for s in stats]).flatten(),  # (L*E,)
                       torch.stack([s.z_sum for s in stats]),  # (L,)
                       torch.stack([s.num_tokens for s in stats]),  # (L,)
                       torch.stack([s.expert_counts.sum() * (1 - s.dropped_fraction) for s in stats])]  # (L,) kept
        local = torch.cat([p.float() for p in pieces])
        summed = _AllReduceSum.apply(local)  # backward: the sum of the ranks' gradients
        n_global = summed[0].detach()
        ce = out.ce_loss * (n_local * W / n_global.clamp(min=1))
        loss, aux_losses, global_stats = ce, {}, []
        if L:
            E = stats[0].expert_counts.numel()
            counts, prob_sum, z_sum, tokens, kept = torch.split(summed[1:], [L * E, L * E, L, L, L])
            counts, prob_sum = counts.view(L, E), prob_sum.view(L, E)
            for i, s in enumerate(stats):
                total = counts[i].sum().clamp(min=1)
                global_stats.append(dataclasses.replace(
                    s, expert_counts=counts[i].detach(), prob_sum=prob_sum[i], z_sum=z_sum[i],
                    num_tokens=tokens[i].detach(), load=(counts[i] / total).detach(),
                    dropped_fraction=((counts[i].sum() - kept[i]) / total).detach()))
            config = self.model.config
            aux_losses = moe_aux_losses(global_stats, config)
            loss = ce + moe_total_aux_loss(aux_losses, config)
        ce_global = all_reduce_mean(out.ce_loss.detach() * n_local * W / n_global.clamp(min=1))
        return CausalLMOutput(out.logits, loss, ce_loss=ce_global, aux_losses=aux_losses, moe_stats=global_stats,
                              cache=out.cache)


class _AllReduceSum(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradients (sum): d(sum_r x_r)/dx_r = 1 on every rank, for every
    rank's upstream gradient. torch.distributed.nn.functional.all_reduce, which does the same, is deprecated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad
