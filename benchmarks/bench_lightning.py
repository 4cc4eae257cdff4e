"""CPU timing of lightning_attn_chunked (fused and autograd backward) against causal SDPA, forward+backward.

At B=1, H=8, D=64, fp32, for each thread count and sequence length, times forward+backward of
  - fused:    lightning_attn_chunked(..., backward="fused"), the hand-written chunked backward;
  - packed:   lightning_attn_chunked_packed, the same op as the layer calls it (q, k, v read from the projection's
              (B, H, T, 3D) view, gradient written into its layout: no concatenation or transpose copies);
  - autograd: lightning_attn_chunked(..., backward="autograd"), the block form under plain autograd;
  - sdpa:     F.scaled_dot_product_attention(is_causal=True);
plus the chunked forward alone (no grad) and a 1024^3 fp32 matmul, the throughput reference.
q, k, v are what the layer passes: non-contiguous views of one (B, T, H, 3D) tensor (--contiguous for
plain tensors). The machine is shared, so the candidates are interleaved round-robin, one repeat of
each per round, and both the median and the minimum are reported, with the load average.

Matmul FLOPs are counted per algorithm (C chunk size, per chunk of C tokens, per head, D = Dv):
  forward                   2C^2(D + Dv) + 4 C D Dv
  fused backward            2C^2(3D + 2Dv) + 8 C D Dv   (recomputes q k^T)
  autograd backward         2 x forward                 (every matmul has two gradient matmuls)
and the achieved GFLOP/s is compared with the matmul's, measured in the same rounds.

    python benchmarks/bench_lightning.py [--seq-lens 1024 16384] [--threads 1 2] [--repeats 5]

Writes benchmarks/results/lightning.json. A measurement script, not a test.
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

from minimax_gpt.training.hostmem import tune_malloc
from minimax_gpt.ops import lightning_attn_chunked, lightning_attn_chunked_packed, lightning_slopes

B, H, D = 1, 8, 64


def chunk_flops(T: int, C: int) -> dict[str, float]:
    """Matmul FLOPs of one forward and of each backward over the whole (B, H, T) input (D = Dv)."""
    C = min(C, T)
    per_chunk_fwd = 2 * C * C * (D + D) + 4 * C * D * D
    per_chunk_fused_bwd = 2 * C * C * (3 * D + 2 * D) + 8 * C * D * D
    n = B * H * T / C
    return {
        "fwd": n * per_chunk_fwd,
        "fused": n * (per_chunk_fwd + per_chunk_fused_bwd),
        "packed": n * (per_chunk_fwd + per_chunk_fused_bwd),
        "autograd": n * 3 * per_chunk_fwd,
    }


def make_cases(T: int, chunk_size: int, contiguous: bool) -> dict:
    """name -> zero-argument callable on fixed fp32 inputs (B, H, T, D)."""
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(B, T, H, 3 * D, generator=g) * 0.3).requires_grad_(True)  # (B, T, H, 3D), as in the layer
    grad_out = torch.randn(B, H, T, D, generator=g)
    slopes = lightning_slopes(H, 0, 8)
    plain = [t.detach().contiguous().requires_grad_(True) for t in qkv.transpose(1, 2).split(D, dim=-1)]

    def inputs():
        if contiguous:
            return plain
        return qkv.transpose(1, 2).split(D, dim=-1)  # 3 x (B, H, T, D) views

    def clear():
        for t in [qkv, *plain]:
            t.grad = None

    def chunked(backward):
        def run():
            out, _ = lightning_attn_chunked(*inputs(), slopes, chunk_size=chunk_size, backward=backward)
            out.backward(grad_out)
            clear()

        return run

    def packed():
        """What the layer calls: the packed op on the (B, H, T, 3D) view, dqkv written in the projection's layout."""
        out, _ = lightning_attn_chunked_packed(qkv.transpose(1, 2), slopes, chunk_size=chunk_size)
        out.backward(grad_out)
        clear()

    def chunked_fwd():
        with torch.no_grad():
            lightning_attn_chunked(*inputs(), slopes, chunk_size=chunk_size)

    def sdpa():
        F.scaled_dot_product_attention(*inputs(), is_causal=True).backward(grad_out)
        clear()

    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    return {
        "fused": chunked("fused"),
        "packed": packed,
        "autograd": chunked("autograd"),
        "fwd": chunked_fwd,
        "sdpa": sdpa,
        "gemm": lambda: a @ b,
    }


