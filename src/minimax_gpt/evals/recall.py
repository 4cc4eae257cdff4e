"""The recall benchmark behind `minimax-gpt recall`: small models of several layouts, equal in width and depth,
trained on MQAR under one budget, their accuracy per layout and sequence length written to recall.json and plotted
to recall.png (accuracy against length, one line per layout).

    budget = RecallBudget(seq_lens=(64, 128), seeds=(0, 1, 2))
    results = run_recall(budget, "out/recall")

A budget can be read from TOML (`load_budget`): RecallBudget's fields at the top level, MQARRecipe's in [recipe],
extra layouts in [layouts] (name = ["lightning", ..., "softmax"]), their short convolutions in [short_conv]
(name = 4).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minimax_gpt.atomic import atomic_file
from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.evals.layouts import (DEFAULT_LAYOUTS, check_layout, is_built_in, layout_short_conv,
                                       layout_types)
from minimax_gpt.evals.mqar import MQARSpec
from minimax_gpt.evals.mqar_training import MQARRecipe, evaluate_mqar, train_mqar

RESULTS_NAME = "recall.json"
PLOT_NAME = "recall.png"


@dataclass
class RecallBudget:
    """What `run_recall` trains and measures. The defaults are the packaged budget (docs/recall.md: its wall time
    and what it measured)."""
    layouts: dict[str, list[str]] = field(default_factory=dict)  # name -> layer_types; empty: the four built in
    seq_lens: tuple[int, ...] = (32, 64)
    n_pairs: int | None = 4  # key-value pairs per sequence; None: seq_len // 16 (more pairs at longer lengths)
    seeds: tuple[int, ...] = (0,)
    n_layer: int = 8
    n_embd: int = 64
    n_head: int = 2
    n_keys: int = 16
    n_values: int = 16
    eval_sequences: int = 256
    recipe: MQARRecipe = field(default_factory=MQARRecipe)
    # layout name -> kernel of the short convolution in its lightning layers (MiniMaxConfig.short_conv); a layout
    # not named here takes its built-in one (layouts.layout_short_conv: 4 for NAME-conv, else none)
    short_conv: dict[str, int] = field(default_factory=dict)
    sparse_block_size: int = 8  # "sparse" layers (MoBA): key blocks of this many positions (T = 64: 8 blocks) ...
    sparse_top_k: int = 2  # ... each query sees its own block causally and this many earlier ones
    # None: every length trains a fresh model with the recipe. An int: staged context extension, as MiniMax-01
    # trains its long contexts -- the shortest length trains with the recipe, each longer one continues the model
    # of the length before for this many steps (all pairs from the start); its accuracy is also measured before
    # those steps ("zero_shot")
    stage_steps: int | None = None
    save_models: bool = False  # write each trained model to models/NAME-seedS-TT/ (save_pretrained) in the out dir

    def __post_init__(self) -> None:
        self.seq_lens, self.seeds = tuple(self.seq_lens), tuple(self.seeds)
        if not self.layouts:
            self.layouts = {name: layout_types(name, self.n_layer) for name in DEFAULT_LAYOUTS}
        self.layouts = {name: check_layout(name, types, self.n_layer) for name, types in self.layouts.items()}
        if not self.seq_lens or not self.seeds:
            raise ValueError("a recall budget needs at least one seq_len and one seed")
        for T in self.seq_lens:
            self.spec(T)  # each length checked against the pairs and keys now, not after hours of training
        for name in ("n_layer", "n_embd", "n_head", "eval_sequences", "stage_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"recall budget {name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.recipe, dict):
            self.recipe = MQARRecipe(**self.recipe)
        if unknown := sorted(set(self.short_conv) - set(self.layouts)):
            raise ValueError(f"short_conv names layout(s) {', '.join(unknown)} that the budget does not build; "
                             f"its layouts: {', '.join(self.layouts)}")
        self.short_conv = {name: self.short_conv.get(name, layout_short_conv(name)) for name in self.layouts}
        for name, types in self.layouts.items():  # each model's config checked now (e.g. a convolution, no lightning)
            try:
                self.model_config(types, self.short_conv[name])
            except ValueError as e:
                raise ValueError(f"layout {name!r}: {e}") from None

    def spec(self, seq_len: int) -> MQARSpec:
        n_pairs = self.n_pairs if self.n_pairs is not None else max(1, seq_len // 16)
        return MQARSpec(seq_len, n_pairs, self.n_keys, self.n_values)

    def model_config(self, layer_types: list[str], short_conv: int = 0) -> MiniMaxConfig:
        """Equal width and depth for every layout; only the mixers (and a short convolution) differ."""
        return MiniMaxConfig(vocab_size=self.spec(self.seq_lens[0]).vocab_size, block_size=max(self.seq_lens),
                             n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, layer_types=layer_types,
                             use_hybrid_attn=True, short_conv=short_conv, sparse_block_size=self.sparse_block_size,
                             sparse_top_k=self.sparse_top_k)

    def total_steps(self) -> int:
        if self.stage_steps is None:
            return len(self.layouts) * len(self.seq_lens) * len(self.seeds) * self.recipe.steps
        return len(self.layouts) * len(self.seeds) * (self.recipe.steps + (len(self.seq_lens) - 1) * self.stage_steps)

    def stage_recipe(self) -> MQARRecipe:
        """The recipe of an extension stage: stage_steps steps, a tenth of them warm-up, every pair from the start."""
        return dataclasses.replace(self.recipe, steps=self.stage_steps, warmup_steps=self.stage_steps // 10,
                                   curriculum=0.0)

    def new_model(self, name: str, seed: int) -> torch.nn.Module:
        """A fresh model of layout `name`, initialised from `seed`."""
        from minimax_gpt.models.model import EnhancedMiniMaxGPT

        torch.manual_seed(seed)
        return EnhancedMiniMaxGPT(self.model_config(self.layouts[name], self.short_conv[name]))

    def measure(self, model: torch.nn.Module, spec: MQARSpec, seed: int, n_sequences: int | None = None) -> float:
        """Accuracy on n_sequences (default eval_sequences) fresh sequences of `spec`, made from a generator that
        no training batch uses."""
        return evaluate_mqar(model, spec, n_sequences or self.eval_sequences, seed=10_000 + seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seq_lens"], d["seeds"] = list(self.seq_lens), list(self.seeds)
        return d


def load_budget(path: str | os.PathLike, only: list[str] | None = None) -> RecallBudget:
    """A RecallBudget from TOML; [layouts] adds to the built-in layouts, or replaces the one it names. `only`: the
    built-in layouts to build (all by default; a budget whose n_layer is not a multiple of 8 leaves out or replaces
    hybrid-7-1)."""
    try:
        d = tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(RecallBudget)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{path}: unknown recall budget key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    recipe_keys = {f.name for f in dataclasses.fields(MQARRecipe)}
    if unknown := sorted(set(d.get("recipe", {})) - recipe_keys):
        raise ValueError(f"{path}: unknown [recipe] key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(recipe_keys))}")
    d["recipe"] = MQARRecipe(**d.get("recipe", {}))
    n_layer = d.get("n_layer", RecallBudget.n_layer)
    extra = d.pop("layouts", {})
    named = [n for n in only or () if n not in DEFAULT_LAYOUTS and n not in extra]  # e.g. hybrid-7-1-conv
    built_in = [n for n in (*DEFAULT_LAYOUTS, *named) if n not in extra and (only is None or n in only)]
    d["layouts"] = {**{name: layout_types(name, n_layer) for name in built_in}, **extra}
    return RecallBudget(**d)


def run_recall(budget: RecallBudget, out_dir: str | os.PathLike, on_step: Callable[[], None] | None = None,
               on_result: Callable[[str, int, int, float], None] | None = None) -> dict[str, Any]:
    """Train and measure every (layout, seq_len, seed) of the budget; recall.json is rewritten after each, so an
    interrupted run keeps what it measured; recall.png at the end. on_step() after every training step,
    on_result(layout, seq_len, seed, accuracy) after every measurement."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {"budget": budget.to_dict(), "chance": budget.spec(budget.seq_lens[0]).chance,
                               "layouts": {}, "wall_seconds": 0.0, "complete": False}
    lengths = sorted(budget.seq_lens) if budget.stage_steps is not None else list(budget.seq_lens)
    for name, types in budget.layouts.items():
        entry = results["layouts"][name] = {"layer_types": types, "short_conv": budget.short_conv[name],
                                            "params": None, "lengths": {}}
        for T in lengths:
            entry["lengths"][str(T)] = {"n_pairs": budget.spec(T).n_pairs, "accuracy": [], "final_loss": []}
        # staged: seeds outside lengths (each seed's model grows through the lengths); else lengths outside seeds
        runs = [(s, T) for s in budget.seeds for T in lengths] if budget.stage_steps is not None else \
            [(s, T) for T in lengths for s in budget.seeds]
        model = None
        for seed, T in runs:
            row = entry["lengths"][str(T)]
            previous = model if budget.stage_steps is not None and T != lengths[0] else None
            if previous is not None:
                row.setdefault("zero_shot", []).append(budget.measure(previous, budget.spec(T), seed))
            model, accuracy, loss = _train_and_measure(budget, name, budget.spec(T), seed, on_step, previous)
            entry["params"] = sum(p.numel() for p in model.parameters())
            row["accuracy"].append(accuracy)
            row["final_loss"].append(loss)
            row["mean"], row["std"] = mean_and_std(row["accuracy"])
            if budget.save_models:
                model.save_pretrained(out_dir / "models" / f"{name}-seed{seed}-T{T}")
            results["wall_seconds"] = round(time.perf_counter() - start, 1)
            write_results(results, out_dir / RESULTS_NAME)
            if on_result is not None:
                on_result(name, T, seed, accuracy)
    results["complete"] = True
    write_results(results, out_dir / RESULTS_NAME)
    plot_recall(results, out_dir / PLOT_NAME)
    return results


