"""Aux-loss-free balancing under data parallelism (2 gloo processes): the expert counts are summed over ranks before
the bias update, so every rank holds the same routing bias after every step. Tested under FSDP2, which never syncs
buffers (DDP broadcasts rank 0's buffers at each forward, which would hide a rank-local update); DDP runs the same
Trainer code path."""

import json
import os
from pathlib import Path

import torch.multiprocessing as mp

from minimax_gpt import EnhancedMiniMaxGPT
from gloo_cases import free_port
from test_distributed import _run
from train_helpers import write_config

BIAS = ["--model.moe_bias_update_rate", "0.01", "--model.moe_aux_loss_coef", "0.0"]
ORIGINAL_UPDATE = EnhancedMiniMaxGPT.update_routing_bias


def _recording(path: Path):
    """EnhancedMiniMaxGPT.update_routing_bias that, after the update, appends this process's biases (one list per
    MoE layer) to `path` as a JSON line."""

    def update(self, expert_counts):
        ORIGINAL_UPDATE(self, expert_counts)
        with open(path, "a") as f:
            f.write(json.dumps([block.mlp.routing_bias.tolist() for block in self.blocks]) + "\n")

    return update


def _worker(rank: int, world: int, port: int, jobs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for config, out_dir, overrides in jobs:
        out = Path(out_dir)
        EnhancedMiniMaxGPT.update_routing_bias = _recording(out.parent / f"{out.name}-rank{rank}.jsonl")
        _run(Path(config), Path(out_dir), *overrides)


def _biases(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_routing_bias_is_equal_on_every_rank_and_follows_one_process(tmp_path, monkeypatch):
    config = write_config(tmp_path, tmp_path / "unused")
    monkeypatch.setattr(EnhancedMiniMaxGPT, "update_routing_bias", _recording(tmp_path / "ref-rank0.jsonl"))
    _run(config, tmp_path / "ref", *BIAS)
    jobs = [(str(config), str(tmp_path / mode), ["--train.parallel", mode, *BIAS]) for mode in ("fsdp",)]
    mp.start_processes(_worker, args=(2, free_port(), jobs), nprocs=2, join=True, start_method="spawn")
    want = _biases(tmp_path / "ref-rank0.jsonl")
    assert len(want) == 6 and any(v != 0 for layer in want[-1] for v in layer)
    for mode in ("fsdp",):
        rank0, rank1 = _biases(tmp_path / f"{mode}-rank0.jsonl"), _biases(tmp_path / f"{mode}-rank1.jsonl")
        assert rank0 == rank1, mode  # bit-identical after every step
        # the global batch is the one the single process sees, so are the summed counts and the bias
        assert rank0 == want, mode
