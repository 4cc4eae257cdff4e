"""`MiniMaxConfig`: the one typed description of a model. Everything else derives from it.

Per-layer differences are data: `layer_types` lists each layer's token mixer ("lightning", "softmax" or "sparse"),
and `__post_init__` derives what was left unset and validates every field, raising `ValueError` that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimax_gpt.atomic import atomic_file

LAYER_TYPES = ("lightning", "softmax", "sparse")
POS_EMBEDDINGS = ("learned", "none")
LIGHTNING_BACKENDS = ("auto", "torch", "triton")


@dataclass
class MiniMaxConfig:
    # --- sizes -------------------------------------------------------------------------------------------------
    vocab_size: int = 30000
    block_size: int = 1024  # maximum sequence length (learned positions, rotary tables, generation bound)
    n_layer: int = 12
    n_head: int = 8
    n_kv_head: int | None = None  # grouped-query attention for softmax layers; None -> n_head
    n_embd: int = 512
    head_dim: int | None = None  # None -> n_embd // n_head
    intermediate_size: int | None = None  # SwiGLU hidden width (dense MLP and each expert); None -> derived

    # --- layer layout ------------------------------------------------------------------------------------------
    use_hybrid_attn: bool = True  # lightning layers with a softmax layer every `hybrid_period` layers
    hybrid_period: int = 8  # MiniMax-01: 7 lightning : 1 softmax, the softmax layer last in each period
    layer_types: list[str] | None = None  # explicit per-layer mixers; derived from the two fields above when None

    # --- attention ---------------------------------------------------------------------------------------------
    use_flash_attn: bool = True  # softmax layers through SDPA / FlashAttention; False -> explicit math path
    lightning_chunk_size: int = 64  # block size of the chunked lightning kernel (transformers calls it block_size)
    lightning_use_rope: bool = False  # rotate q/k in lightning layers too (MiniMax-01 rotates softmax layers only)
    # "auto": the Triton kernels on CUDA where Triton is importable, else the PyTorch op (logged once); "torch";
    # "triton" (an error where it cannot run). With "auto", MINIMAX_GPT_LIGHTNING_BACKEND may force either.
    lightning_backend: str = "auto"
    # Kernel size of a causal depthwise convolution over time on the q, k, v projections of lightning layers (before
    # their SiLU), as Zoology (arXiv 2312.04927) and Mamba put before a linear mixer; 0 = off (MiniMax-01 has none).
    # It lets a head with a fixed decay bind a token to its predecessor, which recall needs (docs/recall.md).
    short_conv: int = 0

    # --- positions ---------------------------------------------------------------------------------------------
    pos_embedding: str = "none"  # "learned": absolute nn.Embedding added to the tokens; "none"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # rotate the first rotary_dim dims of each head; None -> head_dim, 0 -> no RoPE
    adaptive_xpos: bool = False  # XPos decay on top of RoPE, with a scale base adapted to depth and length
    xpos_scale_base: float = 512.0
    xpos_adapt: bool = True  # with adaptive_xpos: adapt the scale base to depth and to length beyond block_size

    # --- block-sparse attention ("sparse" layers: MoBA, arXiv 2502.13189; see minimax_gpt.ops.block_sparse) ------
    sparse_block_size: int = 512  # keys in blocks of this many positions
    sparse_top_k: int = 4  # each query attends its own block causally plus this many earlier blocks (by mean key)

    # --- normalisation and residuals ---------------------------------------------------------------------------
    norm_eps: float = 1e-5
    use_post_layernorm: bool = False  # False: pre-norm; True: MiniMax-01 post-norm (residual is the normed tensor)
    # Each residual branch is y = alpha * residual + beta * branch (DeepNorm style; MiniMax-01 names and values).
    linear_attn_alpha_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    full_attn_alpha_factor: float = 1.0
    full_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 1.0
    mlp_beta_factor: float = 1.0

    # --- mixture of experts ------------------------------------------------------------------------------------
    use_moe: bool = False
    num_experts: int = 4
    moe_top_k: int = 2  # experts per token; under moe_top_p the most per token (the cap)
    moe_capacity_factor: float | None = None  # None: dropless; else cap = ceil(cf * tokens * k / E), training only
    # Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", arXiv 2403.07652): each token takes experts
    # in descending probability until their mass reaches p, at most moe_top_k of them. None: plain top-k.
    moe_top_p: float | None = None
    # Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437): a per-expert bias added to the router
    # probabilities for expert selection only, moved by this rate towards balance after each optimizer step
    # (b_e += rate * sign(mean load - load_e), loads summed over the step and the data-parallel ranks). 0: off.
    moe_bias_update_rate: float = 0.0
    moe_aux_loss_coef: float = 0.01  # load balancing (Switch / Mixtral)
    moe_z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    moe_diversity_loss_coef: float = 0.0  # penalty on similarity between experts' weights
    moe_jitter_noise: float = 0.0  # multiplicative router-input jitter during training
    moe_orthogonal_init: bool = True  # experts initialised orthogonally
    moe_layer_scale: bool = False  # learnable per-channel scale on the MoE branch output
    moe_layer_scale_init: float = 0.1

    # --- training-time behaviour -------------------------------------------------------------------------------
    dropout: float = 0.0
    use_checkpoint: bool = False  # non-reentrant activation checkpointing per block
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    scale_residual_init: bool = True  # output projections get init_std / sqrt(2 * n_layer) (GPT-2 / nanoGPT)

    _derived: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self._check_types()
        derived = []
        if self.n_kv_head is None:
            self.n_kv_head, _ = self.n_head, derived.append("n_kv_head")
        if self.head_dim is None:
            _positive(self, "n_head")
            if self.n_embd % self.n_head != 0:
                raise ValueError(
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) when head_dim is not given"
                )
            self.head_dim, _ = self.n_embd // self.n_head, derived.append("head_dim")
        if self.intermediate_size is None:
            # SwiGLU with 8/3 * n_embd hidden units rounded up to a multiple of 64 (LLaMA convention).
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            derived.append("intermediate_size")
        if self.rotary_dim is None:
            self.rotary_dim, _ = self.head_dim, derived.append("rotary_dim")
        if self.layer_types is None:
            self.layer_types = _default_layer_types(self.n_layer, self.use_hybrid_attn, self.hybrid_period)
            derived.append("layer_types")
        else:
            self.layer_types = list(self.layer_types)
        self._derived = tuple(derived)
        self._validate()

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            allowed = _TYPES[f.name]
            if value is None and type(None) in allowed:
                continue
            if isinstance(value, bool) and bool not in allowed:
                raise TypeError(f"{f.name} must be {_type_names(allowed)}, got bool {value!r}")
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not isinstance(value, allowed):
                raise TypeError(f"{f.name} must be {_type_names(allowed)}, got {type(value).__name__} {value!r}")

    def _validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                     "intermediate_size", "hybrid_period", "lightning_chunk_size", "num_experts", "moe_top_k",
                     "sparse_block_size", "sparse_top_k"):
            _positive(self, name)
        if self.adaptive_xpos and "sparse" in self.layer_types:
            raise ValueError("adaptive_xpos is not supported with 'sparse' layers (their block gate and fast path "
                             "take plain RoPE keys); set adaptive_xpos=False or use 'softmax' layers")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but n_layer is {self.n_layer}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] is {t!r}; allowed: {', '.join(LAYER_TYPES)}")
        if not self.use_hybrid_attn and "lightning" in self.layer_types:
            raise ValueError("layer_types contains 'lightning' layers but use_hybrid_attn is False; "
                             "set use_hybrid_attn=True or list only 'softmax' layers")
        if self.short_conv != 0 and self.short_conv < 2:
            raise ValueError(f"short_conv must be 0 (off) or a kernel size >= 2, got {self.short_conv}")
        if self.short_conv and "lightning" not in self.layer_types:
            raise ValueError(f"short_conv={self.short_conv} applies to lightning layers and layer_types has none; "
                             "set short_conv=0 or add 'lightning' layers")
        if self.lightning_backend not in LIGHTNING_BACKENDS:
            raise ValueError(f"lightning_backend is {self.lightning_backend!r}; "
                             f"allowed: {', '.join(LIGHTNING_BACKENDS)}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"pos_embedding is {self.pos_embedding!r}; allowed: {', '.join(POS_EMBEDDINGS)}")
        if not (0 <= self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and in [0, head_dim={self.head_dim}]")
        if self.adaptive_xpos and self.rotary_dim == 0:
            raise ValueError("adaptive_xpos needs rotary dims: rotary_dim is 0")
        for name in ("rope_theta", "xpos_scale_base", "norm_eps", "init_std", "moe_layer_scale_init"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("linear_attn_alpha_factor", "linear_attn_beta_factor", "full_attn_alpha_factor",
                     "full_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_diversity_loss_coef", "moe_jitter_noise"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.moe_jitter_noise >= 1.0:
            raise ValueError(f"moe_jitter_noise must be in [0, 1), got {self.moe_jitter_noise}")
        if self.use_moe and self.moe_top_k > self.num_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) must be <= num_experts ({self.num_experts})")
        if self.moe_capacity_factor is not None and not (
            math.isfinite(self.moe_capacity_factor) and self.moe_capacity_factor > 0
        ):
            raise ValueError(f"moe_capacity_factor must be None (dropless) or > 0, got {self.moe_capacity_factor}")
        if self.moe_top_p is not None and not (math.isfinite(self.moe_top_p) and 0 < self.moe_top_p <= 1):
            raise ValueError(f"moe_top_p must be None (top-k routing) or in (0, 1], got {self.moe_top_p}")
        if not (math.isfinite(self.moe_bias_update_rate) and self.moe_bias_update_rate >= 0):
            raise ValueError(f"moe_bias_update_rate must be a finite number >= 0 (0 = off), "
                             f"got {self.moe_bias_update_rate}")

    # --- derived views -----------------------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_head // self.n_kv_head

    # --- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self, explicit: bool = True) -> dict[str, Any]:
        """All fields. With explicit=False, fields derived in __post_init__ are written as None so that a changed
        size re-derives them (e.g. layer_types for a new n_layer)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        if not explicit:
            for name in self._derived:
                d[name] = None
        d["layer_types"] = list(d["layer_types"]) if d["layer_types"] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MiniMaxConfig":
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MiniMaxConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MiniMaxConfig":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("a MiniMaxConfig JSON document must be an object")
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write config JSON atomically (temporary file, then rename)."""
        with atomic_file(path) as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MiniMaxConfig":
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes: Any) -> "MiniMaxConfig":
        """A copy with some fields changed; fields that were derived are derived again."""
        d = self.to_dict(explicit=False)
        d.update(changes)
        return MiniMaxConfig.from_dict(d)


def _default_layer_types(n_layer: int, hybrid: bool, period: int) -> list[str]:
    if not hybrid:
        return ["softmax"] * n_layer
    _positive_value("hybrid_period", period)
    return ["softmax" if (i + 1) % period == 0 else "lightning" for i in range(n_layer)]


def _positive(cfg: MiniMaxConfig, name: str) -> None:
    _positive_value(name, getattr(cfg, name))


def _positive_value(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


_TYPES: dict[str, tuple[type, ...]] = {
    f.name: (
        (int,) if f.type in ("int",) else
        (int, type(None)) if f.type == "int | None" else
        (float,) if f.type == "float" else
        (float, type(None)) if f.type == "float | None" else
        (bool,) if f.type == "bool" else
        (str,) if f.type == "str" else
        (list, tuple, type(None)) if f.type == "list[str] | None" else
        (tuple,)
    )
    for f in dataclasses.fields(MiniMaxConfig)
}
