"""Expert parallelism on this machine (gloo, CPU): per-rank memory, rows sent, step time for ep = 1, 2, 4.

    python benchmarks/bench_expert_parallel.py --out benchmarks/results/expert_parallel.json

A hybrid MoE with 16 experts per layer (4 layers, 3 lightning + 1 softmax, n_embd 128, top-2, dropless) trains on
4 gloo processes through the library's own `setup` and `parallelize` (FSDP2 over every rank; with ep > 1 the experts
are sharded over the ep group and FSDP2 shards them further over the ranks that hold the same experts). For each ep,
counted exactly from the tensors each rank holds (the largest over the ranks):

* expert parameters stored per rank (the local shards, between steps), and those gathered in a MoE layer's forward
  (the working set FSDP2 all-gathers: E / ep experts of the layer);
* every other parameter stored per rank; AdamW state per rank (exp_avg and exp_avg_sq of the local shards);
* a replicated baseline (DDP: every rank holds every parameter and its optimizer state);
* rows each rank sends to other ranks per step in the experts' all-to-alls (forward dispatch and return, and their
  backward), and their bytes; and the bytes FSDP2 moves for the experts' weights and gradients (from the shapes);
* the median step time over --steps steps after one warm-up (4 processes on 2 cores: mostly contention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WORLD = 4


def _config():
    from minimax_gpt import MiniMaxConfig

    return MiniMaxConfig(vocab_size=256, block_size=128, n_layer=4, hybrid_period=4, n_head=4, n_embd=128,
                         use_moe=True, num_experts=16, moe_top_k=2, intermediate_size=256)


def _local_numel(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def _worker(rank: int, port: int, ep: int, steps: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from minimax_gpt import EnhancedMiniMaxGPT
    from minimax_gpt.parallel.collectives import SENT_BYTES
    from minimax_gpt.parallel.distributed import parallelize, setup, teardown
    from minimax_gpt.training.optim import make_optimizer
    from minimax_gpt.training.run_config import TrainConfig

    ctx = setup("none", degrees={"dp_shard": -1, "ep": ep})
    config = _config()
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(config)
    wrapped = parallelize(model, ctx)
    optimizer = make_optimizer(model, TrainConfig(), ctx.device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    expert_names = {n for n, _ in model.named_parameters() if ".experts." in n}
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, config.vocab_size, (2, 128), generator=g)  # 8 x 128 tokens per step over 4 ranks
        SENT_BYTES.clear()
        start = time.perf_counter()
        out = wrapped(ids, targets=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    sent = SENT_BYTES["experts"]
    params = dict(model.named_parameters())
    state = optimizer.state
    experts_per_layer = config.num_experts // ep
    per_expert = sum(params[n].shape[1] * params[n].shape[2] for n in params if n.startswith("blocks.0.mlp.experts."))
    result = {
        "ep": ep, "rank": rank,
        "expert_params_stored": sum(_local_numel(p) for n, p in params.items() if n in expert_names),
        "expert_params_gathered_per_layer": experts_per_layer * per_expert,
        "other_params_stored": sum(_local_numel(p) for n, p in params.items() if n not in expert_names),
        "optimizer_state": sum(_local_numel(v) for s in state.values() for k, v in s.items() if k != "step"),
        "expert_params_total": sum(p.numel() for n, p in params.items() if n in expert_names),
        "other_params_total": sum(p.numel() for n, p in params.items() if n not in expert_names),
        "rows_sent": sent // (config.n_embd * 4), "bytes_sent": sent,
        # FSDP2's traffic for the experts, from the shapes: each MoE layer all-gathers its experts in forward and
        # again in backward (reshard_after_forward) and reduce-scatters their gradients, each moving the part of the
        # gathered experts this rank does not store
        "fsdp_expert_bytes": 3 * 4 * (config.n_layer * experts_per_layer * per_expert
                                      - sum(_local_numel(p) for n, p in params.items() if n in expert_names)),
        "step_s": statistics.median(times),
    }
    Path(out_dir, f"ep{ep}.{rank}.json").write_text(json.dumps(result))
    teardown()


def main() -> None:
    from gloo_cases import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/expert_parallel.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.parent / ".expert_parallel"
    tmp.mkdir(exist_ok=True)
    rows = []
    for ep in (1, 2, 4):
        mp.start_processes(_worker, args=(free_port(), ep, args.steps, str(tmp)), nprocs=WORLD, join=True,
                           start_method="spawn")
        ranks = [json.loads((tmp / f"ep{ep}.{r}.json").read_text()) for r in range(WORLD)]
        row = {k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank"}
        row["step_s"] = statistics.median(r["step_s"] for r in ranks)
        rows.append(row)
    base = rows[0]
    replicated = 16 * (base["expert_params_total"] + base["other_params_total"])  # fp32 weights + grads + 2 moments
    print(f"{'ep':>3} {'experts stored':>15} {'experts gathered/layer':>23} {'other stored':>13} {'optimizer':>10} "
          f"{'rows sent':>10} {'MiB sent':>9} {'FSDP MiB':>9} {'step s':>7}")
    for r in rows:
        print(f"{r['ep']:>3} {r['expert_params_stored']:>15,} {r['expert_params_gathered_per_layer']:>23,} "
              f"{r['other_params_stored']:>13,} {r['optimizer_state']:>10,} {r['rows_sent']:>10,} "
              f"{r['bytes_sent'] / 2**20:>9.2f} {r['fsdp_expert_bytes'] / 2**20:>9.2f} {r['step_s']:>7.3f}")
    print(f"replicated baseline (DDP): {base['expert_params_total'] + base['other_params_total']:,} parameters and "
          f"{2 * (base['expert_params_total'] + base['other_params_total']):,} optimizer values per rank "
          f"({replicated / 2**20:.1f} MiB with gradients)")
    report = {"world_size": WORLD, "threads_per_rank": 1, "torch": torch.__version__, "config": _config().to_dict(),
              "load_average": os.getloadavg(), "rows": rows,
              "replicated_params_per_rank": base["expert_params_total"] + base["other_params_total"]}
    args.out.write_text(json.dumps(report, indent=2))
    for f in tmp.glob("*.json"):
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
