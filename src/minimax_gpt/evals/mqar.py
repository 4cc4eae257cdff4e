"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023, arXiv 2312.04927), made on the fly.

A sequence first lists `n_pairs` key-value pairs, then asks for every key once, in a random order, at random
positions of the rest of the sequence; the other positions hold the filler token 0. The model must answer each query
with the value that followed its key in the context. Only the query positions carry a target (IGNORE_INDEX
elsewhere), and accuracy counts only them:

    inputs   k3 v3 k1 v1 k7 v7 | 0  k1 0  0  k7 0  k3 0
    targets  .  .  .  .  .  .  | .  v1 .  .  v7 .  v3 .        (. = IGNORE_INDEX)

Tokens: 0 the filler; keys 1 .. n_keys; values n_keys + 1 .. n_keys + n_values. Keys in one sequence are distinct,
values are drawn independently (they may repeat), so a model that cannot recall scores 1 / n_values and a model that
copies its input token scores 0 (a key is never a value).

Shapes: B batch, T tokens (seq_len), N pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
FILLER = 0


@dataclass(frozen=True)
class MQARSpec:
    """What an MQAR sequence looks like; `vocab_size` is what a model needs."""
    seq_len: int
    n_pairs: int
    n_keys: int = 64
    n_values: int = 64

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_pairs", "n_keys", "n_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MQAR {name} must be an int >= 1, got {value!r}")
        if self.n_pairs > self.n_keys:
            raise ValueError(f"MQAR n_pairs ({self.n_pairs}) must be <= n_keys ({self.n_keys}): keys are distinct")
        if 3 * self.n_pairs > self.seq_len:
            raise ValueError(f"MQAR seq_len ({self.seq_len}) must be >= 3 * n_pairs ({3 * self.n_pairs}): "
                             f"2 tokens per pair and one per query")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values

    @property
    def chance(self) -> float:
        """The accuracy of guessing a value uniformly: what a model that does not recall scores."""
        return 1.0 / self.n_values


def mqar_batch(spec: MQARSpec, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T) int64, on the CPU; deterministic given the generator's state."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    B, T, N = batch_size, spec.seq_len, spec.n_pairs
    keys = torch.rand(B, spec.n_keys, generator=generator).argsort(dim=1)[:, :N] + 1  # (B, N), distinct per row
    values = torch.randint(0, spec.n_values, (B, N), generator=generator) + 1 + spec.n_keys  # (B, N)
    inputs = torch.full((B, T), FILLER, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2] = keys, values
    # the queries: every key once, in a random order, at N random distinct positions after the context
    order = torch.rand(B, N, generator=generator).argsort(dim=1)  # (B, N)
    slots = torch.rand(B, T - 2 * N, generator=generator).argsort(dim=1)[:, :N].sort(dim=1).values + 2 * N  # (B, N)
    inputs.scatter_(1, slots, keys.gather(1, order))
    targets.scatter_(1, slots, values.gather(1, order))
    return inputs, targets


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) over the query positions only (targets != IGNORE_INDEX); logits (B, T, V)."""
    counted = targets != IGNORE_INDEX  # (B, T)
    predictions = logits.argmax(dim=-1)  # (B, T)
    return int((predictions == targets)[counted].sum()), int(counted.sum())


def random_guess_accuracy(n_pairs: int) -> float:
    """H(n)/n: the accuracy of answering each of n queries with a value not yet asked for, uniformly, when the model
    has learnt which values are in the context but not which key they belong to -- the plateau that naive training
    reaches before real recall (sum over queries of 1/(n - i), divided by n)."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    return sum(1.0 / k for k in range(1, n_pairs + 1)) / n_pairs

