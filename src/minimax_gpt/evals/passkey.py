"""Passkey retrieval (Mohtashami and Jaggi, 2023): a five-digit number hidden at a chosen depth of repeated filler
text, asked for at the end. Prompts are made from a seed through the checkpoint's own tokenizer; nothing is
downloaded.

    Remember the pass key. <filler sentences> The pass key is 71432. Remember it. <filler sentences> What is the
    pass key? The pass key is| 71432

A trial is correct when greedy decoding would produce every token of the answer: with teacher forcing, the argmax
at each answer position is the answer's token (one forward pass; the same verdict as decoding step by step).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

INTRO = "Remember the pass key.\n"
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    prompt: list[int]  # the tokens up to and including the question
    answer: list[int]  # the tokens of " <passkey>"
    passkey: int
    depth: float  # where the needle sits, as a fraction of the filler before it


def passkey_prompt(tokenizer, n_tokens: int, depth: float, passkey: int) -> PasskeyPrompt:
    """A prompt of at most `n_tokens` tokens (prompt and answer together): as many filler sentences as fit (cycling
    through FILLER), the needle after `depth` of them. The parts are tokenized separately and joined, so their
    lengths add up exactly."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    intro, needle, question = (tokenizer.encode(t) for t in (INTRO, NEEDLE.format(key=passkey), QUESTION))
    sentences, answer = [tokenizer.encode(t) for t in FILLER], tokenizer.encode(f" {passkey}")
    room = n_tokens - (len(intro) + len(needle) + len(question) + len(answer))
    filler: list[list[int]] = []
    while room >= len(sentences[len(filler) % len(sentences)]):
        filler.append(sentences[len(filler) % len(sentences)])
        room -= len(filler[-1])
    if not filler:
        raise ValueError(f"passkey prompts need at least {n_tokens - room + len(sentences[0])} tokens with this "
                         f"tokenizer, asked for {n_tokens}")
    before = round(depth * len(filler))
    prompt = intro + sum(filler[:before], []) + needle + sum(filler[before:], []) + question
    return PasskeyPrompt(prompt, answer, passkey, depth)


def passkey_prompts(tokenizer, n_tokens: int, depths: list[float], trials: int, seed: int) -> list[PasskeyPrompt]:
    """`trials` prompts per depth, their passkeys drawn from `seed` (the same seed gives the same prompts)."""
    rng = random.Random(seed)
    return [passkey_prompt(tokenizer, n_tokens, d, rng.randrange(10000, 100000)) for d in depths
            for _ in range(trials)]


@torch.no_grad()
def passkey_correct(model, item: PasskeyPrompt) -> bool:
    """Whether greedy decoding after the prompt gives the answer (checked by teacher forcing)."""
    device = model.wte.weight.device
    ids = torch.tensor([item.prompt + item.answer[:-1]], dtype=torch.long, device=device)  # (1, T)
    n = len(item.answer)
    logits = model(ids, logits_to_keep=n).logits[0]  # (n, V)
    return logits.argmax(dim=-1).tolist() == item.answer


def evaluate_passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int = 0,
                     on_trial=None) -> dict[int, dict[str, float]]:
    """{length: {"accuracy": fraction correct, "depth D": fraction correct at that depth, ...}}.
    on_trial() is called after every trial (progress bars)."""
    model.eval()
    results = {}
    for n_tokens in lengths:
        items = passkey_prompts(tokenizer, n_tokens, depths, trials, seed)
        verdicts = []
        for item in items:
            verdicts.append(passkey_correct(model, item))
            if on_trial is not None:
                on_trial()
        row = {"accuracy": sum(verdicts) / len(verdicts), "tokens": max(len(i.prompt) + len(i.answer) for i in items)}
        for depth in depths:
            mine = [v for v, i in zip(verdicts, items) if i.depth == depth]
            row[f"depth {depth:g}"] = sum(mine) / len(mine)
        results[n_tokens] = row
    return results


def training_length(checkpoint) -> int:
    """The longest seq_len a checkpoint's run trained at (its run_config.json), else its model's block_size."""
    from minimax_gpt.interop.pretrained import load_config
    from minimax_gpt.training.checkpoint import load_saved_run_config, resolve_checkpoint

    run = load_saved_run_config(checkpoint)
    phases = (run or {}).get("phases") or []
    lengths = [p["seq_len"] for p in phases if isinstance(p, dict) and isinstance(p.get("seq_len"), int)]
    return max(lengths) if lengths else load_config(resolve_checkpoint(checkpoint)).block_size


def evaluate_checkpoint_passkey(checkpoint, multiples=(1, 2, 4), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                                trials: int = 4, seed: int = 0, device: str = "auto",
                                on_trial=None) -> dict[str, Any]:
    """Passkey retrieval of a trained checkpoint at `multiples` of its training length. A length that learned
    positions cannot reach (beyond block_size) is reported as skipped, with the reason."""
    from minimax_gpt.training.checkpoint import load_model
    from minimax_gpt.training.devices import resolve_device

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not multiples or any(m <= 0 for m in multiples):
        raise ValueError(f"multiples must be numbers > 0, got {list(multiples)}")
    model, tokenizer = load_model(checkpoint, device=resolve_device(device))
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer/ directory; passkey prompts are text")
    trained = training_length(checkpoint)
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "training_length": trained, "depths": list(depths),
                           "trials_per_depth": trials, "lengths": {}}
    for m in multiples:
        n_tokens = int(round(m * trained))
        if model.config.pos_embedding == "learned" and n_tokens > model.config.block_size:
            out["lengths"][str(n_tokens)] = {"multiple": m, "skipped": f"learned positions stop at block_size "
                                                                       f"{model.config.block_size}"}
            continue
        row = evaluate_passkey(model, tokenizer, [n_tokens], list(depths), trials, seed, on_trial)[n_tokens]
        out["lengths"][str(n_tokens)] = {"multiple": m, **row}
    return out
