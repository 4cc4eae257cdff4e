"""Per-token decode time at short and long context (issue 3): an all-lightning model should not slow down with
context, a softmax model does. Medians over repeated single-token steps; JSON to benchmarks/results/decode.json.

    python benchmarks/bench_decode.py [--threads 2] [--contexts 256 8192] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig


def decode_times(model, context: int, steps: int, chunk: int = 2048) -> list[float]:
    torch.manual_seed(0)
    cache = model.new_cache(1, capacity=context + steps + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    with torch.no_grad():
        for s in range(0, context, chunk):  # chunked prefill keeps the softmax score matrix small
            model(ids[:, s:s + chunk], cache=cache, logits_to_keep=1)
        tok = torch.randint(0, model.config.vocab_size, (1, 1))
        for _ in range(3):  # warm-up steps
            model(tok, cache=cache, logits_to_keep=1)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(tok, cache=cache, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 8192])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/decode.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = dict(n_layer=4, n_head=8, n_embd=512, vocab_size=256, block_size=1024)
    models = {
        "all_lightning": MiniMaxConfig(**base, layer_types=["lightning"] * 4),
        "all_softmax": MiniMaxConfig(**base, use_hybrid_attn=False),
    }
    rows = []
    for name, config in models.items():
        model = EnhancedMiniMaxGPT(config).eval()
        medians = {}
        for ctx in args.contexts:
            times = decode_times(model, ctx, args.steps)
            med = statistics.median(times)
            medians[ctx] = med
            rows.append(dict(model=name, context=ctx, median_ms=1e3 * med,
                             spread_ms=[1e3 * min(times), 1e3 * max(times)]))
            print(f"{name:14s} context {ctx:6d}: {1e3 * med:7.2f} ms/token "
                  f"(min {1e3 * min(times):.2f}, max {1e3 * max(times):.2f})", flush=True)
        lo, hi = min(args.contexts), max(args.contexts)
        print(f"{name:14s} ratio {hi}/{lo}: {medians[hi] / medians[lo]:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows=rows, threads=args.threads, torch=torch.__version__,
                                   machine=platform.machine(), steps=args.steps), indent=2))


if __name__ == "__main__":
    main()
