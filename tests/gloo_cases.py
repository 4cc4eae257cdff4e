"""Run many small checks in one gloo process group per world size (starting processes is the slow part).

A test module lists its cases per world size, `{name: (fn, args)}`, each `fn(rank, world, *args)` asserting what it
checks, and asks the `GlooCases` object for a case's outcome: every rank writes "ok" or its traceback per case."""

from __future__ import annotations

import socket
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, cases: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, (fn, args) in cases.items():
            try:
                fn(rank, world, *args)
                outcome = "ok"
            except Exception:  # noqa: BLE001 - reported by the test of this case
                outcome = traceback.format_exc()
            Path(out_dir, f"{name}.{rank}").write_text(outcome)
            dist.barrier()
    finally:
        dist.destroy_process_group()


class GlooCases:
    """`cases_for(world)` -> the cases of that world size; each world's group runs once, when first asked."""

    def __init__(self, cases_for: Callable[[int], dict], tmp_path_factory):
        self.cases_for, self.tmp = cases_for, tmp_path_factory
        self.done: dict[int, Path] = {}

    def check(self, name: str, world: int) -> None:
        if world not in self.done:
            out = self.tmp.mktemp(f"gloo{world}")
            mp.start_processes(_entry, args=(world, free_port(), self.cases_for(world), str(out)), nprocs=world,
                               join=True, start_method="spawn")
            self.done[world] = out
        for rank in range(world):
            outcome = (self.done[world] / f"{name}.{rank}").read_text()
            assert outcome == "ok", f"rank {rank}:\n{outcome}"
