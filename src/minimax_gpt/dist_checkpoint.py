"""Checkpoints of data-parallel runs: sharded model and optimizer state with torch.distributed.checkpoint (DCP).

    out/checkpoints/step-000500/
        distcp/               DCP: {"model": ..., "optim": ...} keyed by parameter name (FQN), every rank writing its
                              own shards (FSDP) or rank 0 writing the replicated state (DDP); .metadata last
        config.json           \
        model.safetensors      |  a complete plain checkpoint (`minimax_gpt.checkpoint`): the consolidated weights,
        tokenizer/             |  gathered to rank 0 (one all-gather of the weights per save), so generate, eval and
        run_config.json        |  convert work on it unchanged and single-process tools never need DCP
        trainer_state.pt      /   scaler, progress, schedule, rank 0's RNG states and "rng_per_rank" (every rank's),
                                  "world_size", "parallel"; "optimizer" is only a string
                                  marker: the optimizer state lives in distcp/
        manifest.json         "sharded": {"format": "torch.distributed.checkpoint", "path": "distcp", "world_size",
                              "parallel"}, and every file with its size (written by rank 0 once all ranks are done)

The directory is written under a temporary sibling name (all ranks write distcp/ into it; a shared filesystem is
needed across nodes) and renamed into place by rank 0 after a barrier; `latest` is moved after the rename.

DCP's own reader unpickles `.metadata` and non-tensor items unrestricted; checkpoints are read through
`minimax_gpt.safe_dcp` instead, which runs no code from them.

Because DCP stores tensors by parameter name with their global shapes, `load_training_state` reads the checkpoint
into any layout: FSDP on a different number of ranks, DDP, or one process without a process group (DCP's
no-distributed mode). `dcp_to_safetensors` turns the sharded state into our plain format in one process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from minimax_gpt.atomic import fresh_sibling, replace_directory
from minimax_gpt import safe_dcp
from minimax_gpt.checkpoint import (CHECKPOINTS_DIR, RUN_CONFIG_NAME, TOKENIZER_DIR, TRAINER_STATE_NAME,
                                    read_manifest, resolve_checkpoint, write_latest, write_manifest)
from minimax_gpt.distributed import DistContext, barrier
from minimax_gpt.pretrained import CONFIG_NAME, WEIGHTS_NAME, load_config

DCP_DIR = "distcp"


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the checkpoint's manifest says its training state is sharded (DCP)."""
    return read_manifest(path)["sharded"] is not None


def _sharded_dir(path: Path) -> Path:
    sharded = read_manifest(path)["sharded"]
    if sharded is None:
        raise ValueError(f"{path}: not a distributed checkpoint (its manifest says it is not sharded)")
    return path / sharded["path"]


def save_training_checkpoint(out_dir: str | os.PathLike, step: int, model, optimizer, tokenizer,
                             trainer_state: dict[str, Any], run_config: dict[str, Any], ctx: DistContext) -> Path:
    """`out_dir/checkpoints/step-{step:06d}` (layout above), then `latest`; called by every rank. `model` is the
    unwrapped model (fully_shard-ed in place for FSDP); `trainer_state["optimizer"]` should be a marker, not the state."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    name = f"step-{step:06d}"
    final = root / name
    tmp_name = [None]
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp_name[0] = fresh_sibling(final, "tmp").name
    if ctx.world_size > 1:
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = root / tmp_name[0]
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx.is_main:
            _write_plain_weights(model.config, full, tmp)
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_DIR)
            (tmp / RUN_CONFIG_NAME).write_text(json.dumps(run_config, indent=2) + "\n")
            torch.save(trainer_state, tmp / TRAINER_STATE_NAME)
        barrier(ctx)  # every rank's shards are written
        if ctx.is_main:
            write_manifest(tmp, step, sharded={"format": "torch.distributed.checkpoint", "path": DCP_DIR,
                                               "world_size": ctx.world_size, "parallel": ctx.parallel})
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.is_main:
        replace_directory(tmp, final)
        write_latest(root, name)
    barrier(ctx)
    return final


def load_training_state(path: str | os.PathLike, model, optimizer) -> None:
    """Load a distributed checkpoint's weights and optimizer state into `model` / `optimizer`, whatever their layout
    (FSDP on any number of ranks, DDP's unwrapped module, or a plain model in a process without a group)."""
    path = resolve_checkpoint(path)
    directory = _sharded_dir(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # also creates the optimizer's state to load into
    safe_dcp.load({"model": model_sd, "optim": optim_sd}, directory)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_plain_training_state(path: str | os.PathLike, model, optimizer, trainer_state: dict[str, Any]) -> None:
    """Load a plain (single-process) checkpoint into an FSDP-sharded model and its optimizer: every rank reads the
    full tensors and keeps its own shard (no communication). The optimizer must be built by `train.make_optimizer`,
    so its groups and parameter order are those of the saved one (checked)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from minimax_gpt.pretrained import SafetensorsReader

    def local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(like, DTensor):  # this rank's shard of `full`, sliced locally (src_data_rank=None)
            return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
        return full.to(like.dtype)

    path = resolve_checkpoint(path)
    config = load_config(path)
    if config.to_dict() != model.config.to_dict():
        raise ValueError(f"{path}: the checkpoint's model config differs from the model being trained")
    params = dict(model.named_parameters())  # a tied lm_head.weight is wte.weight, listed once
    with SafetensorsReader(path) as reader:
        if reader.keys() != set(params):
            raise ValueError(f"{path}: its tensors do not match the model's parameters")
        with torch.no_grad():
            for name, p in params.items():
                src = local(reader.get(name), p.data)
                (p.data.to_local() if isinstance(p.data, DTensor) else p.data).copy_(
                    src.to_local() if isinstance(src, DTensor) else src)
    saved = trainer_state["optimizer"]
    ours = optimizer.state_dict()  # ids 0..n-1 in group order, like the saved one
    shapes = [[len(g["params"]) for g in sd["param_groups"]] for sd in (saved, ours)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"{path}: optimizer parameter groups differ: saved {shapes[0]}, this run {shapes[1]}")
    by_id = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for key, entry in saved["state"].items():
        p = by_id[int(key)]
        state[key] = {k: local(v, p.data) if torch.is_tensor(v) and v.shape == p.shape else v
                      for k, v in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def dcp_to_safetensors(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Read a distributed checkpoint's sharded weights in this one process and write our plain format
    (config.json + model.safetensors) to `out_dir`; returns `out_dir`. Needs no process group."""
    from minimax_gpt.model import EnhancedMiniMaxGPT
    from minimax_gpt.pretrained import save_pretrained

    path = resolve_checkpoint(checkpoint)
    directory = _sharded_dir(path)
    model = EnhancedMiniMaxGPT(load_config(path))
    state = {"model": get_model_state_dict(model)}
    safe_dcp.load(state, directory)
    set_model_state_dict(model, state["model"])
    save_pretrained(model, out_dir)
    return Path(out_dir)


def _write_plain_weights(config, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """config.json + model.safetensors from a full state dict, as `pretrained.save_pretrained` writes them."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()
               if not (name == "lm_head.weight" and config.tie_word_embeddings)}
    config.save(directory / CONFIG_NAME)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "minimax_gpt"})
