"""Where the time of our three CPU workloads goes (issue 21): the dense training step at nanoGPT's Shakespeare-char
recipe (and the nanoGPT-architecture reference beside it), the suite's hybrid MoE training step, and a batch-1
decode step after a 512-token prompt.

    python -m benchmarks.profile_steps [--workloads dense nanogpt moe decode] [--threads 1] [--steps 10] [--top 15]

For each workload: the wall time per step without the profiler (median of `--steps`), then the same steps under
`torch.profiler` (CPU): every op's self time summed (`key_averages`), grouped into kinds (matmul, attention,
elementwise, reduction, layout/copy, optimizer, indexing, other), the op count per step, and the wall time the ops do
not cover: Python, module calls, autograd bookkeeping between ops (plus the profiler's own cost per op, so that share
is an upper bound). JSON in benchmarks/results/profile_steps.json; `docs/performance.md` summarises a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.report import write_report
from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.training.hostmem import tune_malloc
from minimax_gpt.training.run_config import load_run_config

ROOT = Path(__file__).resolve().parent.parent

KINDS = {  # op-name fragments -> kind; the first match wins, so order matters
    "optimizer": ("_fused_adamw", "_foreach", "adamw"),
    "attention": ("scaled_dot_product", "flash_attention", "lightning", "_efficient_attention"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
               "aten::_grouped_mm", "aten::addmv", "aten::mv"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),
    "norm": ("rms_norm", "layer_norm", "native_layer_norm"),
    "reduction": ("aten::sum", "aten::mean", "aten::norm", "aten::linalg_vector_norm", "aten::max", "aten::amax",
                  "aten::topk", "aten::softmax", "_softmax", "aten::cumsum", "aten::any", "aten::all", "aten::argmax",
                  "aten::sort", "aten::argsort", "logsumexp"),
    "indexing": ("index", "gather", "scatter", "embedding", "nonzero", "masked", "where"),
    "layout/copy": ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to",
                    "aten::empty", "aten::zeros", "aten::ones", "aten::full", "aten::fill_", "aten::zero_",
                    "aten::view", "aten::reshape", "aten::transpose", "aten::permute", "aten::expand", "aten::slice",
                    "aten::select", "aten::split", "aten::chunk", "aten::unsqueeze", "aten::squeeze", "aten::t",
                    "aten::as_strided", "aten::detach", "aten::alias", "aten::narrow", "aten::unbind", "aten::stack",
                    "aten::arange", "aten::item", "aten::_local_scalar_dense"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::gelu",
                    "aten::sigmoid", "aten::exp", "aten::rsqrt", "aten::pow", "aten::cos", "aten::sin", "aten::clamp",
                    "aten::eq", "aten::ne", "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::bitwise",
                    "aten::logical", "aten::threshold", "aten::__", "aten::sqrt", "aten::abs", "aten::maximum",
                    "aten::minimum", "aten::lerp", "aten::addcmul", "aten::addcdiv", "aten::reciprocal"),
}


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS.items():
        if any(f.lower() in low for f in fragments):
            return kind
    return "other"


# --- workloads: each returns a closure running one step --------------------------------------------------------------
def dense_config():
    return load_run_config("shakespeare_char_cpu").model_config(vocab_size=65)


def training_step(model, x, y, loss_fn, optimizer, grad_clip: float):
    """forward + backward (+ clip) + optimizer step + zero_grad, as a trainer runs it."""
    model.train()

    def step():
        loss = loss_fn(model, x, y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def workload_dense(a):
    from benchmarks.nanogpt_ref import RECIPE, recipe_optimizer

    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(dense_config())
    x, y = _batch(65, RECIPE["batch_size"], 64)
    return training_step(model, x, y, lambda m, x, y: m(x, targets=y).loss, recipe_optimizer(model, fused=True),
                         RECIPE["grad_clip"]), RECIPE["batch_size"] * 64


def workload_nanogpt(a):
    from benchmarks.nanogpt_ref import RECIPE, NanoGPTConfig, NanoGPTReference, recipe_optimizer

    torch.manual_seed(0)
    model = NanoGPTReference(NanoGPTConfig())
    x, y = _batch(65, RECIPE["batch_size"], 64)
    return training_step(model, x, y, lambda m, x, y: m(x, y)[1], recipe_optimizer(model, fused=True),
                         RECIPE["grad_clip"]), RECIPE["batch_size"] * 64


def workload_moe(a):
    from benchmarks.suite import moe_config

    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config())
    x, y = _batch(model.config.vocab_size, 8, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return training_step(model, x, y, lambda m, x, y: m(x, targets=y).loss, opt, 0.0), 8 * 256


def workload_decode(a):
    from benchmarks.suite import moe_config

    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config()).eval()
    prompt, _ = _batch(model.config.vocab_size, 1, 512)
    cache = model.new_cache(1, capacity=512 + 4096)
    with torch.no_grad():
        logits = model(prompt, cache=cache, logits_to_keep=1).logits
    tok = [logits[:, -1].argmax(-1, keepdim=True)]

    def step():
        with torch.no_grad():
            out = model(tok[0], cache=cache, logits_to_keep=1).logits
        tok[0] = out[:, -1].argmax(-1, keepdim=True)

    return step, 1


WORKLOADS = {"dense": workload_dense, "nanogpt": workload_nanogpt, "moe": workload_moe, "decode": workload_decode}


def _batch(V, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


# --- profiling ---------------------------------------------------------------------------------------------------------
def profile_workload(step, steps: int, top: int) -> dict:
    for _ in range(3):
        step()
    wall = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        wall.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        profiled_wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::") or e.key.startswith("minimax_gpt::")]
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6 / steps  # every event's self time, s per step
    kinds: dict[str, float] = {}
    for e in events:
        k = kind_of(e.key) if (e.key.startswith("aten::") or e.key.startswith("minimax_gpt::")) else "other"
        kinds[k] = kinds.get(k, 0.0) + e.self_cpu_time_total / 1e6 / steps
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return dict(
        wall_ms=1e3 * statistics.median(wall), wall_min_ms=1e3 * min(wall),
        profiled_wall_ms=1e3 * profiled_wall,
        ops_self_ms=1e3 * self_total,
        outside_ops_ms=1e3 * (profiled_wall - self_total),
        op_calls_per_step=sum(e.count for e in ops) / steps,
        kinds_ms={k: round(1e3 * v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        top=[dict(op=e.key, calls=e.count / steps, self_ms=round(e.self_cpu_time_total / 1e3 / steps, 3),
                  kind=kind_of(e.key)) for e in rows],
    )


def report(name: str, tokens: int, r: dict) -> str:
    lines = [f"== {name}: {r['wall_ms']:.2f} ms per step (min {r['wall_min_ms']:.2f}), {tokens / r['wall_ms'] * 1e3:,.0f}"
             f" tokens/s; profiled {r['profiled_wall_ms']:.2f} ms = ops {r['ops_self_ms']:.2f} + outside ops "
             f"{r['outside_ops_ms']:.2f} ({r['outside_ops_ms'] / r['profiled_wall_ms']:.0%}); "
             f"{r['op_calls_per_step']:.0f} op calls per step",
             "   by kind (ms per step): " + ", ".join(f"{k} {v:.2f}" for k, v in r["kinds_ms"].items())]
    for t in r["top"]:
        lines.append(f"   {t['self_ms']:8.3f} ms  {t['calls']:6.1f} calls  {t['kind']:12s} {t['op']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--tune-malloc", action="store_true",
                   help="hostmem.tune_malloc first, as minimax-gpt train does on CPU (every workload shares it)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_steps.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    env = dict(torch=torch.__version__, threads=a.threads, steps=a.steps, loadavg_start=os.getloadavg(),
               tune_malloc=a.tune_malloc and tune_malloc())
    results = {}
    for name in a.workloads:
        step, tokens = WORKLOADS[name](a)
        results[name] = dict(tokens_per_step=tokens, **profile_workload(step, a.steps, a.top))
        print(report(name, tokens, results[name]), flush=True)
    write_report(a.out, env, a.threads, results=results)


if __name__ == "__main__":
    main()
