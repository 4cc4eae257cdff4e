"""Kill trials (issue 23): `kill -9` a training run at random moments, resume it, and check it ends with the weights of
an uninterrupted run.

    python -m benchmarks.kill_trials --trials 20 --parallel none fsdp --out /tmp/kill_trials

Each trial trains the tests' tiny hybrid MoE config (tests/train_helpers.py, 2 phases) with
`--train.save_interval 1`, so a checkpoint is written after every step and a kill often lands inside a save. The
process (with --parallel fsdp: torchrun and both of its ranks at once, as a crashed node would) gets
SIGKILL at a random moment after its first checkpoint (with torchrun: the agent and every rank, found through /proc,
as they run in sessions of their own); then `minimax-gpt train --resume RUN` runs to the end (a kill
leaves `run.lock` behind: the resume must take it over). The trial passes when
  - the resume starts from the newest complete checkpoint there was at the kill (`checkpoints/latest` never names a
    half-written one), and
  - the final weights equal those of an uninterrupted run of the same recipe (bit for bit in one process; FSDP's
    reduce order is fixed too, so the same is expected there), and
  - no temporary folder of the killed write is left in checkpoints/ (the resume removes those of dead processes).
A kill after the last checkpoint (during the final evaluation) leaves a complete run: nothing is resumed, and its
final checkpoint is compared.
Writes `kill_trials.json` (one row per trial, and a summary) into --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_helpers import write_config  # noqa: E402  (the tiny config and corpus of the tests)

PHASE_ITERS = 30  # two phases of this many steps


def _recipe(phase_iters: int) -> list[str]:
    return ["--phases.0.iters", str(phase_iters), "--phases.1.iters", str(phase_iters), "--train.save_interval", "1",
            "--train.eval_interval", "0", "--train.sample_tokens", "0", "--train.threads", "1"]


def _command(parallel: str, *args: str) -> list[str]:
    if parallel == "none":
        return [sys.executable, "-m", "minimax_gpt", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "minimax_gpt", *args, "--train.parallel", parallel]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _weights(out: Path):
    from minimax_gpt.training.checkpoint import resolve_checkpoint
    from minimax_gpt.interop.pretrained import SafetensorsReader

    with SafetensorsReader(resolve_checkpoint(out)) as reader:
        return {name: reader.get(name) for name in reader.keys()}


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), collected before any is killed."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _latest_step(out: Path) -> int | None:
    pointer = out / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return None


def _start(parallel: str, config: Path, out: Path, phase_iters: int) -> tuple[subprocess.Popen, float]:
    """Start a run; return it and the moment its first checkpoint appeared."""
    proc = subprocess.Popen(_command(parallel, "train", "--config", str(config), "--out", str(out),
                                     *_recipe(phase_iters)),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    while _latest_step(out) is None and proc.poll() is None:
        time.sleep(0.005)
    return proc, time.perf_counter()


def reference(tmp: Path, config: Path, parallel: str, phase_iters: int) -> tuple[dict, float]:
    """The uninterrupted run's final weights, and its seconds from the first checkpoint to the last (the window the
    kills are drawn from)."""
    out = tmp / f"reference-{parallel}"
    proc, first = _start(parallel, config, out, phase_iters)
    while _latest_step(out) != 2 * phase_iters and proc.poll() is None:
        time.sleep(0.005)
    window = time.perf_counter() - first
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run failed: {proc.stderr.read()[-2000:]}")
    return _weights(out), window


def trial(tmp: Path, config: Path, parallel: str, index: int, rng: random.Random, want: dict, window: float,
          phase_iters: int) -> dict:
    """One kill -9 and one resume; returns the trial's row."""
    import torch

    out = tmp / f"trial-{parallel}-{index:02d}"
    proc, _ = _start(parallel, config, out, phase_iters)
    time.sleep(rng.uniform(0.0, window))
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun's agent and every rank (each in its own session)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = _latest_step(out)
    mid_save = any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())
    finished_before_kill = (out / "summary.json").is_file()
    if killed_at == 2 * phase_iters:  # after the last checkpoint (final evaluation, plot): complete, nothing to resume
        resumed = subprocess.CompletedProcess([], 0, "", f"resumed from - at step {killed_at} (complete)")
    else:
        resumed = subprocess.run(_command(parallel, "train", "--resume", str(out)), env=_env(), capture_output=True,
                                 text=True)
    log = resumed.stderr
    (out / "resume.log").write_text(log)
    start = next((line for line in log.splitlines() if "resumed from" in line), "")
    resumed_from = int(start.split("at step ")[1].split()[0]) if "at step " in start else None
    got = _weights(out) if resumed.returncode == 0 else {}
    equal = bool(got) and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    max_diff = max((float((got[k] - want[k]).abs().max()) for k in got), default=float("nan")) if got else None
    leftovers = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))
    return {"trial": index, "parallel": parallel, "latest_at_kill": killed_at, "killed_during_save": mid_save,
            "finished_before_kill": finished_before_kill, "resume_rc": resumed.returncode,
            "resumed_from_step": resumed_from, "from_latest": resumed_from == killed_at,
            "final_weights_equal": equal, "max_abs_diff": max_diff, "leftover_temporaries": leftovers,
            "ok": resumed.returncode == 0 and equal and resumed_from == killed_at and not leftovers,
            "stderr_tail": "" if resumed.returncode == 0 else log[-1500:]}


def run(tmp: Path, trials: int, modes: list[str], seed: int = 0, phase_iters: int = PHASE_ITERS) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp, tmp / "unused")
    rng = random.Random(seed)
    rows = []
    for parallel in modes:
        want, window = reference(tmp, config, parallel, phase_iters)
        print(f"{parallel}: uninterrupted run {window:.1f} s after its first checkpoint", flush=True)
        for i in range(trials):
            rows.append(trial(tmp, config, parallel, i, rng, want, window, phase_iters))
            r = rows[-1]
            print(f"{parallel:5s} trial {i:2d}: latest at kill {r['latest_at_kill']}, "
                  f"{'during a save' if r['killed_during_save'] else 'between saves'}, resumed from "
                  f"{r['resumed_from_step']}, final weights {'equal' if r['final_weights_equal'] else 'DIFFER'}"
                  f"{'' if r['ok'] else '  FAILED ' + r['stderr_tail'][-300:]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per mode (default: 20)")
    parser.add_argument("--parallel", nargs="+", default=["none", "fsdp"], choices=("none", "ddp", "fsdp"),
                        help="modes to try (default: none fsdp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kill_trials"), help="work folder and JSON output")
    args = parser.parse_args()
    rows = run(args.out, args.trials, args.parallel, args.seed)
    summary = {mode: {"trials": sum(r["parallel"] == mode for r in rows),
                      "ok": sum(r["ok"] for r in rows if r["parallel"] == mode),
                      "killed_during_save": sum(r["killed_during_save"] for r in rows if r["parallel"] == mode)}
               for mode in args.parallel}
    (args.out / "kill_trials.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
