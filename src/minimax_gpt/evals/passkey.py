"""Passkey retrieval (Mohtashami and Jaggi, 2023): a five-digit number hidden at a chosen depth of repeated filler
text, asked for at the end. Prompts are made from a seed through the checkpoint's own tokenizer; nothing is
downloaded.

    <intro> <filler x k> The pass key is 71432. Remember it. 71432 is the pass key. <filler x m> What is the pass
    key? The pass key is| 71432

A trial is correct when greedy decoding would produce every token of the answer: with teacher forcing, the argmax
at each answer position is the answer's token (one forward pass; the same verdict as decoding step by step).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    prompt: list[int]  # the tokens up to and including the question
    answer: list[int]  # the tokens of " <passkey>"
    passkey: int
    depth: float  # where the needle sits, as a fraction of the filler before it


def passkey_prompt(tokenizer, n_tokens: int, depth: float, passkey: int) -> PasskeyPrompt:
    """A prompt of at most `n_tokens` tokens (prompt and answer together) with the needle after `depth` of the
    filler. The parts are tokenized separately and joined, so their lengths add up exactly."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    intro, needle, question = (tokenizer.encode(t) for t in (INTRO, NEEDLE.format(key=passkey), QUESTION))
    filler, answer = tokenizer.encode(FILLER), tokenizer.encode(f" {passkey}")
    fixed = len(intro) + len(needle) + len(question) + len(answer)
    repeats = (n_tokens - fixed) // len(filler)
    if repeats < 1:
        raise ValueError(f"passkey prompts need at least {fixed + len(filler)} tokens with this tokenizer, "
                         f"asked for {n_tokens}")
    before = round(depth * repeats)
    prompt = intro + filler * before + needle + filler * (repeats - before) + question
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
