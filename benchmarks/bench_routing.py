"""MoE routing side by side on tinyshakespeare (issue 20, 3(b)): top-2 with the load-balancing loss vs auxiliary-loss-
free balancing (DeepSeek-V3's routing bias, no balancing loss) vs top-p routing (arXiv 2403.07652; cap 4, balancing
loss kept) at p values chosen around 2 experts per token, i.e. about top-2's active compute. Each variant trains the
shakespeare_char_cpu_hybrid config (the same steps, schedule and seeds for every variant), then the final model is
scored on the validation split (the config's 200 windows, eval mode, dropless): val loss, and each MoE layer's load
imbalance (max / mean expert count) and mean experts per token, averaged over the layers. The training-time
imbalance (the metrics log's moe_mean_imbalance over the last quarter of the steps) and the mean experts per token
over all logged steps (the active compute actually spent) are reported too.

    python benchmarks/bench_routing.py [--iters 2000] [--seeds 1337 42 7] [--jobs 2] [--top-p 0.6 0.7]
        [--variants top2_aux aux_free top_p] [--work /tmp/bench_routing] [--out benchmarks/results/routing.json]
    python benchmarks/bench_routing.py --table     # the markdown table of --out again

Runs go in parallel (--jobs processes, one thread each); each run's result is kept in --work, so an interrupted
benchmark continues where it stopped. JSON: per run and per variant (mean and standard deviation over seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CONFIG = "shakespeare_char_cpu_hybrid"
BIAS_RATE = 0.001  # DeepSeek-V3's bias update speed (gamma = 0.001)


def variant_overrides(name: str) -> list[str]:
    """The model fields each variant changes from the config (top-2, moe_aux_loss_coef 0.01, 4 experts):
    "top2_aux", "aux_free", or "top_p<p>" (e.g. top_p0.6; cap 4 = every expert, the balancing loss kept)."""
    if name.startswith("top_p"):
        return ["--model.moe_top_p", name[len("top_p"):], "--model.moe_top_k", "4"]
    return {
        "top2_aux": [],
        "aux_free": ["--model.moe_aux_loss_coef", "0.0", "--model.moe_bias_update_rate", str(BIAS_RATE)],
    }[name]


def expand_variants(variants: list[str], top_ps: list[float]) -> list[str]:
    """"top_p" stands for one variant per p: top_p0.6, top_p0.7, ..."""
    return [name for v in variants for name in ([f"top_p{p}" for p in top_ps] if v == "top_p" else [v])]


def run_one(variant: str, seed: int, iters: int, work: Path, data: Path) -> dict:
    """Train one variant with one seed (one thread), then measure its routing on the validation split."""
    import torch

    from minimax_gpt.training.run_config import load_run_config
    from minimax_gpt.training.trainer import train

    torch.set_num_threads(1)
    out_dir = work / f"{variant}-seed{seed}"
    overrides = ["--train.data", str(data), "--train.out_dir", str(out_dir), "--train.seed", str(seed),
                 "--train.threads", "1", "--phases.0.iters", str(iters),
                 "--phases.0.warmup_iters", str(min(100, iters // 10)), "--train.eval_interval", "0", "--train.eval_batches", "1",
                 "--train.sample_tokens", "0", "--train.progress", "false", "--train.tensorboard", "false"]
    run = load_run_config(CONFIG, overrides + variant_overrides(variant))
    t0 = time.perf_counter()
    summary = train(run, overwrite=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r["kind"] == "train"]
    tail = train_records[-max(1, len(train_records) // 4):]
    result = {"variant": variant, "seed": seed, "iters": iters,
              "train_imbalance_last_quarter": statistics.fmean(r["moe_mean_imbalance"] for r in tail),
              "train_experts_per_token_last_quarter": statistics.fmean(
                  statistics.fmean(r["moe_experts_per_token"]) for r in tail),
              "train_experts_per_token_mean": statistics.fmean(  # over all logged steps: the active compute
                  statistics.fmean(r["moe_experts_per_token"]) for r in train_records),
              "wall_s": wall, "tokens_per_second": summary.get("tokens_per_second")}
    result.update(validation_routing(out_dir))
    return result


def validation_routing(out_dir: Path) -> dict:
    """Over the config's validation windows (200 batches of 12 x 64 spread over the split, eval mode, dropless): the
    val loss (token-weighted cross-entropy, as the trainer's evaluation; the run itself evaluates one batch only, so
    that the split is read once), and every MoE layer's expert counts summed: imbalance = max / mean count and
    experts per token, each averaged over the layers."""
    import torch

    from minimax_gpt.data.dataset import TokenDataset
    from minimax_gpt.training.checkpoint import load_model

    model, _ = load_model(out_dir)
    model.eval()
    val = TokenDataset(out_dir / "data", "val")
    counts, tokens, ce_sum = None, 0, 0.0
    with torch.no_grad():
        for x, y in val.iter_eval_batches(12, 64, 200):
            out = model(x, targets=y)
            ce_sum += float(out.ce_loss) * y.numel()
            c = torch.stack([s.expert_counts for s in out.moe_stats])  # (layers, E)
            counts = c if counts is None else counts + c
            tokens += x.numel()
    imbalance = counts.max(1).values / counts.mean(1)  # (layers,)
    experts = counts.sum(1) / tokens
    return {"val_loss": ce_sum / tokens, "val_imbalance": float(imbalance.mean()), "val_imbalance_per_layer": imbalance.tolist(),
            "val_experts_per_token": float(experts.mean()), "val_experts_per_token_per_layer": experts.tolist(),
            "val_routed_tokens": tokens}


def _cached_run(args_tuple) -> dict:
    variant, seed, iters, work, data = args_tuple
    path = work / f"{variant}-seed{seed}.json"
    if path.exists():
        done = json.loads(path.read_text())
        if done["iters"] == iters and done["variant"] == variant:
            return done
    result = run_one(variant, seed, iters, work, data)
    path.write_text(json.dumps(result, indent=1))
    return result


def summarise(results: list[dict]) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    keys = ("val_loss", "val_imbalance", "val_experts_per_token", "train_imbalance_last_quarter",
            "train_experts_per_token_last_quarter", "train_experts_per_token_mean", "tokens_per_second")
    table = {}
    for variant, runs in by_variant.items():
        table[variant] = {"seeds": [r["seed"] for r in runs]}
        for k in keys:
            values = [r[k] for r in runs if r.get(k) is not None]
            if values:
                table[variant][k] = {"mean": statistics.fmean(values),
                                     "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                                     "values": values}
    return table


def markdown_table(summary: dict) -> str:
    """The docs/routing.md table: mean +- standard deviation over the seeds."""
    cols = [("val_loss", "val loss", 4), ("val_imbalance", "load imbalance (val)", 3),
            ("val_experts_per_token", "experts / token (val)", 3),
            ("train_imbalance_last_quarter", "imbalance (train, last 25%)", 3),
            ("train_experts_per_token_mean", "experts / token (train mean)", 3)]
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant, row in summary.items():
        cells = [f"{row[k]['mean']:.{d}f} ± {row[k]['stdev']:.{d}f}" if k in row else "-" for k, _, d in cols]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="training steps of every run (the config: 2000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 42, 7])
    ap.add_argument("--variants", nargs="+", default=["top2_aux", "aux_free", "top_p"])
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.6, 0.7],
                    help="p of the top_p variants, one variant each (cap: all 4 experts)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--work", default="/tmp/bench_routing", help="run folders and per-run results")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "routing.json"))
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())["summary"]))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = expand_variants(args.variants, args.top_p)
    jobs = [(v, s, args.iters, work, Path(args.data)) for s in args.seeds for v in variants]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_cached_run, jobs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": CONFIG, "iters": args.iters, "seeds": args.seeds, "top_p": args.top_p, "bias_rate": BIAS_RATE,
        "variant_overrides": {v: variant_overrides(v) for v in variants},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "jobs": args.jobs},
        "wall_s": time.perf_counter() - t0, "summary": summarise(results), "runs": results}, indent=1) + "\n")
    print(markdown_table(summarise(results)))
    print("wrote", out)


if __name__ == "__main__":
    main()
