"""CPU timing of block-sparse (MoBA) attention against dense causal SDPA, forward+backward, in one process.

At B=1, H=Hkv=8, D=64 (the model's defaults: n_head=8, n_embd=512), fp32, block 512, top-k 4, for each sequence length:
  - sparse: minimax_gpt.ops.block_sparse.block_sparse_attention (the gate, then the chosen blocks only);
  - dense:  F.scaled_dot_product_attention(is_causal=True), the softmax layer's kernel.
The machine may be shared, so the two are interleaved in each round (one repeat of each, the order alternating) and
medians, minimums and per-round ratios are reported with the load average before and after; ratios are
dense / sparse.

Correctness at every length, before timing: the fast path in float64 against the block-masked dense reference
(block_sparse_attention_naive, in query chunks so 32k fits in memory); max |difference| is reported (must be <= 1e-10).

    python benchmarks/bench_sparse_attention.py [--seq-lens 4096 16384 32768] [--repeats 3] [--threads N]
                                                [--tune-malloc] [--no-check] [--out PATH]

Writes benchmarks/results/sparse_attention.json by default. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minimax_gpt.ops.block_sparse import block_sparse_attention, block_sparse_attention_naive
from minimax_gpt.training.hostmem import tune_malloc

B, H, D = 1, 8, 64


def inputs(T: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3))
    return q, k, v, torch.randn(B, H, T, D, generator=g, dtype=dtype)


def check(T: int, block: int, top_k: int) -> float:
    """max |fast - reference| in float64 at length T."""
    q, k, v, _ = inputs(T, torch.float64)
    with torch.no_grad():
        fast = block_sparse_attention(q, k, v, block, top_k)
        ref = block_sparse_attention_naive(q, k, v, block, top_k, query_chunk=256)
    return float((fast - ref).abs().max())


def cases(T: int, block: int, top_k: int) -> dict:
    q, k, v, grad = inputs(T, torch.float32)

    def run(fn):
        def step():
            fn(q, k, v).backward(grad)
            q.grad = k.grad = v.grad = None
        return step

    return {
        "sparse": run(lambda q, k, v: block_sparse_attention(q, k, v, block, top_k)),
        "dense": run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }


def measure(T: int, block: int, top_k: int, repeats: int) -> dict:
    fns = cases(T, block, top_k)
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    per_round = [d / s for d, s in zip(times["dense"], times["sparse"])]  # the two timed back to back
    return {"times_s": times, "median_s": med, "min_s": {n: min(t) for n, t in times.items()},
            "speedup_median": med["dense"] / med["sparse"],
            "speedup_min": min(times["dense"]) / min(times["sparse"]),
            "speedup_per_round": per_round, "speedup_per_round_median": statistics.median(per_round)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tune-malloc", action="store_true",
                    help="hostmem.tune_malloc first, as minimax-gpt train does on CPU (both paths share it)")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 comparison with the reference")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparse_attention.json"))
    args = ap.parse_args()
    tuned = args.tune_malloc and tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"shape": {"B": B, "H": H, "Hkv": H, "D": D, "dtype": "float32"}, "block": args.block,
              "top_k": args.top_k, "repeats": args.repeats, "tune_malloc": tuned, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "lengths": {}}
    for T in args.seq_lens:
        load_before = os.getloadavg()
        row = {"max_abs_diff_fp64": None if args.no_check else check(T, args.block, args.top_k)}
        row.update(measure(T, args.block, args.top_k, args.repeats))
        row["loadavg_before_after"] = [load_before[0], os.getloadavg()[0]]
        result["lengths"][str(T)] = row
        print(f"T={T}: sparse {row['median_s']['sparse']:.3f}s  dense {row['median_s']['dense']:.3f}s  "
              f"speedup {row['speedup_median']:.2f}x (min-based {row['speedup_min']:.2f}x)  "
              f"fp64 diff {row['max_abs_diff_fp64']}  load {row['loadavg_before_after']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
