"""The checkpoints of a training run, one process or many: one layout, one manifest, one module.

    checkpointer = Checkpointer(out_dir, dctx, keep=train.keep_checkpoints)
    checkpointer.save(step, model, optimizer, tokenizer, trainer_state, run_config)   # every rank
    trainer_state = checkpointer.restore(path, model, optimizer)                     # every rank, any layout
    checkpointer.latest()

    out/checkpoints/step-000500/
        distcp/               model and optimizer state by parameter name (torch.distributed.checkpoint): every rank
                              writes its shards, one process writes one; read back through `safe_dcp`
        config.json           \
        model.safetensors      |  the consolidated weights (gathered to rank 0), so `eval`, `generate` and `convert`
        tokenizer/             |  read every checkpoint alike and never need DCP
        run_config.json       /
        trainer_state.pt      progress, scaler, RNG states of rank 0 and of every rank ("rng_per_rank"), world_size,
                              parallel; "optimizer" is a marker (the state is in distcp/)
        manifest.json         written last: "sharded": {"format": "torch.distributed.checkpoint", "path": "distcp",
                              "world_size", "parallel"} and every file with its size

DCP stores tensors by parameter name with their global shapes, so `restore` reads a checkpoint into any layout:
FSDP on another number of ranks, DDP, or one process without a process group; torch reshards, nothing here does.
Checkpoints written before this layout (single-process ones whose trainer_state.pt holds the optimizer) are read too:
full weights and the optimizer's own state dict, each rank keeping its slice under FSDP (`_restore_full`; torch's
`set_state_dict(full_state_dict=True)` was tried for this and ended in a gloo collective mismatch on 2 FSDP ranks). The directory is written under a temporary sibling and renamed by rank 0 after a barrier; `latest` moves
after the rename, so an interrupted save leaves the previous checkpoint, and the pointer to it, intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from minimax_gpt.parallel.expert import quiet_redistribution
from minimax_gpt.training import safe_dcp
from minimax_gpt.atomic import fresh_sibling, replace_directory
from minimax_gpt.training.checkpoint import (CHECKPOINTS_DIR, RUN_CONFIG_NAME, TOKENIZER_DIR, TRAINER_STATE_NAME,
                                    check_same_config, latest_checkpoint, load_trainer_state, prune_checkpoints,
                                    read_manifest, resolve_checkpoint, write_latest, write_manifest)
from minimax_gpt.parallel.distributed import DistContext, barrier
from minimax_gpt.interop.pretrained import SafetensorsReader, load_config, write_weights

logger = logging.getLogger(__name__)

DCP_DIR = "distcp"
OPTIMIZER_MARKER = "in distcp/ (torch.distributed.checkpoint)"


class Checkpointer:
    """Save, restore, find and prune the checkpoints of the run in `out_dir` (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, dctx: DistContext, keep: int = 0):
        self.out_dir, self.dctx, self.keep = Path(out_dir), dctx, keep
        self.root = self.out_dir / CHECKPOINTS_DIR

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def save(self, step: int, model, optimizer, tokenizer, trainer_state: dict[str, Any],
             run_config: dict[str, Any]) -> Path:
        """`checkpoints/step-{step:06d}`, then `latest`, then pruning to `keep`; called by every rank with the
        unwrapped model (fully_shard-ed in place under FSDP). A failed write raises OSError naming the checkpoint
        and leaves the previous one in place."""
        final = self.root / f"step-{step:06d}"
        try:
            tmp = self._temporary(final)
            try:
                self._write(tmp, step, model, optimizer, tokenizer, trainer_state, run_config)
            except BaseException:
                if self.dctx.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            if self.dctx.is_main:
                replace_directory(tmp, final)
                write_latest(self.root, final.name)
        except OSError as e:  # disk full, quota, permissions: nothing under a final name was touched
            try:
                previous = self.latest()
            except OSError:
                previous = None
            kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
            raise OSError(e.errno, f"could not write checkpoint {final}: {e.strerror or e}; {kept}") from e
        barrier(self.dctx)
        if self.dctx.is_main:
            for old in prune_checkpoints(self.out_dir, self.keep):
                logger.info("deleted checkpoint %s (train.keep_checkpoints = %d)", old, self.keep)
        return final

    def _temporary(self, final: Path) -> Path:
        """A fresh hidden sibling of `final`, made by rank 0 and named to every rank."""
        name = [None]
        if self.dctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            name[0] = fresh_sibling(final, "tmp").name
        if self.dctx.world_size > 1:
            dist.broadcast_object_list(name, src=0)
        return self.root / name[0]

    def _write(self, tmp: Path, step: int, model, optimizer, tokenizer, trainer_state: dict[str, Any],
               run_config: dict[str, Any]) -> None:
        dctx = self.dctx
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # one process is the intent: no "torch.distributed is disabled" warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR),
                     no_dist=not dctx.enabled)
        with quiet_redistribution():  # expert parallelism's 2-D expert weights
            full = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                    if dctx.enabled else model.state_dict())
        if dctx.is_main:
            write_weights(model.config, full, tmp)
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_DIR)
            (tmp / RUN_CONFIG_NAME).write_text(json.dumps(run_config, indent=2) + "\n")
            torch.save({**trainer_state, "optimizer": OPTIMIZER_MARKER, "world_size": dctx.world_size,
                        "parallel": dctx.parallel}, tmp / TRAINER_STATE_NAME)
        barrier(dctx)  # every rank's shards are written
        if dctx.is_main:
            write_manifest(tmp, step, sharded={"format": "torch.distributed.checkpoint", "path": DCP_DIR,
                                               "world_size": dctx.world_size, "parallel": dctx.parallel})

    def restore(self, path: str | os.PathLike, model, optimizer) -> dict[str, Any]:
        """Load a checkpoint's weights and optimizer state into `model` / `optimizer` (plain, DDP's module, or FSDP
        on any number of ranks); returns its trainer state. The model config must be the checkpoint's."""
        path = resolve_checkpoint(path)
        state = load_trainer_state(path, required=("optimizer", "scaler", "rng", "progress"))
        check_same_config(path, model)
        if read_manifest(path)["sharded"] is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)  # also creates the optimizer state to load into
            safe_dcp.load({"model": model_sd, "optim": optim_sd}, path / DCP_DIR)
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        else:
            _restore_full(path, model, optimizer, state["optimizer"])
        return state


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether the checkpoint's manifest says its training state is in distcp/."""
    return read_manifest(path)["sharded"] is not None


