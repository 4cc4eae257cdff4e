"""Endurance runs for issue 9 (reliability): run once, figures go in the closing note; the test suite keeps short
versions (tests/test_faults.py, tests/test_safety.py).

    python benchmarks/endurance.py --steps 4000 --kills 3 --nan-every 7 --generate-calls 2000 --out /tmp/endurance

1. NaN batches: a training run whose loss is NaN every k-th step completes with exactly steps // k skipped steps.
2. Kill / resume: the CLI trains `--steps` steps uninterrupted; the same run is sent SIGTERM `--kills` times at random
   moments and resumed with --resume each time; every step's loss and the final validation loss must be identical.
3. Generation: `--generate-calls` consecutive `generate` calls; resident memory after warm-up vs at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_helpers import poison_training_forward, write_config  # noqa: E402  (the tiny config and corpus of the tests)


def _train_losses(out_dir: Path) -> list[tuple[int, float]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def _last_step(metrics: Path) -> int:
    lines = metrics.read_text().splitlines()
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


def nan_batches(tmp: Path, steps: int, every: int) -> dict:
    import torch

    from minimax_gpt import EnhancedMiniMaxGPT
    from minimax_gpt.training.run_config import load_run_config
    from minimax_gpt.training.trainer import train

    original = EnhancedMiniMaxGPT.forward
    poison_training_forward(setattr, lambda n: n % every == 0)
    try:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        run = load_run_config(write_config(tmp, tmp / "nan"), ["--phases.1.iters", str(steps - 3),
                                                               "--train.log_interval", "50", "--train.eval_interval",
                                                               "0", "--train.sample_tokens", "0"])
        summary = train(run)
        wall = time.perf_counter() - t0
    finally:
        EnhancedMiniMaxGPT.forward = original
    return {"steps": summary["iters"], "nan_every": every, "skipped": summary["skipped_steps"],
            "expected_skipped": summary["iters"] // every, "val_loss": summary["val_loss"], "wall_s": round(wall, 1)}


def _cli(cfg: Path, overrides: list[str], resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "minimax_gpt", "train", "--config", str(cfg), *overrides]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def kill_resume(tmp: Path, steps: int, kills: int, seed: int) -> dict:
    overrides = ["--phases.1.iters", str(steps - 3), "--train.threads", "1", "--train.log_interval", "1",
                 "--train.eval_interval", "500", "--train.sample_tokens", "0"]
    t0 = time.perf_counter()
    straight = _cli(write_config(tmp, tmp / "straight", name="straight.toml"), overrides)
    straight_summary = json.loads(straight.communicate()[0])
    straight_wall = time.perf_counter() - t0

    rng = random.Random(seed)
    cfg = write_config(tmp, tmp / "killed", name="killed.toml")
    stops, t0 = [], time.perf_counter()
    for i in range(kills + 1):
        proc = _cli(cfg, overrides, resume=i > 0)
        if i < kills:  # at a random step of the next stretch (a signal before the loop starts just kills)
            done = stops[-1]["stopped_at"] if stops else 0
            target = done + rng.randint(steps // (2 * (kills + 1)), steps // (kills + 1))
            metrics = tmp / "killed" / "metrics.jsonl"
            while proc.poll() is None and not (metrics.is_file() and _last_step(metrics) >= target):
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate()
        summary = json.loads(out)
        stops.append({"returncode": proc.returncode, "stopped_at": summary["iters"],
                      "interrupted": summary["interrupted"]})
    killed_wall = time.perf_counter() - t0
    a, b = _train_losses(tmp / "straight"), _train_losses(tmp / "killed")
    return {"steps": straight_summary["iters"], "kills": stops, "identical_step_losses": a == b,
            "steps_compared": len(a), "final_train_loss": [a[-1][1], b[-1][1]],
            "final_val_loss": [straight_summary["val_loss"], summary["val_loss"]],
            "wall_s_uninterrupted": round(straight_wall, 1), "wall_s_killed_and_resumed": round(killed_wall, 1)}


def generate_memory(calls: int) -> dict:
    import torch

    from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = EnhancedMiniMaxGPT(MiniMaxConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=64,
                                             hybrid_period=2, use_moe=True, num_experts=4)).eval()
    g = torch.Generator().manual_seed(0)
    warmup = max(calls // 20, 10)
    t0, rss = time.perf_counter(), {}
    for i in range(calls):
        prompt = torch.randint(0, 256, (2, 1 + i % 17), generator=g)
        model.generate(prompt, max_new_tokens=24, temperature=0.8, top_k=50, generator=g)
        if i + 1 == warmup:
            rss["after_warmup"] = rss_mib()
    rss["end"] = rss_mib()
    return {"calls": calls, "rss_mib_after_warmup": round(rss["after_warmup"], 1), "rss_mib_end": round(rss["end"], 1),
            "growth_pct": round(100 * (rss["end"] / rss["after_warmup"] - 1), 2),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--nan-steps", type=int, default=500)
    p.add_argument("--nan-every", type=int, default=7)
    p.add_argument("--generate-calls", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"generate": generate_memory(args.generate_calls),
               "nan_batches": nan_batches(args.out, args.nan_steps, args.nan_every),
               "kill_resume": kill_resume(args.out, args.steps, args.kills, args.seed)}
    print(json.dumps(results, indent=2))
    (args.out / "endurance.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
