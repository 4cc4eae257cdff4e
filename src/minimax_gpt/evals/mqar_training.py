"""Train a model on MQAR and measure its recall: the recipe (`MQARRecipe`), the loop (`train_mqar`) and the test
(`evaluate_mqar`).

The recipe is what lets a small model on a few CPU cores leave the plateau near H(n)/n (it has learnt which values
are in the context, not which key each belongs to): a curriculum over the number of pairs (short-range, few-pair
problems first, where guessing pays little), a learning-rate warm-up then cosine decay, and weight decay. The
measurements behind the defaults are in docs/recall.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minimax_gpt.evals.mqar import MQARSpec, mqar_batch, recall_accuracy


@dataclass(frozen=True)
class MQARRecipe:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3  # 3e-3 and 1e-2 stayed on the plateau where 1e-3 learnt (docs/recall.md)
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    curriculum: float = 0.5  # the number of pairs grows from 1 to the spec's over this fraction of the steps
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or \
                    getattr(self, name) < 1:
                raise ValueError(f"recipe {name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"recipe warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        for name in ("lr", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"recipe {name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "curriculum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"recipe {name} must be in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"recipe weight_decay must be a finite number >= 0, got {self.weight_decay}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        decay = max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / decay)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def pairs_at(self, step: int, n_pairs: int) -> int:
        """The number of pairs of the batch at `step`: 1 at the start, growing linearly to n_pairs."""
        ramp = self.curriculum * self.steps
        if ramp <= 0:
            return n_pairs
        return max(1, min(n_pairs, math.ceil(n_pairs * (step + 1) / ramp)))


def _optimizer(model: torch.nn.Module, recipe: MQARRecipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98), fused=True)


def train_mqar(model: torch.nn.Module, spec: MQARSpec, recipe: MQARRecipe, seed: int,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model` (on the CPU) in place on batches of `spec` made from `seed`; returns the loss of every step.
    on_step(step, loss) is called after each step (progress bars)."""
    if model.config.vocab_size < spec.vocab_size:
        raise ValueError(f"the model's vocab_size ({model.config.vocab_size}) is below the MQAR vocabulary "
                         f"({spec.vocab_size} = 1 + n_keys + n_values)")
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, recipe)
    model.train()
    losses = []
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step)
        n = recipe.pairs_at(step, spec.n_pairs)
        step_spec = MQARSpec(spec.seq_len, n, spec.n_keys, spec.n_values)
        inputs, targets = mqar_batch(step_spec, recipe.batch_size, generator)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate_mqar(model: torch.nn.Module, spec: MQARSpec, n_sequences: int, seed: int,
                  batch_size: int = 32) -> float:
    """Accuracy over the query positions of `n_sequences` fresh sequences of `spec` made from `seed`."""
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    correct = counted = 0
    for start in range(0, n_sequences, batch_size):
        inputs, targets = mqar_batch(spec, min(batch_size, n_sequences - start), generator)
        c, n = recall_accuracy(model(inputs).logits, targets)
        correct, counted = correct + c, counted + n
    return correct / counted