def _restore_full(path: Path, model, optimizer, saved_optimizer: dict[str, Any]) -> None:
    """A checkpoint with full weights (model.safetensors) and the optimizer's own state dict (parameters by index),
    as single-process runs wrote before every checkpoint had distcp/. Into a plain model (one process, or DDP's
    module) both load as they are; under FSDP every rank keeps its own slice of each full tensor (sliced locally,
    no communication). The optimizer must be built by `optim.make_optimizer`, so its groups and parameter order are
    those of the saved one (checked)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    shapes = [[len(g["params"]) for g in sd["param_groups"]] for sd in (saved_optimizer, optimizer.state_dict())]
    if shapes[0] != shapes[1]:
        raise ValueError(f"{path}: optimizer parameter groups differ: saved {shapes[0]}, this run {shapes[1]}")

    def local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(like, DTensor):  # this rank's shard of `full` (src_data_rank=None: no broadcast)
            return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
        return full.to(like.dtype)

    params = dict(model.named_parameters())  # a tied lm_head.weight is wte.weight, listed once
    with SafetensorsReader(path) as reader, torch.no_grad():
        if reader.keys() != set(params):
            raise ValueError(f"{path}: its tensors do not match the model's parameters")
        for name, p in params.items():
            src = local(reader.get(name), p.data)
            (p.data.to_local() if isinstance(p.data, DTensor) else p.data).copy_(
                src.to_local() if isinstance(src, DTensor) else src)
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    state = {key: {k: local(v, by_index[int(key)].data) if torch.is_tensor(v) and v.shape == by_index[int(key)].shape
                   else v for k, v in entry.items()}
             for key, entry in saved_optimizer["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved_optimizer["param_groups"]})


def dcp_to_safetensors(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Read a checkpoint's distcp/ weights in this one process and write our plain format (config.json +
    model.safetensors) to `out_dir`; returns `out_dir`. Needs no process group."""
    from minimax_gpt.models.model import EnhancedMiniMaxGPT
    from minimax_gpt.interop.pretrained import save_pretrained

    path = resolve_checkpoint(checkpoint)
    if not is_sharded(path):
        raise ValueError(f"{path}: its manifest says it has no distcp/ to convert")
    model = EnhancedMiniMaxGPT(load_config(path))
    state = {"model": get_model_state_dict(model)}
    safe_dcp.load(state, path / DCP_DIR)
    set_model_state_dict(model, state["model"])
    save_pretrained(model, out_dir)
    return Path(out_dir)
