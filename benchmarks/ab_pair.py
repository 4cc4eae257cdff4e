"""One change measured alone (issue 21): the package as committed at a base revision against the working tree, in one
process, same weights, same batch, rounds interleaved with alternating order.

    python -m benchmarks.ab_pair --base HEAD --files src/minimax_gpt/models/norm.py [...]
                                 [--workloads dense moe decode] [--rounds 20] [--threads 1]
                                 [--tune-malloc] [--out benchmarks/results/ab.json]

The base revision's `src/minimax_gpt` is exported with `git archive` into a temporary folder twice: as the package
`minimax_gpt_base`, and as `minimax_gpt_new` with the working tree's copies of `--files` laid over it (so that other
uncommitted edits in a shared working tree stay out of the measurement). Every `minimax_gpt` in their sources is
renamed, their torch.library ops included, so both register side by side. Workloads (benchmarks/profile_steps.py has the same three):
  dense   training step at nanoGPT's Shakespeare-char recipe: B12 x T64, forward + backward + clip 1.0 + AdamW (fused)
  moe     the suite's hybrid MoE training step: B8 x T256, forward + backward + AdamW (fused)
  decode  one greedy token at batch 1 with the cache, after a 512-token prompt (suite's hybrid MoE config)
Each round times base and new back to back (wall and this thread's CPU time); the report gives medians, the median
of the per-round ratios base / new (> 1: the working tree is faster), the load average and the thread count, and
whether the first step's loss (or logits) is bit-identical.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, name: str, files: list[str]) -> str:
    """Import the package at `rev`, with the working tree's `files` laid over it, as `name`; returns the commit."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tar = subprocess.run(["git", "archive", commit, "src/minimax_gpt"], cwd=ROOT, capture_output=True, check=True).stdout
    dest = Path(tempfile.mkdtemp(prefix=f"ab_{name}_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    for f in files:
        path, _, source = f.partition("=")  # PATH, or PATH=FILE: PATH's content taken from FILE
        rel = (ROOT / path).resolve().relative_to(ROOT)
        if rel.parts[:2] != ("src", "minimax_gpt"):
            raise ValueError(f"--files takes files of src/minimax_gpt, got {f}")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(Path(source).read_text() if source else (ROOT / rel).read_text())
    pkg = dest / name
    (dest / "src" / "minimax_gpt").rename(pkg)
    for f in pkg.rglob("*"):
        if f.suffix in (".py", ".toml"):
            f.write_text(f.read_text().replace("minimax_gpt", name))
    sys.path.insert(0, str(dest))
    return commit


def build(pkg: str, workload: str, state: dict | None):
    """(step closure, model state_dict, first output) for one package; `state` copies the other side's weights."""
    mg = importlib.import_module(pkg)
    optim = importlib.import_module(f"{pkg}.training.optim")
    run_config = importlib.import_module(f"{pkg}.training.run_config")
    torch.manual_seed(0)
    if workload == "dense":
        run = run_config.load_run_config("shakespeare_char_cpu")
        model, (B, T), clip = mg.EnhancedMiniMaxGPT(run.model_config(vocab_size=65)), (12, 64), 1.0
    else:
        from benchmarks.suite import moe_config

        config = mg.MiniMaxConfig(**_fields(moe_config(), mg.MiniMaxConfig))
        model, (B, T), clip = mg.EnhancedMiniMaxGPT(config), (8, 256), 0.0
    if state is not None:
        model.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    if workload == "decode":
        model.eval()
        prompt = torch.randint(0, V, (1, 512), generator=g)
        cache = model.new_cache(1, capacity=512 + 8192)
        with torch.no_grad():
            first = model(prompt, cache=cache, logits_to_keep=1).logits
        tok = [first[:, -1].argmax(-1, keepdim=True)]

        def step():
            with torch.no_grad():
                out = model(tok[0], cache=cache, logits_to_keep=1).logits
            tok[0] = out[:, -1].argmax(-1, keepdim=True)
            return out

        return step, model.state_dict(), first
    tc = run_config.TrainConfig() if workload == "moe" else run.train
    opt = optim.make_optimizer(model, tc, torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = 1e-3
    model.train()

    def step():
        loss = model(x, targets=y).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, {k: v.clone() for k, v in model.state_dict().items()}, None


def _fields(config, into) -> dict:
    """The config's fields that the (possibly older) config class `into` has."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(into) if f.init}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.name in known}


def measure(workload: str, rounds: int) -> dict:
    new_step, state, new_first = build("minimax_gpt_new", workload, None)
    base_step, _, base_first = build("minimax_gpt_base", workload, state)
    out_new, out_base = new_step(), base_step()
    if workload == "decode":
        same = bool(torch.equal(new_first, base_first) and torch.equal(out_new, out_base))
    else:
        same = bool(torch.equal(out_new, out_base))
    diff = float((out_new.detach().float() - out_base.detach().float()).abs().max())
    fns = {"base": base_step, "new": new_step}
    for _ in range(3):
        for f in fns.values():
            f()
    wall, cpu = {n: [] for n in fns}, {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.thread_time()
            fns[n]()
            cpu[n].append(time.thread_time() - c0)
            wall[n].append(time.perf_counter() - t0)
    med = {f"{k}_{n}_ms": 1e3 * statistics.median(v[n]) for k, v in (("wall", wall), ("cpu", cpu)) for n in names}
    return dict(workload=workload, rounds=rounds, **med,
                per_round_wall=statistics.median(b / a for a, b in zip(wall["new"], wall["base"])),
                per_round_cpu=statistics.median(b / a for a, b in zip(cpu["new"], cpu["base"])),
                first_output_identical=same, first_output_max_diff=diff,
                wall_s={n: [round(t, 6) for t in wall[n]] for n in names},
                cpu_s={n: [round(t, 6) for t in cpu[n]] for n in names})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD")
    p.add_argument("--files", nargs="+", required=True, help="working-tree files of the change measured; PATH=FILE takes PATH's new content from FILE "
                   "(a change laid over the base alone, when the working tree holds other edits to PATH)")
    p.add_argument("--workloads", nargs="+", default=["dense", "moe", "decode"], choices=["dense", "moe", "decode"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tune-malloc", action="store_true", help="hostmem.tune_malloc first (both sides share it)")
    p.add_argument("--label", default="", help="what the working tree changes, recorded in the JSON")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ab.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    commit = export(a.base, "minimax_gpt_base", [])
    export(a.base, "minimax_gpt_new", a.files)
    tuned = False
    if a.tune_malloc:
        from minimax_gpt.training.hostmem import tune_malloc

        tuned = tune_malloc()
    env = dict(base=commit, files=a.files, label=a.label, torch=torch.__version__, threads=a.threads, tune_malloc=tuned,
               loadavg_start=os.getloadavg())
    results = []
    for w in a.workloads:
        r = measure(w, a.rounds)
        results.append(r)
        print(f"{w:7s} base {r['wall_base_ms']:8.2f} ms  new {r['wall_new_ms']:8.2f} ms wall; cpu {r['cpu_base_ms']:8.2f}"
              f" / {r['cpu_new_ms']:8.2f} ms; per round base/new: wall {r['per_round_wall']:.3f}x, cpu "
              f"{r['per_round_cpu']:.3f}x; first output identical: {r['first_output_identical']} "
              f"(max diff {r['first_output_max_diff']:.2e})", flush=True)
    write_report(a.out, env, a.threads, results=results)


if __name__ == "__main__":
    main()
