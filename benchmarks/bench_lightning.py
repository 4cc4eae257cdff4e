"""CPU timing of the lightning attention ops against causal softmax attention (SDPA).

Times, at B=1, H=8, D=64, fp32, for each thread count and sequence length:
  - lightning_attn_chunked (default chunk size), lightning_attn_naive (the O(T^2) float64 oracle,
    skipped above --naive-max-t), and F.scaled_dot_product_attention(is_causal=True);
  - forward (no grad) and forward+backward (random contiguous output gradient);
then sweeps the chunk size at the longest lengths to pick the best CPU default.
Medians over --repeats after --warmup runs. Writes benchmarks/results/lightning.json.

    python benchmarks/bench_lightning.py [--seq-lens 512 2048 8192] [--threads 1 2]

This is a measurement script, not a test: the machine's load (reported) moves the numbers.
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

from minimax_gpt.ops import lightning_attn_chunked, lightning_attn_naive, lightning_slopes

B, H, D = 1, 8, 64


def median_seconds(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chunked_flops(T: int, chunk_size: int) -> float:
    """Matmul FLOPs of the chunked forward: per token 2C(D+Dv) intra + 4 D Dv inter/state, times B*H."""
    c = min(chunk_size, T)
    return 2.0 * B * H * T * (2 * c * D + 4 * D * D)


def make_cases(T: int, chunk_size: int):
    """name -> (forward, forward+backward) closures on fresh fp32 inputs of shape (B, H, T, D)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) * 0.3 for _ in range(3))
    grad_out = torch.randn(B, H, T, D, generator=g)
    slopes = lightning_slopes(H, 0, 8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def lightning(fn, **kw):
        def fwd():
            with torch.no_grad():
                fn(q, k, v, slopes, **kw)

        def fwd_bwd():
            out, _ = fn(*leaves, slopes, **kw)
            out.backward(grad_out)

        return fwd, fwd_bwd

    def sdpa():
        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            F.scaled_dot_product_attention(*leaves, is_causal=True).backward(grad_out)

        return fwd, fwd_bwd

    return {
        "chunked": lightning(lightning_attn_chunked, chunk_size=chunk_size),
        "naive": lightning(lightning_attn_naive),
        "sdpa": sdpa(),
    }


def gemm_gflops(repeats: int, warmup: int) -> float:
    """Reference throughput: one 1024^3 fp32 matmul at the current thread count."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_seconds(lambda: a @ b, repeats, warmup) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--sweep-chunks", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--naive-max-t", type=int, default=2048, help="skip the O(T^2) float64 oracle above this T")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lightning.json")
    args = p.parse_args()

    results = {
        "shape": {"B": B, "H": H, "D": D, "dtype": "float32"},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "repeats": args.repeats,
        "timings": [],
        "chunk_sweep": [],
    }
    header = f"{'thr':>3} {'T':>6} {'pass':>8} {'chunked ms':>11} {'naive ms':>10} {'sdpa ms':>10} {'sdpa/chunked':>12} {'naive/chunked':>13} {'chunked GF/s':>12}"
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = gemm_gflops(args.repeats, args.warmup)
        print(f"\n== {threads} thread(s): 1024^3 fp32 matmul {peak:.1f} GFLOP/s ==")
        print(header)
        for T in args.seq_lens:
            cases = make_cases(T, args.chunk_size)
            for pass_idx, pass_name in enumerate(("fwd", "fwd+bwd")):
                row = {"threads": threads, "T": T, "pass": pass_name, "gemm_gflops": peak}
                for name, fns in cases.items():
                    if name == "naive" and T > args.naive_max_t:
                        row[name] = None
                        continue
                    row[name] = median_seconds(fns[pass_idx], args.repeats, args.warmup)
                flops = chunked_flops(T, args.chunk_size) * (1 if pass_name == "fwd" else 3)
                row["chunked_gflops"] = flops / row["chunked"] / 1e9
                results["timings"].append(row)
                naive = f"{row['naive'] * 1e3:10.1f}" if row["naive"] else f"{'skipped':>10}"
                naive_ratio = f"{row['naive'] / row['chunked']:13.1f}" if row["naive"] else f"{'-':>13}"
                print(
                    f"{threads:>3} {T:>6} {pass_name:>8} {row['chunked'] * 1e3:11.1f} {naive} "
                    f"{row['sdpa'] * 1e3:10.1f} {row['sdpa'] / row['chunked']:12.1f} {naive_ratio} "
                    f"{row['chunked_gflops']:12.1f}",
                    flush=True,
                )

        sweep_lens = [T for T in args.seq_lens if T >= 2048] or args.seq_lens[-1:]
        print(f"\n-- chunk-size sweep, fwd+bwd ms, {threads} thread(s) --")
        print(f"{'T':>6} " + " ".join(f"{f'C={c}':>8}" for c in args.sweep_chunks))
        for T in sweep_lens:
            times = []
            for c in args.sweep_chunks:
                fwd_bwd = make_cases(T, c)["chunked"][1]
                times.append(median_seconds(fwd_bwd, args.repeats, args.warmup))
                results["chunk_sweep"].append({"threads": threads, "T": T, "chunk_size": c, "fwd_bwd": times[-1]})
            print(f"{T:>6} " + " ".join(f"{t * 1e3:8.1f}" for t in times), flush=True)

    # Best default: the chunk size with the lowest total fwd+bwd time over all swept cases.
    totals = {c: sum(r["fwd_bwd"] for r in results["chunk_sweep"] if r["chunk_size"] == c) for c in args.sweep_chunks}
    results["best_chunk_size"] = min(totals, key=totals.get)
    results["loadavg_end"] = os.getloadavg()
    print(f"\nbest CPU chunk size (lowest summed fwd+bwd): {results['best_chunk_size']}  totals: "
          + ", ".join(f"C={c}: {t * 1e3:.0f} ms" for c, t in totals.items()))
    print(f"load average start {results['loadavg_start']}, end {results['loadavg_end']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
