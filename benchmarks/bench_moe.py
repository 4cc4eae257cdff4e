"""MoE dispatch benchmark: vectorised MoEFeedForward (grouped_mm and bmm kernels) vs the per-expert reference loop vs
transformers' MiniMaxSparseMoeBlock (same weights copied in) vs a dense SwiGLU MLP with the same active parameters
(hidden width k * I). fp32, forward and forward+backward, medians over repeats. JSON to benchmarks/results/moe.json.

    python benchmarks/bench_moe.py [--tokens 512 4096 16384] [--experts 4 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.training.hostmem import tune_malloc
from minimax_gpt.models.moe import MoEFeedForward, moe_forward_reference


class DenseSwiGLU(nn.Module):
    def __init__(self, C: int, H: int):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(C, H, bias=False), nn.Linear(C, H, bias=False), nn.Linear(H, C, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def hf_block(moe: MoEFeedForward, C: int, I: int, E: int, k: int):
    from transformers.models.minimax.configuration_minimax import MiniMaxConfig as HFConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxSparseMoeBlock

    cfg = HFConfig(hidden_size=C, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k,
                   router_jitter_noise=0.0, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                   experts_implementation="eager")
    blk = MiniMaxSparseMoeBlock(cfg)
    with torch.no_grad():
        blk.gate.weight.copy_(moe.gate.weight)
        blk.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))
        blk.experts.down_proj.copy_(moe.w2)
    return blk, str(cfg._experts_implementation or "eager")


def timeit_interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Round-robin over the implementations so that load from other processes hits all of them alike.
    Returns name -> (median, min) seconds."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    ts = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(v), min(v)) for name, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--C", type=int, default=256)
    ap.add_argument("--I", type=int, default=512)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    ap.add_argument("--tune-malloc", action="store_true", help="hostmem.tune_malloc first (all cases)")
    args = ap.parse_args()
    tuned = args.tune_malloc and tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C, I, k = args.C, args.I, args.k
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, C={C} I={I} k={k}")
    print(f"{'E':>2} {'tokens':>6} {'pass':>8} | {'grouped':>8} {'bmm':>8} {'ref':>8} {'hf':>8} {'dense':>8} | "
          f"{'ref/vec':>7} {'hf/vec':>6} {'vec/dense':>9}")
    for E in args.experts:
        cfg = MiniMaxConfig(n_embd=C, intermediate_size=I, num_experts=E, moe_top_k=k, use_moe=True)
        moe = MoEFeedForward(cfg, 0)
        hf, hf_impl = hf_block(moe, C, I, E, k)
        dense = DenseSwiGLU(C, k * I)
        for N in args.tokens:
            x = torch.randn(1, N, C)
            reps = 7 if N <= 4096 else 3
            impls = {
                "grouped": lambda x: (moe.__setattr__("dispatch", "grouped_mm"), moe(x)[0])[1],
                "bmm": lambda x: (moe.__setattr__("dispatch", "bmm"), moe(x)[0])[1],
                "ref": lambda x: moe_forward_reference(moe, x)[0],
                "hf": lambda x: hf(x),
                "dense": lambda x: dense(x),
            }
            for mode in ("fwd", "fwd+bwd"):
                runs = {}
                for name, f in impls.items():
                    if mode == "fwd":
                        def run(f=f):
                            with torch.no_grad():
                                f(x)
                    else:
                        xg = x.clone().requires_grad_()

                        def run(f=f, xg=xg):
                            f(xg).sum().backward()
                    runs[name] = run
                both = timeit_interleaved(runs, reps)
                t = {n: v[0] for n, v in both.items()}
                vec = t["bmm"]  # what "auto" dispatch runs
                row = {"E": E, "tokens": N, "pass": mode, **{f"{n}_median_s": v[0] for n, v in both.items()},
                       **{f"{n}_min_s": v[1] for n, v in both.items()},
                       "ref_over_vec": t["ref"] / vec, "hf_over_vec": t["hf"] / vec, "vec_over_dense": vec / t["dense"],
                       "grouped_over_bmm": t["grouped"] / t["bmm"]}
                rows.append(row)
                print(f"{E:>2} {N:>6} {mode:>8} | " + " ".join(f"{t[n] * 1e3:7.1f}m" for n in impls)
                      + f" | {row['ref_over_vec']:7.2f} {row['hf_over_vec']:6.2f} {row['vec_over_dense']:9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "dtype": "float32", "device": "cpu", "C": C, "I": I, "k": k, "hf_experts_implementation": hf_impl,
        "tune_malloc": tuned,
        "note": "ratios use medians; vec = bmm dispatch (the default); dense = SwiGLU with hidden k*I (same active "
                "params); implementations timed round-robin; the machine was shared with other jobs",
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
