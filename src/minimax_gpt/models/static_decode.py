"""A decoding step with fixed shapes, for `torch.compile` (gpt-fast style): one compiled graph per step.

An eager decoding step of a small model is mostly dispatch: ~450 small ops and the Python between them cost about as
much as its matrix-vector products (docs/performance.md). Compiled, the elementwise chains fuse and the Python goes,
but only if every step has the same shapes and no host sync. So after the prompt's prefill (the eager model, a
`ModelCache`), decoding continues in a `StaticCache` that takes over the prefilled buffers:

- softmax layers keep their preallocated key/value buffers of `capacity` slots; a step writes its key at the slot
  held in a tensor (`slot`), and attends over the whole buffer with a mask of the filled slots (masked slots weigh
  exactly 0), so neither the slot nor the context length is a Python number the graph depends on;
- lightning states and short-convolution inputs live in fixed buffers that each step overwrites in place;
- MoE layers gather each token's k experts' weights (`MoEFeedForward._gathered`) instead of a host sync.

The layers themselves are the model's own modules, called with a context whose cache is this one, so there is one
implementation of every layer; `decode_step` is the model's forward for one token per row. It equals the eager
step to rounding (tests/models/test_static_decode.py: fp64 1e-10 uncompiled, and compiled against the eager step).

Not covered (generation falls back to the eager step): padding (an attention mask), sparse layers (their block
sums), sequence parallelism, and training-mode dropout. Shapes: B batch, S capacity (slots), C n_embd, V vocab.
"""

from __future__ import annotations

import types
import weakref

import torch

from minimax_gpt.models.cache import ModelCache
from minimax_gpt.models.context import ForwardContext

CAPACITY_STEP = 256  # static buffers come in multiples of this many slots, so one compiled graph serves many lengths


def static_capacity(n_tokens: int) -> int:
    """The slots a static cache for n_tokens (prompt + new) gets: n_tokens rounded up to a multiple of CAPACITY_STEP."""
    return -(-n_tokens // CAPACITY_STEP) * CAPACITY_STEP


def unsupported(model, attention_mask: torch.Tensor | None = None) -> str | None:
    """Why `model` cannot decode with a static step (None: it can)."""
    config = model.config
    if "sparse" in config.layer_types:
        return "sparse layers keep per-block key sums that a static step does not update"
    if attention_mask is not None:
        return "an attention mask (padding) makes positions differ per row"
    if model.training and config.dropout > 0:
        return "the model is in training mode with dropout"
    if getattr(model, "sequence_parallel", None) is not None:
        return "the model is set up for sequence parallelism"
    return None


class _InPlace:
    """A list of fixed buffers; assigning an item copies into the buffer, so the compiled step mutates its inputs
    instead of returning new tensors (what `ModelCache.states[i] = state` does in the eager step)."""

    def __init__(self, tensors):
        self.buffers = [None if t is None else t.clone() for t in tensors]

    def __getitem__(self, i: int) -> torch.Tensor | None:
        return self.buffers[i]

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        self.buffers[i].copy_(value)


class StaticCache:
    """The decoding state after a prefill in `cache` (a ModelCache without padding), in buffers whose shapes never
    change: `capacity` slots (cache.capacity, fixed from here on), of which `slot` (a 0-d tensor) are filled."""

    def __init__(self, cache: ModelCache):
        if cache.has_padding:
            raise ValueError("a static cache needs a prefill without padding (no attention mask)")
        if any(s is not None for s in cache.block_sums):
            raise ValueError("a static cache does not support sparse layers")
        self.capacity = cache.capacity
        self.keys, self.values = cache.keys, cache.values  # (B, Hkv, S, D) per softmax layer, shared with the prefill
        self.key_positions = cache.key_positions  # (B, S)
        self.states = _InPlace(cache.states)  # (B, H, D, D) per lightning layer
        self.conv_states = _InPlace(cache.conv_states)  # (B, K-1, 3*H*D) with short_conv
        self.slot = torch.tensor(cache.length, device=cache.key_positions.device)  # next slot to fill
        self.next_position = cache.next_position.clone()  # (B,)

    def update_kv(self, layer_idx: int, offset: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, 1, D) at slot `self.slot` (offset is the eager cache's and unused) -> the full buffers."""
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        kb.index_copy_(2, self.slot.view(1), k)
        vb.index_copy_(2, self.slot.view(1), v)
        return kb, vb

    def context(self) -> ForwardContext:
        """The forward context of the next token of each row: its position, and a mask of the filled slots."""
        positions = self.next_position[:, None]  # (B, 1)
        self.key_positions.index_copy_(1, self.slot.view(1), positions)
        filled = torch.arange(self.capacity, device=positions.device) <= self.slot  # (S,)
        return ForwardContext(positions, self.key_positions, None, filled.view(1, 1, 1, -1), False, 0, self)

    def advance(self) -> None:
        self.slot += 1
        self.next_position += 1


def decode_step(model, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """tokens (B, 1) -> logits (B, V) of the next token, continuing `cache` in place: the model's forward for one
    token per row, with fixed shapes. The caller keeps `cache.slot` below `cache.capacity`."""
    ctx = cache.context()
    if model.rotary is not None:
        ctx.rope = model.rotary(ctx.positions, bound=cache.capacity)
    x = model.wte(tokens)  # (B, 1, C)
    if model.wpe is not None:
        x = x + model.wpe(ctx.positions)
    for block in model.blocks:
        x, _ = block(x, ctx)
    cache.advance()
    return model.lm_head(model.ln_f(x))[:, -1]


_compiled = weakref.WeakKeyDictionary()  # model -> its compiled step (torch.compile recompiles for new shapes itself)


def compiled_step(model):
    """`decode_step` for `model` under torch.compile (one per model, kept while the model lives). Compiling takes
    seconds (4-8 s for the suite's hybrid MoE on this CPU); each later call with the same shapes runs the graph. A new
    capacity bucket or batch size recompiles once with that size symbolic (torch.compile's automatic dynamic shapes).
    Each model compiles its own copy of the function's code: torch.compile keeps graphs, and counts recompiles
    against its limit of 8, per code object, so models of different shapes would otherwise exhaust it together."""
    if model not in _compiled:
        code = decode_step.__code__.replace()  # a distinct code object, the same function
        _compiled[model] = torch.compile(types.FunctionType(code, decode_step.__globals__, "decode_step"),
                                         fullgraph=True)
    return _compiled[model]


def is_warm(model) -> bool:
    """Whether `model` already has a compiled step (its compile time is paid)."""
    return model in _compiled
