"""Sampling from a model: greedy, temperature, top-k and nucleus (top-p), with the cache or without it.

`generate` returns the prompt followed by the new tokens; `stream` yields the new tokens one step at a time.
Batched prompts of different lengths are left-padded and come with an attention mask (1 = real token).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator

import torch

from minimax_gpt.models import static_decode

log = logging.getLogger(__name__)
# "auto" compiles the decoding step from this many new tokens on: the compile (~7 s on a 2-core CPU for the suite's
# hybrid MoE) pays back at ~1.4 ms saved per token after ~5,000 tokens (docs/performance.md)
COMPILE_PAYS_AFTER = 4096


def check_sampling_args(max_new_tokens, temperature, top_k, top_p) -> None:
    """TypeError for a wrong type, ValueError for a value out of range; each names the argument and the range.
    temperature 0 means greedy decoding."""
    for name, value, kind, optional in (("max_new_tokens", max_new_tokens, numbers.Integral, False),
                                        ("temperature", temperature, numbers.Real, False),
                                        ("top_k", top_k, numbers.Integral, True),
                                        ("top_p", top_p, numbers.Real, True)):
        if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)):
            continue
        want = "an int" if kind is numbers.Integral else "a number"
        raise TypeError(f"{name} must be {want}{' or None' if optional else ''}, got {type(value).__name__} {value!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 or top_k 1 is greedy (argmax)."""
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first is always kept)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def use_compiled_step(model, compile_step, attention_mask, use_cache: bool, max_new_tokens: int,
                      batch_size: int = 1) -> bool:
    """Whether decoding runs the compiled static step (`models/static_decode.py`) after the prefill. compile_step:
    True (an error if the model or the inputs cannot), False, or None: when it pays, i.e. the model has a compiled
    step already or max_new_tokens >= COMPILE_PAYS_AFTER, nothing rules it out, and a MoE model's batch gathers at
    most 4 x num_experts expert copies per layer (batch_size x top_k; the compiled step gathers each token's
    experts, so past that it reads more weights than the eager step: suite MoE, 1 thread, compiled / eager per step
    1.89x at batch 1, 1.56x at 4, 1.11x at 8, 0.87x at 16)."""
    if compile_step is not None and not isinstance(compile_step, bool):
        raise TypeError(f"compile_step must be True, False or None (auto), got {compile_step!r}")
    why = "use_cache=False" if not use_cache else static_decode.unsupported(model, attention_mask)
    if compile_step:
        if why is not None:
            raise ValueError(f"compile_step=True cannot be used: {why}; pass compile_step=False or None (auto)")
        return True
    config = model.config
    few_experts = not config.use_moe or batch_size * config.moe_top_k <= 4 * config.num_experts
    return (compile_step is None and why is None and few_experts
            and (static_decode.is_warm(model) or max_new_tokens >= COMPILE_PAYS_AFTER))


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
           attention_mask: torch.Tensor | None = None, use_cache: bool = True,
           generator: torch.Generator | None = None, compile_step: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) at each step. Rows that emitted eos_token_id keep emitting it; the
    stream stops when every row has, or after max_new_tokens steps. compile_step: see `use_compiled_step`."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    input_ids = model._check_inputs(input_ids, None, None, None)[0]  # the model's checks, also for 0 new tokens
    B, T0 = input_ids.shape
    config = model.config
    if config.pos_embedding == "learned" and T0 + max_new_tokens > config.block_size:
        raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                         f"({config.block_size}), the reach of the learned position embedding")
    if attention_mask is not None:
        attention_mask = _check_left_padded(attention_mask, input_ids.shape)
    if max_new_tokens == 0:
        return
    compiled = use_compiled_step(model, compile_step, attention_mask, use_cache, max_new_tokens, B)
    capacity = static_decode.static_capacity(T0 + max_new_tokens) if compiled else T0 + max_new_tokens
    cache = model.new_cache(B, capacity=capacity) if use_cache else None
    seq, mask = input_ids, attention_mask
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]  # (B, V)
    decode = None  # the compiled step, made at the first token it decodes
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished = finished | (nxt == eos_token_id)
        yield nxt
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        if compiled:
            decode = decode or _compiled_decoder(model, cache, fallback=compile_step is None)
            logits = decode(nxt[:, None])
        elif use_cache:
            logits = model(nxt[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
        else:
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            logits = model(seq, attention_mask=mask, logits_to_keep=1).logits[:, -1]


def _compiled_decoder(model, cache, fallback: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens (B, 1) -> logits (B, V) through the compiled static step, continuing the prefilled `cache`. With
    fallback (compile_step=None), a first step that fails to compile (no C++ compiler, an unsupported op) is logged
    and decoding continues eagerly in `cache`, which the static cache has not touched until a step has run."""
    static, step = static_decode.StaticCache(cache), static_decode.compiled_step(model)
    compiled = True

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal compiled
        if compiled:
            try:
                return step(model, tokens, static)
            except Exception as e:  # noqa: BLE001 - any compile failure: the eager step computes the same
                if not fallback or int(static.slot) != cache.length:
                    raise
                log.warning("compiled decoding step failed (%s: %s); decoding eagerly", type(e).__name__, e)
                compiled = False
        return model(tokens, cache=cache, logits_to_keep=1).logits[:, -1]

    return decode


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, use_cache: bool = True,
             streamer: Callable[[torch.Tensor], None] | None = None,
             generator: torch.Generator | None = None, compile_step: bool | None = None) -> torch.Tensor:
    """input_ids (B, T0) -> (B, T0 + n), n <= max_new_tokens (fewer when every row reached eos_token_id).
    temperature=0 or top_k=1 is greedy. `streamer`, if given, is called with each step's tokens (B,).
    compile_step: decode with the compiled static step (True), eagerly (False), or when it pays (None; see
    `use_compiled_step`)."""
    new = []
    for tok in stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                      attention_mask, use_cache, generator, compile_step):
        if streamer is not None:
            streamer(tok)
        new.append(tok)
    if not new:
        return input_ids
    return torch.cat((input_ids, torch.stack(new, dim=1)), dim=1)


def _check_left_padded(mask: torch.Tensor, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor of 0/1 or bool, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must contain only 0 and 1")
    mask = mask.bool()
    # left padding: once a row has a real token, every later token is real; and every row has one
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask must be left-padded for generation (zeros only before the first real token)")
    if bool((~mask[:, -1]).any()):
        raise ValueError("attention_mask: every row needs at least one real token, ending at the last position")
    return mask
