"""Log-likelihoods and greedy continuations of text on the model's cache: what the lm-evaluation-harness adapter
(`evals.harness`) asks of a model, written without lm_eval so that it can be tested and reused on its own.

A context is prefilled once into a cache; each continuation is scored on top of it and the cache is cropped back to
the context (`ModelCache.crop`, with one snapshot of the lightning states kept for it), so the k answers of a
multiple-choice question cost one context pass plus k short ones.

Shapes: T tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minimax_gpt.generation import stream


def prefix_token(tokenizer) -> int:
    """What an empty context is conditioned on: the end-of-text token, or a newline for tokenizers without one
    (as `textgen.stream_text` does)."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return tokenizer.encode("\n")[-1]


def _device(model) -> torch.device:
    return model.wte.weight.device


def _logprobs(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """logits (n, V) predicting `targets` (n tokens): (sum of their log-probabilities, all of them the argmax)."""
    # float64: a document's score sums thousands of these, where float32's rounding would reach 1e-3
    logp = torch.log_softmax(logits.double(), dim=-1)  # (n, V)
    t = torch.tensor(targets, dtype=torch.long, device=logits.device)
    return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(dim=-1) == t).all())


def fit_context(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The context cut from the left so that context + continuation - 1 tokens fit in max_length (the tokens the
    model reads to score the continuation), as lm_eval's Hugging Face model cuts it."""
    if not continuation:
        raise ValueError("a continuation must hold at least one token")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in max_length={max_length}")
    return context[-(max_length - len(continuation) + 1):]


@torch.no_grad()
def score_continuations(model, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding would produce it) for each continuation, the context
    prefilled once into a cache."""
    if not context:
        raise ValueError("context must hold at least one token (use prefix_token for an empty one)")
    if any(not c for c in continuations):
        raise ValueError("every continuation must hold at least one token")
    device = _device(model)
    cache = model.new_cache(1, capacity=len(context) + max(len(c) for c in continuations), max_rollback=1)
    first = model(torch.tensor([context], device=device), cache=cache, logits_to_keep=1).logits[0]  # (1, V)
    results = []
    for cont in continuations:
        logits = first
        if len(cont) > 1:
            rest = model(torch.tensor([cont[:-1]], device=device), cache=cache).logits[0]  # (len - 1, V)
            logits = torch.cat([first, rest])  # (len, V)
            cache.crop(len(context))
        results.append(_logprobs(logits, cont))
    return results


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, targets) windows that predict every token once, lm_eval's rolling windows made disjoint: up to
    max_length targets each, the first conditioned on `prefix`, the others on the tokens before them, as many as fit
    (context + targets - 1 <= max_length)."""
    predicted = 0
    while predicted < len(tokens):
        n = min(max_length, len(tokens) - predicted)
        context = [prefix] if predicted == 0 else tokens[max(0, predicted + n - 1 - max_length):predicted]
        yield context, tokens[predicted:predicted + n]
        predicted += n


def score_rolling(model, tokens: list[int], prefix: int, max_length: int) -> float:
    """log p(tokens | prefix) over windows of at most max_length tokens (the log-likelihood of a whole document)."""
    return sum(score_continuations(model, context, [targets])[0][0]
               for context, targets in rolling_windows(tokens, prefix, max_length))


@torch.no_grad()
def greedy_until(model, tokenizer, context: list[int], until: list[str], max_new_tokens: int) -> str:
    """Greedy continuation of `context` (through the cache), cut before the first of the `until` strings, stopped
    at the end-of-text token or after max_new_tokens."""
    ids = torch.tensor([context], dtype=torch.long, device=_device(model))
    new: list[int] = []
    for tok in stream(model, ids, max_new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_id):
        if int(tok[0]) == tokenizer.eos_token_id:
            break
        new.append(int(tok[0]))
        text = tokenizer.decode(new)
        cuts = [text.find(s) for s in until if s and s in text]
        if cuts:
            return text[:min(cuts)]
    return tokenizer.decode(new)