def _train_and_measure(budget: RecallBudget, name: str, spec: MQARSpec, seed: int,
                       on_step: Callable[[], None] | None, model: torch.nn.Module | None = None,
                       ) -> tuple[torch.nn.Module, float, float]:
    """(the trained model, its accuracy on fresh sequences, mean loss of its last 50 steps): a fresh model of layout
    `name` trained with the recipe, or `model` trained further for an extension stage."""
    recipe, data_seed = budget.recipe, seed
    if model is None:
        model = budget.new_model(name, seed)
    else:  # fresh batches for every stage: never the ones an earlier length trained on
        recipe, data_seed = budget.stage_recipe(), seed + 7919 * spec.seq_len
    losses = train_mqar(model, spec, recipe, seed=data_seed,
                        on_step=(lambda step, loss: on_step()) if on_step is not None else None)
    accuracy = budget.measure(model, spec, seed)
    tail = losses[-50:]
    return model, accuracy, sum(tail) / len(tail)


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def write_results(results: dict[str, Any], path: Path) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(results, indent=2) + "\n")


def plot_recall(results: dict[str, Any], path: Path) -> bool:
    """Accuracy against sequence length, one line per layout (mean, with the seeds' spread as error bars); the
    chance rate dashed. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (name, entry) in enumerate(results["layouts"].items()):
        rows = sorted((int(T), r) for T, r in entry["lengths"].items() if r["accuracy"])
        if rows:  # past the 10 colours of the cycle, dashed lines and square markers tell the layouts apart
            ax.errorbar([T for T, _ in rows], [r["mean"] for _, r in rows], yerr=[r["std"] for _, r in rows],
                        marker="o" if i < 10 else "s", linestyle="-" if i < 10 else "--", capsize=3, label=name)
    ax.axhline(results["chance"], color="gray", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("MQAR accuracy (query positions)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


def make_budget(config: str | os.PathLike | None = None, layouts: list[str] | None = None,
                extra_layouts: list[str] | None = None, **fields: Any) -> RecallBudget:
    """The packaged budget (or the TOML `config`) with fields replaced by those given (None = keep); `layouts`
    keeps only the named ones, `extra_layouts` adds "name=lightning,softmax,..." layouts. `steps` sets the recipe's
    steps (and scales its warm-up with it)."""
    budget = load_budget(config, only=layouts) if config is not None else RecallBudget()
    d = {f.name: getattr(budget, f.name) for f in dataclasses.fields(RecallBudget)}
    steps = fields.pop("steps", None)
    if steps is not None:
        d["recipe"] = dataclasses.replace(budget.recipe, steps=steps,
                                          warmup_steps=min(steps, round(budget.recipe.warmup_steps * steps /
                                                                        budget.recipe.steps)))
    d.update({k: v for k, v in fields.items() if v is not None})
    if config is None:  # built-in layouts follow the depth and the names asked for (e.g. hybrid-7-1-conv)
        user = {spec.partition("=")[0] for spec in extra_layouts or []}
        built_in = [n for n in layouts or DEFAULT_LAYOUTS if n not in user and is_built_in(n)]
        d["layouts"] = {n: layout_types(n, d["n_layer"]) for n in built_in} if built_in else {}
        d["short_conv"] = {}
    for spec in extra_layouts or []:
        name, sep, types = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"--layout must be NAME=TYPE,TYPE,... (e.g. mine=lightning,softmax), got {spec!r}")
        d["layouts"] = {**(d["layouts"] or {n: layout_types(n, d["n_layer"]) for n in DEFAULT_LAYOUTS}),
                        name: [t.strip() for t in types.split(",")]}
    budget = RecallBudget(**d)
    if layouts:
        missing = [n for n in layouts if n not in budget.layouts]
        if missing:
            raise ValueError(f"--layouts names {', '.join(missing)}; known: {', '.join(budget.layouts)}")
        budget.layouts = {n: budget.layouts[n] for n in layouts}
        budget.short_conv = {n: budget.short_conv[n] for n in layouts}
    return budget


def format_table(results: dict[str, Any]) -> str:
    """The results as text: one row per layout, mean +- spread per sequence length."""
    lengths = sorted({int(T) for e in results["layouts"].values() for T in e["lengths"]})
    lines = [f"{'layout':<14}{'params':>9}" + "".join(f"{'T=' + str(T):>15}" for T in lengths)]
    for name, entry in results["layouts"].items():
        cells = []
        for T in lengths:
            r = entry["lengths"].get(str(T))
            cells.append(f"{r['mean']:.3f}+-{r['std']:.3f}".rjust(15) if r and r["accuracy"] else " " * 15)
        lines.append(f"{name:<14}{entry['params'] or 0:>9,}" + "".join(cells))
    return "\n".join(lines)
