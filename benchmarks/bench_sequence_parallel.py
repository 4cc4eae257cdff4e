"""Sequence parallelism on this machine (gloo, CPU): memory per rank, bytes per layer, step time, for sp = 1, 2, 4.

    python benchmarks/bench_sequence_parallel.py --out benchmarks/results/sequence_parallel.json

A 7:1 hybrid MoE (8 layers, 7 lightning + 1 softmax, GQA, RoPE, 4 experts top-2, n_embd 128) trains one step on
one sequence split over sp ranks (parameters replicated, gradients all-reduced). For each sp it reports:

* memory per rank (the largest over the ranks): weights + gradients + AdamW moments (16 bytes per parameter, the same on every rank) plus the
  bytes autograd saves for backward during the forward, counted with `torch.autograd.graph.saved_tensors_hooks`
  (unique storages; this is the part that grows with the sequence). The budget is what one process needs at
  --budget-tokens; the longest sequence each sp fits in it is found from two measured lengths (memory is affine in
  T) and then verified by running that length;
* bytes each lightning layer and the softmax layer send per step (forward and backward collectives) at two lengths;
* the median step time at --time-tokens (on a shared 2-core machine the 4-process figures mostly measure contention).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _config(max_tokens: int):
    from minimax_gpt import MiniMaxConfig

    return MiniMaxConfig(vocab_size=256, block_size=max_tokens, n_layer=8, hybrid_period=8, n_head=4, n_kv_head=2,
                         n_embd=128, use_moe=True, num_experts=4, moe_top_k=2, lightning_chunk_size=64)


def _saved_bytes_and_step(model, optimizer, ids: torch.Tensor) -> tuple[int, float]:
    """One training step on this rank's slice: (bytes saved for backward, seconds)."""
    import torch.distributed as dist

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(ids, targets=ids)
    loss.backward()
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(storages.values()), time.perf_counter() - start


def _worker(rank: int, world: int, port: int, args, out_file: str) -> None:
    import torch.distributed as dist

    from minimax_gpt import EnhancedMiniMaxGPT
    from minimax_gpt.parallel.sequence import SENT_BYTES, SequenceParallel

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = _config(args.max_tokens)
    model = EnhancedMiniMaxGPT(config).train()
    if world > 1:
        model.sequence_parallel = SequenceParallel(dist.group.WORLD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fixed = 16 * sum(p.numel() for p in model.parameters())  # weights, gradients, two AdamW moments (fp32)
    g = torch.Generator().manual_seed(1)

    def step(T: int) -> tuple[int, float, dict]:
        ids = torch.randint(0, 256, (1, T), generator=g)
        mine = ids.tensor_split(world, dim=1)[rank]
        SENT_BYTES.clear()
        saved, seconds = _saved_bytes_and_step(model, optimizer, mine)
        worst = torch.tensor([fixed + saved, seconds], dtype=torch.float64)
        if world > 1:  # the budget must hold on every rank (later slices gather more keys); every rank agrees on T
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return int(worst[0]), float(worst[1]), dict(SENT_BYTES)

    result = {"sp": world, "fixed_bytes": fixed}
    (m1, _, sent1), (m2, _, sent2) = step(args.probe_tokens[0]), step(args.probe_tokens[1])
    t1, t2 = args.probe_tokens
    slope = (m2 - m1) / (t2 - t1)
    unit = 64 * world
    longest = int((args.budget - (m1 - slope * t1)) / slope) // unit * unit
    while step(longest + unit)[0] <= args.budget:  # the fit is close, not exact: walk to the boundary
        longest += unit
    while longest > unit and step(longest)[0] > args.budget:
        longest -= unit
    result.update(longest_tokens=longest, memory_at_longest=step(longest)[0], bytes_per_token=slope)
    n_lightning = config.layer_types.count("lightning")
    result["sent_per_layer"] = {
        str(t): {"lightning": s.get("lightning", 0) / n_lightning, "softmax": s.get("softmax", 0)}
        for t, s in ((t1, sent1), (t2, sent2))}
    step(args.time_tokens)  # warm-up
    times = [step(args.time_tokens)[1] for _ in range(args.repeats)]
    result["step_seconds_median"] = statistics.median(times)
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _budget(args) -> int:
    """Per-rank bytes one process needs for one step at --budget-tokens."""
    out = Path(args.tmp) / ".budget.json"
    mp.start_processes(_budget_worker, args=(args, str(out)), nprocs=1, join=True, start_method="spawn")
    memory = json.loads(out.read_text())["memory"]
    out.unlink()
    return memory


def _budget_worker(rank: int, args, out_file: str) -> None:
    from minimax_gpt import EnhancedMiniMaxGPT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(_config(args.max_tokens)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (1, args.budget_tokens))
    saved, _ = _saved_bytes_and_step(model, optimizer, ids)
    Path(out_file).write_text(json.dumps({"memory": 16 * sum(p.numel() for p in model.parameters()) + saved}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-tokens", type=int, default=4096, help="the per-rank budget is one process at this T")
    parser.add_argument("--probe-tokens", type=int, nargs=2, default=(4096, 16384), help="two lengths (also the "
                        "lengths at which bytes sent are reported)")
    parser.add_argument("--time-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=1 << 18)
    parser.add_argument("--sp", type=int, nargs="+", default=(1, 2, 4))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sequence_parallel.json"))
    args = parser.parse_args()
    args.tmp = str(args.out.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.budget = _budget(args)
    rows = []
    for sp in args.sp:
        part = args.out.parent / f".sp{sp}.json"
        mp.start_processes(_worker, args=(sp, _free_port(), args, str(part)), nprocs=sp, join=True,
                           start_method="spawn")
        rows.append(json.loads(part.read_text()))
        part.unlink()
    base = rows[0]["longest_tokens"]
    for row in rows:
        row["longest_vs_sp1"] = row["longest_tokens"] / base
    report = {"budget_bytes": args.budget, "budget_tokens": args.budget_tokens, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"per-rank budget {args.budget / 2**20:.1f} MiB (one process at {args.budget_tokens} tokens)")
    print(f"{'sp':>3} {'longest T':>10} {'x sp=1':>7} {'MiB there':>10} "
          f"{'lightning B/layer':>18} {'softmax B/layer':>16} {'step s':>8}")
    t1, t2 = (str(t) for t in args.probe_tokens)
    for r in rows:
        sent = r["sent_per_layer"]
        print(f"{r['sp']:>3} {r['longest_tokens']:>10} {r['longest_vs_sp1']:>7.2f} "
              f"{r['memory_at_longest'] / 2**20:>10.1f} "
              f"{sent[t1]['lightning']:>8.0f}/{sent[t2]['lightning']:<9.0f} "
              f"{sent[t1]['softmax']:>7.0f}/{sent[t2]['softmax']:<8.0f} {r['step_seconds_median']:>8.3f}")


if __name__ == "__main__":
    main()
