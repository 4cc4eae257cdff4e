"""Text in, text out: a prompt string through a tokenizer and `generation.stream`, yielding text as tokens arrive.

Byte-level tokenizers can split a character across tokens; the decoded text is held back while it ends in an
incomplete UTF-8 sequence (U+FFFD), so every piece yielded is final.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minimax_gpt.generation import stream


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                compile_step: bool | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece (the prompt itself is not yielded). An empty prompt
    starts from the tokenizer's end-of-text token, or a newline when it has none. With learned positions the
    continuation stops at block_size, and a prompt of block_size tokens or more is a ValueError. compile_step: as
    `generation.stream`."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n")
    if model.config.pos_embedding == "learned":
        limit = model.config.block_size - 1  # and one position left for the first new token
        if len(ids) > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens; this model's learned positions take at most {limit} "
                             f"(block_size {model.config.block_size} with room for one new token): shorten the prompt")
        max_new_tokens = min(max_new_tokens, model.config.block_size - len(ids))
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    new: list[int] = []
    emitted = 0
    for tok in stream(model, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token_id=tokenizer.eos_token_id, generator=generator, compile_step=compile_step):
        t = int(tok[0])
        if t == tokenizer.eos_token_id:
            break
        new.append(t)
        text = tokenizer.decode(new)
        stable = len(text.rstrip("\ufffd"))
        if stable > emitted:
            yield text[emitted:stable]
            emitted = stable
    text = tokenizer.decode(new)
    if len(text) > emitted:
        yield text[emitted:]


def generate_text(model, tokenizer, prompt: str, **kwargs) -> str:
    """The prompt followed by its continuation; see `stream_text` for the options."""
    return prompt + "".join(stream_text(model, tokenizer, prompt, **kwargs))