def interleaved(cases: dict, repeats: dict[str, int], warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each case, measured round-robin so load changes hit all cases alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cases}
    for r in range(max(repeats.values())):
        for name, fn in cases.items():
            if r < repeats[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="repeats of the chunked cases and the matmul")
    p.add_argument("--sdpa-repeats", type=int, default=3, help="SDPA is O(T^2): 18 s a call at 16k")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--contiguous", action="store_true", help="contiguous q, k, v instead of the layer's views")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lightning.json")
    p.add_argument("--tune-malloc", action="store_true", help="hostmem.tune_malloc first (all cases)")
    args = p.parse_args()
    tuned = args.tune_malloc and tune_malloc()

    results = {
        "shape": {"B": B, "H": H, "D": D, "dtype": "float32", "chunk_size": args.chunk_size},
        "inputs": "contiguous" if args.contiguous else "views of one (B, T, H, 3D) tensor, as in the layer",
        "torch": torch.__version__,
        "tune_malloc": tuned,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "rows": [],
        "summary": [],
    }
    repeats = {"fused": args.repeats, "packed": args.repeats, "autograd": args.repeats, "fwd": args.repeats, "gemm": args.repeats,
               "sdpa": args.sdpa_repeats}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s), fwd+bwd ms as median (min); GF/s from the median ==")
        print(f"{'T':>6} {'fused':>15} {'packed':>15} {'autograd':>15} {'sdpa':>17} {'fwd only':>13} {'sdpa/fused':>10} "
              f"{'auto/fused':>10} {'fused GF/s':>10} {'gemm GF/s':>9} {'% gemm':>6} {'packed %':>8} {'load':>5}")
        rows = []
        for T in args.seq_lens:
            times = interleaved(make_cases(T, args.chunk_size, args.contiguous), repeats, args.warmup)
            med = {k: statistics.median(v) for k, v in times.items()}
            low = {k: min(v) for k, v in times.items()}
            flops = chunk_flops(T, args.chunk_size)
            gemm_gflops = 2 * 1024**3 / med["gemm"] / 1e9
            row = {
                "threads": threads, "T": T, "median_s": med, "min_s": low, "flops": flops,
                "gemm_gflops": gemm_gflops,
                "gflops": {k: flops[k] / med[k] / 1e9 for k in ("fused", "packed", "autograd", "fwd")},
                "loadavg_1min": os.getloadavg()[0],
            }
            row["pct_of_gemm"] = {k: 100 * g / gemm_gflops for k, g in row["gflops"].items()}
            rows.append(row)
            results["rows"].append(row)

            def cell(k, w):
                return f"{med[k] * 1e3:.1f} ({low[k] * 1e3:.1f})".rjust(w)

            print(f"{T:>6} {cell('fused', 15)} {cell('packed', 15)} {cell('autograd', 15)} {cell('sdpa', 17)} {cell('fwd', 13)} "
                  f"{med['sdpa'] / med['fused']:10.1f} {med['autograd'] / med['fused']:10.2f} "
                  f"{row['gflops']['fused']:10.1f} {gemm_gflops:9.1f} {row['pct_of_gemm']['fused']:6.0f} "
                  f"{row['pct_of_gemm']['packed']:8.0f} "
                  f"{row['loadavg_1min']:5.1f}", flush=True)

        by_t = {r["T"]: r for r in rows}
        summary = {"threads": threads}
        lo, hi = min(by_t), max(by_t)
        for name in ("fused", "packed", "autograd"):
            summary[f"{name}_growth_{hi}_over_{lo}"] = {
                "median": by_t[hi]["median_s"][name] / by_t[lo]["median_s"][name],
                "min": by_t[hi]["min_s"][name] / by_t[lo]["min_s"][name],
            }
        summary[f"sdpa_over_fused_at_{hi}"] = by_t[hi]["median_s"]["sdpa"] / by_t[hi]["median_s"]["fused"]
        if 8192 in by_t:
            summary["pct_of_gemm_at_8192"] = by_t[8192]["pct_of_gemm"]
            summary["pct_of_gemm_at_8192_from_min"] = {
                k: 100 * by_t[8192]["flops"][k] / by_t[8192]["min_s"][k] / (2 * 1024**3 / by_t[8192]["min_s"]["gemm"])
                for k in ("fused", "packed", "autograd", "fwd")
            }
        results["summary"].append(summary)
        g = summary[f"fused_growth_{hi}_over_{lo}"]
        print(f"fused growth {hi}/{lo}: {g['median']:.1f}x median, {g['min']:.1f}x min; "
              f"sdpa/fused at {hi}: {summary[f'sdpa_over_fused_at_{hi}']:.1f}x", end="")
        if 8192 in by_t:
            print(f"; fused at 8192: {summary['pct_of_gemm_at_8192']['fused']:.0f}% of matmul GF/s "
                  f"({summary['pct_of_gemm_at_8192_from_min']['fused']:.0f}% from minima); packed (the layer's "
                  f"call): {summary['pct_of_gemm_at_8192']['packed']:.0f}% "
                  f"({summary['pct_of_gemm_at_8192_from_min']['packed']:.0f}%)", end="")
        print(flush=True)
        results["loadavg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))  # after each thread count: a long run keeps its rows

    print(f"\nload average start {results['loadavg_start']}, end {results['loadavg_end']} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
