"""Is the lightning decay schedule what keeps the plain hybrid from recall? (issue 24, docs/recall.md)

A layout of a recall budget (by default the 2-layer hybrid (lightning, softmax) of docs/recall-2layer.toml: T = 32,
4 pairs over 16 keys and 16 values, 2000 steps) trained on MQAR with its lightning layers' decay rates lam replaced:
--slopes gives every head's rate (the same in every lightning layer), --head0 only head 0's (the others keep
MiniMax-01's schedule). That schedule gives the 2-layer model's lightning layer lam = 2^-4 and 2^-8 (half-lives of 11
and 177 tokens), and deeper layers less, so no head can weigh the token just before much above the ones before it;
a steep head (lam = 2: the previous token weighs e^-2 = 0.14 of the current one, the one before e^-4) can, if the
binding step is what is missing. Accuracy at the trained length on the budget's eval_sequences fresh sequences, and
at 2x and 4x on 256 without retraining.

    python benchmarks/recall_decay_ablation.py --slopes 2.0,0.0625 --seeds 0 1 2
    python benchmarks/recall_decay_ablation.py --packaged --layout hybrid-7-1 --seq-len 64 --head0 2.0
    python benchmarks/recall_decay_ablation.py --packaged --layout hybrid-7-1 --seq-len 64 --n-head 8

Every run's result is added to --out (default benchmarks/results/recall_decay_ablation.json) as it finishes; one
thread per process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUDGET = ROOT / "docs" / "recall-2layer.toml"


def run_one(args: argparse.Namespace, seed: int) -> dict:
    """Train the layout with its lightning layers' decay rates replaced; its accuracy at 1x, 2x, 4x T."""
    from minimax_gpt.evals.mqar_training import train_mqar
    from minimax_gpt.evals.recall import make_budget
    from minimax_gpt.models.lightning import LightningAttention

    budget = make_budget(None if args.packaged else BUDGET, layouts=[args.layout],
                         seq_lens=(args.seq_len,) if args.seq_len else None, steps=args.steps, n_head=args.n_head)
    model = budget.new_model(args.layout, seed)
    default = {}
    for name, module in model.named_modules():
        if isinstance(module, LightningAttention):  # a buffer: the chunked, recurrent and cached paths all read it
            lam = module.slopes
            default[name] = lam.tolist()
            if args.slopes is not None:
                if len(args.slopes) != lam.numel():
                    raise ValueError(f"--slopes needs {lam.numel()} rates (one per head), got {len(args.slopes)}")
                lam.copy_(torch.tensor(args.slopes))
            if args.head0 is not None:
                lam[0] = args.head0
    start = time.perf_counter()
    spec = budget.spec(budget.seq_lens[0])
    losses = train_mqar(model, spec, budget.recipe, seed=seed)
    accuracy = {str(spec.seq_len): budget.measure(model, spec, seed)}
    for factor in (2, 4):
        longer = budget.spec(spec.seq_len * factor)
        accuracy[str(longer.seq_len)] = budget.measure(model, longer, seed, n_sequences=256)
    return {"variant": variant(args), "seed": seed, "n_layer": budget.n_layer, "steps": budget.recipe.steps,
            "default_slopes": default, "accuracy": accuracy, "final_loss": sum(losses[-50:]) / 50,
            "wall_seconds": round(time.perf_counter() - start, 1)}


def variant(args: argparse.Namespace) -> str:
    name = f"{'packaged' if args.packaged else 'recall-2layer'}/{args.layout}"
    name += f"/T{args.seq_len}" if args.seq_len else ""
    name += f"/steps{args.steps}" if args.steps else ""
    name += f"/heads{args.n_head}" if args.n_head else ""
    name += f"/slopes={','.join(map(str, args.slopes))}" if args.slopes is not None else ""
    return name + (f"/head0={args.head0}" if args.head0 is not None else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slopes", type=lambda t: [float(s) for s in t.split(",")],
                   help="every head's decay rate, comma-separated, in every lightning layer (default: MiniMax-01's)")
    p.add_argument("--head0", type=float, help="head 0's decay rate in every lightning layer (default: unchanged)")
    p.add_argument("--packaged", action="store_true", help="the packaged 8-layer budget instead of the 2-layer one")
    p.add_argument("--layout", default="hybrid-1-1", help="the layout to train (default: hybrid-1-1)")
    p.add_argument("--seq-len", type=int, help="the training length (default: the budget's first)")
    p.add_argument("--steps", type=int, help="training steps (default: the budget's)")
    p.add_argument("--n-head", type=int, help="heads at the same width (default: the budget's); MiniMax-01's "
                                              "schedule gives head h of H the rate 2^(-8h/H), so more heads, "
                                              "steeper ones")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recall_decay_ablation.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    for seed in args.seeds:
        result = run_one(args, seed)
        print(json.dumps(result), flush=True)
        runs = json.loads(out.read_text())["runs"] if out.exists() else []
        runs = [r for r in runs if (r["variant"], r["seed"]) != (result["variant"], seed)] + [result]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
        tmp.replace(out)


if __name__ == "__main__":
    main()
