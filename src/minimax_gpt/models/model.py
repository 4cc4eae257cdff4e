"""`EnhancedMiniMaxGPT`: token embedding (+ optional learned positions), a stack of hybrid blocks, final RMSNorm and
the output projection (optionally tied to the embedding).

    logits, loss = model(input_ids, targets=targets)          # loss = cross-entropy + weighted MoE aux losses
    out = model(input_ids, cache=cache)                       # out.cache, out.aux_losses, out.ce_loss, out.moe_stats
    tokens = model.generate(input_ids, max_new_tokens=50, temperature=0.8)

Shapes: B batch, T tokens, C n_embd, V vocab.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minimax_gpt.models.block import EnhancedHybridBlock
from minimax_gpt.models.cache import ModelCache
from minimax_gpt.config import MiniMaxConfig
from minimax_gpt import generation
from minimax_gpt.models.context import build_context
from minimax_gpt.models.loss import chunked_cross_entropy
from minimax_gpt.models.moe import moe_aux_losses, moe_total_aux_loss
from minimax_gpt.models.norm import RMSNorm
from minimax_gpt.models.rotary import RotaryEmbedding

IGNORE_INDEX = -100


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class CausalLMOutput(tuple):
    """`(logits, loss)`, so `logits, loss = model(...)` unpacks; the rest are attributes:
    `ce_loss` (cross-entropy alone), `aux_losses` (dict of unweighted MoE losses), `moe_stats` (per-layer router
    statistics), `cache` (the cache passed in, updated). `aux_losses` may be given as a function, called on first
    access: without targets nothing needs them, and decoding should not pay for them at every step."""

    def __new__(cls, logits, loss, aux_losses: dict | Callable[[], dict] | None = None, **extras: Any):
        out = super().__new__(cls, (logits, loss))
        out.__dict__.update(extras)
        out._aux_losses = {} if aux_losses is None else aux_losses
        return out

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        if callable(self._aux_losses):
            self._aux_losses = self._aux_losses()
        return self._aux_losses

    @property
    def logits(self) -> torch.Tensor:
        return self[0]

    @property
    def loss(self) -> torch.Tensor | None:
        return self[1]


class EnhancedMiniMaxGPT(nn.Module):
    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        if not isinstance(config, MiniMaxConfig):
            raise TypeError(f"config must be a MiniMaxConfig, got {type(config).__name__}")
        self.config = config
        # Checkpoint each block's activations in training (config.use_checkpoint). A trainer that applies activation
        # checkpointing from outside (minimax_gpt.parallel.parallelize) turns this off, so it is applied once.
        self.gradient_checkpointing = config.use_checkpoint
        # Sequence parallelism: a handle installed from outside (parallel.sequence.SequenceParallel) through which
        # the layers of a forward without a cache exchange states and keys with the ranks holding other slices.
        self.sequence_parallel = None
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EnhancedHybridBlock(config, i) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        uses_rope = config.rotary_dim > 0 and (
            "softmax" in config.layer_types or "sparse" in config.layer_types or config.lightning_use_rope)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.block_size) if uses_rope else None
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """All weight initialisation, in one place. With s = init_std and L = n_layer:

        | parameter                                        | init                                               |
        |--------------------------------------------------|----------------------------------------------------|
        | wte, wpe                                         | normal(0, s)                                       |
        | every nn.Linear input projection (qkv, gate, w1, w3, router) | normal(0, s)                           |
        | residual output projections (o_proj, out_proj, w2)| normal(0, s / sqrt(2L)) if scale_residual_init     |
        | lm_head (untied)                                 | normal(0, s)                                       |
        | RMSNorm weights                                  | 1                                                  |
        | MoE experts, router, layer scale                 | the MoE module's `init_weights(s, out_std)`        |
        | lightning decay rates                            | fixed buffers from the layer index, not learned    |
        | short_conv kernels (lightning layers)            | ShortConv.init_weights: uniform(+-1/sqrt(K))       |
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer) if self.config.scale_residual_init else std
        residual_outputs = {"o_proj", "out_proj", "w2"}
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, 0.0, out_std if last in residual_outputs else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            if hasattr(module, "init_weights") and module is not self:
                module.init_weights(std, out_std)

    # --- running ------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int | None = None, max_rollback: int = 0) -> ModelCache:
        """An empty cache for `batch_size` rows; buffers grow if `capacity` (default block_size) is exceeded.
        max_rollback: how many forward calls back `cache.crop` may go in lightning layers (see ModelCache)."""
        p = self.wte.weight
        return ModelCache(self.config, batch_size, capacity or self.config.block_size, p.device, p.dtype,
                          max_rollback=max_rollback)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: ModelCache | None = None,
                logits_to_keep: int = 0, loss_chunk_size: int = 0) -> CausalLMOutput:
        """input_ids (B, T) int64; targets (B, T) with -100 = ignore (positions where attention_mask is 0 are
        ignored too); attention_mask (B, T), or (B, past + T) with a cache, 1 = real token (left padding);
        cache from `new_cache`, updated in place; logits_to_keep > 0 computes logits for the last positions only.
        loss_chunk_size > 0 with targets: the loss is `loss.chunked_cross_entropy` over chunks of that many positions
        and the (B, T, V) logits are never materialised: the returned logits are None."""
        for name, value in (("logits_to_keep", logits_to_keep), ("loss_chunk_size", loss_chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = off), got {value!r}")
        input_ids, targets, attention_mask = self._check_inputs(input_ids, targets, attention_mask, cache)
        B, T = input_ids.shape
        ctx = build_context(input_ids, attention_mask, cache, self.sequence_parallel if cache is None else None)
        if self.rotary is not None:
            ctx.rope = self.rotary(ctx.positions, bound=ctx.key_positions.shape[1])  # positions < keys so far
        x = self.wte(input_ids)  # (B, T, C)
        if self.wpe is not None:
            if int(ctx.positions.max()) >= self.config.block_size:
                raise ValueError(f"sequence reaches position {int(ctx.positions.max())} but learned positions "
                                 f"stop at block_size - 1 = {self.config.block_size - 1}")
            x = x + self.wpe(ctx.positions)
        x = self.drop(x)
        stats = []
        use_ckpt = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x, s = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x, s = block(x, ctx)
            stats.append(s)
        if cache is not None:
            cache.end()
        x = self.ln_f(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        chunked_loss = loss_chunk_size > 0 and targets is not None
        logits = None if chunked_loss else self.lm_head(x)  # (B, T, V)

        moe_stats = [s for s in stats if s is not None]
        aux_losses, aux_total = {}, None
        if self.config.use_moe and targets is None:
            aux_losses = functools.partial(moe_aux_losses, moe_stats, self.config)  # on first access
        elif self.config.use_moe:
            aux_losses = moe_aux_losses(moe_stats, self.config)
            aux_total = moe_total_aux_loss(aux_losses, self.config)
        ce_loss = loss = None
        if targets is not None:
            if logits_to_keep > 0:
                raise ValueError("logits_to_keep must be 0 when targets are given")
            if attention_mask is not None:
                targets = targets.masked_fill(~attention_mask[:, -T:], IGNORE_INDEX)
            if chunked_loss:
                ce_loss = chunked_cross_entropy(x, self.lm_head.weight, targets, loss_chunk_size, IGNORE_INDEX)
            else:
                ce_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=IGNORE_INDEX)
            loss = ce_loss if aux_total is None else ce_loss + aux_total
        return CausalLMOutput(logits, loss, aux_losses, ce_loss=ce_loss, moe_stats=moe_stats, cache=cache)

    def _check_inputs(self, input_ids, targets, attention_mask, cache):
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must not be empty, got shape {tuple(input_ids.shape)}")
        V = self.config.vocab_size
        # Value checks read the data (a host sync): under torch.compile they become in-graph asserts instead of graph
        # breaks, raising RuntimeError with the same message.
        if _compiling():
            torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(), f"input_ids must be in [0, vocab_size={V})")
        elif bool(((input_ids < 0) | (input_ids >= V)).any()):
            bad = input_ids[(input_ids < 0) | (input_ids >= V)][0].item()
            raise ValueError(f"input_ids must be in [0, vocab_size={V}), found {bad}")
        input_ids = input_ids.long()
        B, T = input_ids.shape
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype in (
                    torch.bool, torch.complex64, torch.complex128):
                raise TypeError(f"targets must be an integer tensor of token ids, got "
                                f"{getattr(targets, 'dtype', type(targets).__name__)}")
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(targets.shape)}")
            bad_targets = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= V)
            if _compiling():
                torch._assert_async(~bad_targets.any(), f"targets must be in [0, vocab_size={V}) or {IGNORE_INDEX}")
            elif bool(bad_targets.any()):
                raise ValueError(f"targets must be in [0, vocab_size={V}) or {IGNORE_INDEX} (ignored)")
            targets = targets.long()
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError("attention_mask must be a torch.Tensor of 0/1 or bool")
            past = cache.length if cache is not None else 0
            allowed = {(B, T), (B, past + T)}
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) not in allowed:
                raise ValueError(f"attention_mask must have shape {(B, T)}" +
                                 (f" or {(B, past + T)}" if past else "") + f", got {tuple(attention_mask.shape)}")
            if attention_mask.dtype != torch.bool:
                if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                    raise ValueError("attention_mask must contain only 0 and 1")
                attention_mask = attention_mask.bool()
            if "lightning" in self.config.layer_types:
                # a recurrent state decays at every step: padding is exact on the left (before any token) and at the
                # end (nothing real follows), not between real tokens
                seen_real = attention_mask.cummax(dim=1).values
                gap = (~attention_mask & seen_real).cummax(dim=1).values
                if bool((attention_mask & gap).any()):
                    raise ValueError("attention_mask has padding between real tokens; lightning layers need left "
                                     "padding (or trailing padding), e.g. 0 0 1 1 1 or 1 1 1 0 0")
        return input_ids, targets, attention_mask

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, **kwargs):
        """The prompt followed by up to max_new_tokens sampled tokens; see `minimax_gpt.generation.generate`."""
        return generation.generate(self, input_ids, max_new_tokens, temperature=temperature, **kwargs)

    @property
    def balances_routing(self) -> bool:
        """Whether the MoE layers carry an auxiliary-loss-free routing bias (config.moe_bias_update_rate > 0) that the
        trainer moves after each optimizer step with `update_routing_bias`."""
        return self.config.use_moe and self.config.moe_bias_update_rate > 0

    @torch.no_grad()
    def update_routing_bias(self, expert_counts: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3), after an optimizer step. expert_counts (L, E): the selections of each
        of the L MoE layers, in layer order, over the whole step, summed over data-parallel ranks (so every rank
        makes the same update); see `MoEFeedForward.update_routing_bias`."""
        if not self.balances_routing:
            raise ValueError("update_routing_bias needs use_moe and moe_bias_update_rate > 0")
        layers = [block.mlp for block in self.blocks]
        if expert_counts.dim() != 2 or expert_counts.shape[0] != len(layers):
            raise ValueError(f"expert_counts must be (MoE layers, num_experts) = ({len(layers)}, "
                             f"{self.config.num_experts}), got {tuple(expert_counts.shape)}")
        for layer, counts in zip(layers, expert_counts):
            layer.update_routing_bias(counts)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    # --- our checkpoint format (minimax_gpt.interop.pretrained) ---------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """config.json + model.safetensors, written atomically; see `minimax_gpt.interop.pretrained`."""
        from minimax_gpt.interop.pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "EnhancedMiniMaxGPT":
        """The model written by `save_pretrained`, in eval mode."""
        from minimax_gpt.interop.pretrained import from_pretrained

        return from_pretrained(directory, device=device, dtype=dtype)
