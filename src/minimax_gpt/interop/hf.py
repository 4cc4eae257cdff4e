"""Hugging Face interop: MiniMax checkpoints in and out, checked against transformers' own `MiniMaxForCausalLM`.

    config_from_hf(hf_config_or_dict) -> MiniMaxConfig     transformers' MiniMaxConfig or the released remote-code one
    config_to_hf(config)              -> transformers.MiniMaxConfig
    from_hf(model_or_dir)             -> EnhancedMiniMaxGPT  a MiniMaxForCausalLM, or a directory with config.json and
                                                             (sharded) safetensors, read one tensor at a time
    to_hf(model)                      -> transformers.MiniMaxForCausalLM, weights copied exactly
    save_hf(model, dir)                  to_hf + save_pretrained, written atomically

transformers is imported inside the functions (extra `[hf]`).

Weight names (ours <- transformers <- released remote code, `model.layers.{i}.` prefix on the right):
    wte / ln_f / lm_head        model.embed_tokens / model.norm / lm_head
    blocks.{i}.norm1 / norm2    input_layernorm / post_attention_layernorm
    lightning attn.{qkv_proj, output_gate, norm, out_proj}      self_attn.<same>        (head-major [q_h|k_h|v_h])
    softmax attn.qkv_proj = [q; k; v] rows, attn.o_proj         self_attn.{q,k,v,o}_proj
    mlp.gate                    mlp.gate            <- block_sparse_moe.gate
    mlp.w1[e], w3[e]            mlp.experts.gate_up_proj[e] = [w1[e]; w3[e]]   <- block_sparse_moe.experts.{e}.w1 / w3
    mlp.w2[e]                   mlp.experts.down_proj[e]                       <- block_sparse_moe.experts.{e}.w2

Config (ours <- transformers <- remote code): layer_types "lightning"/"softmax" <- "linear_attention"/"full_attention"
<- attn_type_list 0/1; lightning_chunk_size <- block_size (the lightning block, NOT our block_size, which is the
maximum length <- max_position_embeddings); n_head/n_kv_head/head_dim <- num_attention_heads/num_key_value_heads/
head_dim; num_experts/moe_top_k <- num_local_experts/num_experts_per_tok; the six {linear_attn,full_attn,mlp}_{alpha,
beta}_factor <- same names <- layernorm_{linear_attention,full_attention,mlp}_{alpha,beta}; rope_theta <-
rope_parameters["rope_theta"] <- rope_theta; norm_eps <- rms_norm_eps; moe_aux_loss_coef <- router_aux_loss_coef;
use_post_layernorm <- always True <- postnorm; rotary_dim <- head_dim <- rotary_dim; init_std <- initializer_range.

A dense model of ours (use_moe=False) is exported as a 1-expert MoE with top-1 routing: the one renormalised routing
weight is p / p = 1.0 exactly whatever the router says, so the output is w2(silu(w1 x) * w3 x), bit for bit. Its router
weight is written as zeros and router_aux_loss_coef as 0 (with one expert the balance loss is the constant 1). Read
back, it is a 1-expert MoE model (same numbers), not a dense one.

What cannot be expressed on the other side raises one ValueError that lists every offending field: on export
pre-norm, adaptive XPos, learned positions, a capacity limit, MoE layer scale, top-p routing, RoPE in lightning
layers, partial or no rotary with softmax layers, and (from `to_hf`, which sees the weights) a non-zero
aux-loss-free routing bias, which changes which experts are selected (an all-zero bias exports exactly); on import a non-SiLU activation, sliding windows, RoPE scaling, shared experts, per-layer
expert counts, and (remote code) non-power-of-two heads with lightning layers (see 2 below). Settings that only act in
training and have no counterpart (dropout, z-loss, diversity loss, router jitter, whose transformers version also
perturbs the experts' input, the routing bias's update rate) are not carried and a warning names them; an imported model has moe_z_loss_coef = 0, so
its loss is transformers' loss (cross-entropy + router_aux_loss_coef * load balance).

Where transformers' MiniMax deviates from the released MiniMax-Text-01 (remote code, `attn_type_list` configs):
1. RoPE: the released model rotates the first `rotary_dim` (64) of head_dim (128) dims; transformers rotates the whole
   head. Importing a remote-code config follows the released model (rotary_dim from the config); exporting a partial
   rotary model to transformers raises. Importing a transformers config follows transformers (rotary_dim = head_dim).
2. Lightning decay slopes: the released code uses ALiBi slopes, which for non-power-of-two head counts interleave
   slopes of the next power of two; transformers (and our `lightning_slopes`) use 2^(-8(h+1)/H) for every H. They
   agree for powers of two (MiniMax-Text-01 has 64 heads). A remote-code config with another head count and lightning
   layers cannot be imported exactly and raises. The per-layer factor also differs slightly: released
   1 - l/(L-1) + 1e-5, transformers and ours 1 - l/(L-1+1e-5) + 1e-5; identical at l = 0, and at the last layer of an
   80-layer model the slope differs by about 1.3% of a rate of ~1e-5 per token (negligible below ~10^5 tokens).
   It is logged on import and not representable in our config.
3. Cache length: transformers reads the cached length from layer 0 (`cache.get_seq_length()`), which is 0 when
   layer 0 is a lightning layer, so a forward with `cache` and without `position_ids` rotates new tokens as if they
   were at position 0. `generate` passes positions and is right; a hand-written decode loop must pass
   `position_ids`. Our cache keeps positions itself. Parity tests pass positions explicitly.
4. Layer 0's slope factor, lightning chunk sizes and RMSNorm placement agree; the lightning output norm uses eps 1e-6
   on both sides.

Shapes: E experts, I intermediate_size, C n_embd, H heads, Hkv key/value heads, D head_dim.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from minimax_gpt.atomic import atomic_directory
from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.interop.pretrained import (read_json, 
    CONFIG_NAME,
    SafetensorsReader,
    copy_checked,
    from_pretrained,
    save_pretrained,
)

log = logging.getLogger(__name__)

TO_HF_LAYER = {"lightning": "linear_attention", "softmax": "full_attention"}
FROM_HF_LAYER = {v: k for k, v in TO_HF_LAYER.items()}
FROM_ATTN_TYPE = {0: "lightning", 1: "softmax"}
FACTORS = ("linear_attn_alpha_factor", "linear_attn_beta_factor", "full_attn_alpha_factor", "full_attn_beta_factor",
           "mlp_alpha_factor", "mlp_beta_factor")
REMOTE_FACTORS = {  # remote-code name -> ours (and transformers')
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}
# Buffers that transformers / the remote code keep in their state dicts and that are recomputed from the config.
DERIVED_KEYS = re.compile(r"(rotary_emb\.inv_freq|self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay))$")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the [hf] extra is a dev dependency
        raise ImportError("minimax_gpt.interop.hf needs transformers: pip install 'minimax-gpt[hf]'") from e
    return transformers


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------
def export_problems(config: MiniMaxConfig) -> list[str]:
    """Every setting of `config` that transformers' MiniMax cannot express (empty: exportable)."""
    problems = []
    if "sparse" in config.layer_types:
        layers = [i for i, t in enumerate(config.layer_types) if t == "sparse"]
        problems.append(f"layer_types has 'sparse' layers {layers}: transformers' MiniMax has no block-sparse (MoBA) "
                        "attention layer, only linear and full attention")
    if config.short_conv:
        problems.append(f"short_conv={config.short_conv}: transformers' MiniMax has no convolution in its lightning "
                        "(linear attention) layers")
    if not config.use_post_layernorm:
        problems.append("use_post_layernorm=False: transformers' MiniMax is post-norm only")
    if config.adaptive_xpos:
        problems.append("adaptive_xpos=True: transformers' MiniMax has plain RoPE, no XPos")
    if config.pos_embedding != "none":
        problems.append(f"pos_embedding={config.pos_embedding!r}: transformers' MiniMax has no learned positions")
    if config.use_moe and config.moe_capacity_factor is not None:
        problems.append(f"moe_capacity_factor={config.moe_capacity_factor}: transformers' MiniMax is dropless")
    if config.use_moe and config.moe_top_p is not None:
        problems.append(f"moe_top_p={config.moe_top_p}: transformers' MiniMax routes every token to exactly "
                        "num_experts_per_tok experts (no top-p routing)")
    if config.use_moe and config.moe_layer_scale:
        problems.append("moe_layer_scale=True: transformers' MiniMax has no scale on the MoE output")
    if config.lightning_use_rope:
        problems.append("lightning_use_rope=True: transformers' MiniMax applies no RoPE in lightning layers")
    if "softmax" in config.layer_types and config.rotary_dim != config.head_dim:
        problems.append(f"rotary_dim={config.rotary_dim} with head_dim={config.head_dim}: transformers' MiniMax "
                        "rotates the whole head (partial or no rotary is not expressible)")
    return problems


def _training_only_not_carried(config: MiniMaxConfig) -> list[str]:
    names = []
    if config.dropout > 0:
        names.append(f"dropout={config.dropout}")
    if config.use_moe:
        for name in ("moe_z_loss_coef", "moe_diversity_loss_coef", "moe_jitter_noise", "moe_bias_update_rate"):
            if getattr(config, name) > 0:
                names.append(f"{name}={getattr(config, name)}")
    return names


def config_to_hf(config: MiniMaxConfig, **hf_kwargs: Any):
    """transformers.MiniMaxConfig with the same numbers; `hf_kwargs` (e.g. attn_implementation, eos_token_id) are
    passed through. Raises ValueError listing every setting that cannot be expressed."""
    problems = export_problems(config)
    if problems:
        raise ValueError("cannot export to transformers' MiniMax:\n  - " + "\n  - ".join(problems))
    not_carried = _training_only_not_carried(config)
    if not_carried:
        log.warning("training-only settings with no transformers counterpart are not exported: %s",
                    ", ".join(not_carried))
    moe = dict(num_local_experts=config.num_experts, num_experts_per_tok=config.moe_top_k,
               router_aux_loss_coef=config.moe_aux_loss_coef)
    if not config.use_moe:  # dense SwiGLU as one expert with top-1 routing (weight exactly 1.0)
        moe = dict(num_local_experts=1, num_experts_per_tok=1, router_aux_loss_coef=0.0)
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=config.block_size,
        initializer_range=config.init_std, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, sliding_window=None, attention_dropout=0.0,
        router_jitter_noise=0.0, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        layer_types=[TO_HF_LAYER[t] for t in config.layer_types], block_size=config.lightning_chunk_size,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        **moe, **{name: getattr(config, name) for name in FACTORS},
    )
    kwargs.update(hf_kwargs)
    return _transformers().MiniMaxConfig(**kwargs)


def _as_dict(hf_config) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a transformers config or a dict, got {type(hf_config).__name__}")


def _is_remote_code(d: dict[str, Any]) -> bool:
    return d.get("attn_type_list") is not None and not d.get("layer_types")


def _hf_layer_types(d: dict[str, Any], remote: bool, n_layer: int, problems: list[str]) -> list[str]:
    """Our layer_types from `attn_type_list` (remote code), `layer_types` or transformers' default pattern; entries
    we cannot express are appended to `problems`."""
    if remote:
        bad = [t for t in d["attn_type_list"] if t not in FROM_ATTN_TYPE]
        if bad:
            problems.append(f"attn_type_list has entries {bad}; allowed 0 (lightning), 1 (softmax)")
        return [FROM_ATTN_TYPE.get(t, "softmax") for t in d["attn_type_list"]]
    if d.get("layer_types"):
        bad = sorted({t for t in d["layer_types"] if t not in FROM_HF_LAYER})
        if bad:
            problems.append(f"layer_types has {bad}; allowed {sorted(FROM_HF_LAYER)}")
        return [FROM_HF_LAYER.get(t, "softmax") for t in d["layer_types"]]
    return [FROM_HF_LAYER[t] for t in _transformers().MiniMaxConfig(num_hidden_layers=n_layer).layer_types]


def _hf_rope_and_experts(d: dict[str, Any], get, defaults, problems: list[str]) -> tuple[dict, float, int]:
    """(rope parameters, rope_theta, experts per layer); activation, sliding window, RoPE scaling, per-layer expert
    counts and shared experts we cannot express are appended to `problems`."""
    if get("hidden_act") not in ("silu", "swish"):
        problems.append(f"hidden_act={get('hidden_act')!r}: our experts are SwiGLU (silu)")
    if d.get("sliding_window") is not None:
        problems.append(f"sliding_window={d['sliding_window']}: we have no sliding-window attention")
    rope = d.get("rope_parameters") or {}
    if d.get("rope_scaling"):
        rope = {**rope, **d["rope_scaling"]}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}: only default RoPE is supported")
    rope_theta = rope.get("rope_theta", d.get("rope_theta", getattr(defaults, "default_theta", 1e6)))
    experts = get("num_local_experts")
    if isinstance(experts, list):
        if len(set(experts)) != 1:
            problems.append(f"num_local_experts={experts}: a different expert count per layer is not supported")
        experts = experts[0]
    shared = d.get("shared_intermediate_size") or 0
    if (max(shared) if isinstance(shared, list) else shared) > 0:
        problems.append(f"shared_intermediate_size={shared}: shared experts are not supported")
    return rope, rope_theta, experts


def config_from_hf(hf_config) -> MiniMaxConfig:
    """Our config for a transformers MiniMaxConfig, or for the released remote-code config (keys `attn_type_list`,
    `layernorm_*_alpha/beta`, `postnorm`, `rotary_dim`), as an object or a dict (e.g. a parsed config.json).
    Missing keys take transformers' defaults. Raises ValueError listing every setting we cannot express."""
    d = _as_dict(hf_config)
    remote = _is_remote_code(d)
    defaults = _transformers().MiniMaxConfig()

    def get(key):
        value = d.get(key)
        return getattr(defaults, key, None) if value is None else value

    problems = []
    n_layer, n_head = get("num_hidden_layers"), get("num_attention_heads")
    hidden = get("hidden_size")
    head_dim = d.get("head_dim") or hidden // n_head
    n_kv_head = d.get("num_key_value_heads") or n_head

    layer_types = _hf_layer_types(d, remote, n_layer, problems)
    rope, rope_theta, experts = _hf_rope_and_experts(d, get, defaults, problems)
    rotary_dim = head_dim
    if remote:
        factors = {ours: float(d.get(theirs, 1.0)) for theirs, ours in REMOTE_FACTORS.items()}
        post_norm = bool(d.get("postnorm", False))
        rotary_dim = d.get("rotary_dim") or head_dim
        chunk = d.get("block_size") or 256
        if "lightning" in layer_types and not math.log2(n_head).is_integer():
            problems.append(f"num_attention_heads={n_head} is not a power of two: the released lightning slopes "
                            "(ALiBi interleaving) differ from ours for such head counts")
    else:
        factors = {name: float(get(name)) for name in FACTORS}
        post_norm = True
        chunk = get("block_size")
        partial = rope.get("partial_rotary_factor")
        if partial not in (None, 1, 1.0):
            log.warning("partial_rotary_factor=%s is ignored by transformers' MiniMax, which rotates the whole head; "
                        "following transformers (rotary_dim = head_dim)", partial)
    if problems:
        raise ValueError("cannot import this MiniMax config:\n  - " + "\n  - ".join(problems))

    not_carried = [f"{k}={d[k]}" for k in ("attention_dropout", "router_jitter_noise") if d.get(k)]
    if not_carried:
        log.warning("training-only settings not carried over (no exact counterpart): %s", ", ".join(not_carried))
    if remote and "lightning" in layer_types and n_layer > 1:
        gap = 1e-5 / (n_layer - 1)
        log.info("released lightning slope factor 1 - l/(L-1) + 1e-5 vs ours 1 - l/(L-1+1e-5) + 1e-5: at most "
                 "%.1e apart (last layer)", gap)

    return MiniMaxConfig(
        vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"), n_layer=n_layer, n_head=n_head,
        n_kv_head=n_kv_head, n_embd=hidden, head_dim=head_dim, intermediate_size=get("intermediate_size"),
        use_hybrid_attn="lightning" in layer_types, layer_types=layer_types, lightning_chunk_size=chunk,
        lightning_use_rope=False, pos_embedding="none", rope_theta=float(rope_theta), rotary_dim=rotary_dim,
        adaptive_xpos=False, norm_eps=float(get("rms_norm_eps")), use_post_layernorm=post_norm, **factors,
        use_moe=True, num_experts=experts, moe_top_k=get("num_experts_per_tok"), moe_capacity_factor=None,
        moe_aux_loss_coef=float(get("router_aux_loss_coef")), moe_z_loss_coef=0.0, moe_diversity_loss_coef=0.0,
        moe_jitter_noise=0.0, moe_layer_scale=False, dropout=0.0,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(get("initializer_range")),
    )


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------
def hf_tensors(model) -> dict[str, torch.Tensor]:
    """transformers' parameter names -> tensors of `model` (views where possible; concatenations for the experts'
    gate_up_proj and for dense models). Tied lm_head is left out, as in transformers' named_parameters."""
    config = model.config
    H, Hkv, D = config.n_head, config.n_kv_head, config.head_dim
    out = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.norm1.weight
        out[p + "post_attention_layernorm.weight"] = block.norm2.weight
        attn = block.attn
        if block.layer_type == "lightning":
            for name in ("qkv_proj", "output_gate", "norm", "out_proj"):
                out[p + f"self_attn.{name}.weight"] = getattr(attn, name).weight
        else:
            q, k, v = attn.qkv_proj.weight.split((H * D, Hkv * D, Hkv * D), dim=0)
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
            out[p + "self_attn.v_proj.weight"], out[p + "self_attn.o_proj.weight"] = v, attn.o_proj.weight
        mlp = block.mlp
        if config.use_moe:
            out[p + "mlp.gate.weight"] = mlp.gate.weight
            out[p + "mlp.experts.gate_up_proj"] = torch.cat([mlp.w1, mlp.w3], dim=1)  # (E, 2I, C)
            out[p + "mlp.experts.down_proj"] = mlp.w2  # (E, C, I)
        else:
            out[p + "mlp.gate.weight"] = mlp.w1.weight.new_zeros(1, config.n_embd)
            out[p + "mlp.experts.gate_up_proj"] = torch.cat([mlp.w1.weight, mlp.w3.weight], dim=0)[None]
            out[p + "mlp.experts.down_proj"] = mlp.w2.weight[None]
    return out


def _check_routing_bias(model) -> None:
    """transformers' MiniMax selects experts by probability alone: a model whose aux-loss-free routing bias is zero
    everywhere exports exactly (the bias update rate only acts in training), one with a non-zero bias would select
    differently there, so it is refused."""
    biased = [i for i, block in enumerate(model.blocks)
              if getattr(block.mlp, "routing_bias", None) is not None and bool(block.mlp.routing_bias.ne(0).any())]
    if biased:
        largest = max(float(model.blocks[i].mlp.routing_bias.abs().max()) for i in biased)
        raise ValueError(f"cannot export to transformers' MiniMax: the MoE routing bias (moe_bias_update_rate) is "
                         f"non-zero in layers {biased} (largest |bias| {largest:.3g}); transformers selects experts "
                         "by router probability alone, so the exported model would route differently")


def to_hf(model, **hf_kwargs: Any):
    """A transformers MiniMaxForCausalLM with exactly our weights, in eval mode, on the model's device and dtype.
    `hf_kwargs` go to the config (e.g. attn_implementation="eager", eos_token_id=...)."""
    transformers = _transformers()
    hf_config = config_to_hf(model.config, **hf_kwargs)
    _check_routing_bias(model)
    p = model.wte.weight
    hf = transformers.MiniMaxForCausalLM(hf_config).to(device=p.device, dtype=p.dtype)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        tensors = hf_tensors(model)
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or extra:  # internal invariant: the name tables above and transformers' model must agree
            raise RuntimeError(f"weight name mismatch with transformers {transformers.__version__}: transformers has "
                               f"{missing[:10]} that we do not produce, we produce {extra[:10]} that it lacks")
        for name, tensor in tensors.items():
            copy_checked(params[name], tensor, name)
    return hf.eval()


def save_hf(model, directory: str | os.PathLike, **hf_kwargs: Any) -> None:
    """`to_hf(model).save_pretrained(directory)`, written to a temporary directory and renamed into place."""
    hf = to_hf(model, **hf_kwargs)
    with atomic_directory(directory) as tmp:
        hf.save_pretrained(tmp)


class _DictSource:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        pass


def from_hf(model_or_dir, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """Our model, in eval mode, from a transformers MiniMaxForCausalLM or from a directory holding config.json
    (transformers' or the released remote-code one) and model.safetensors or shards with
    model.safetensors.index.json. Both transformers' weight names and the remote-code ones
    (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w2/w3`) are read; from a directory one tensor at a
    time, straight into our parameters. Every checkpoint tensor must be used (derived buffers excepted)."""
    from minimax_gpt.models.model import EnhancedMiniMaxGPT

    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a Hugging Face MiniMax model folder")
        try:
            config = config_from_hf(read_json(config_path))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{config_path}: {e}") from None
        source = SafetensorsReader(directory)
    else:
        if not hasattr(model_or_dir, "config") or not hasattr(model_or_dir, "state_dict"):
            raise TypeError(f"expected a MiniMaxForCausalLM or a directory, got {type(model_or_dir).__name__}")
        config = config_from_hf(model_or_dir.config)
        source = _DictSource(model_or_dir.state_dict())
    model = EnhancedMiniMaxGPT(config)
    if dtype is not None:
        model.to(dtype)
    try:
        _load_hf_weights(model, source)
    finally:
        source.close()
    if device is not None:
        model.to(device)
    return model.eval()


def _load_hf_weights(model, source) -> None:
    config = model.config
    H, Hkv, D, I = config.n_head, config.n_kv_head, config.head_dim, config.intermediate_size
    available = source.keys()
    used, missing = set(), []

    def copy(dst: torch.Tensor, key: str, rows: slice | None = None) -> None:
        if key not in available:
            missing.append(key)
            return
        used.add(key)
        t = source.get(key)
        copy_checked(dst if rows is None else dst[rows], t, key)

    copy(model.wte.weight, "model.embed_tokens.weight")
    copy(model.ln_f.weight, "model.norm.weight")
    if config.tie_word_embeddings:
        used.add("lm_head.weight")  # some checkpoints store the tied copy too
    else:
        copy(model.lm_head.weight, "lm_head.weight")
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        copy(block.norm1.weight, p + "input_layernorm.weight")
        copy(block.norm2.weight, p + "post_attention_layernorm.weight")
        attn = block.attn
        if block.layer_type == "lightning":
            for name in ("qkv_proj", "output_gate", "norm", "out_proj"):
                copy(getattr(attn, name).weight, p + f"self_attn.{name}.weight")
        else:
            w = attn.qkv_proj.weight  # rows [q (H*D) | k (Hkv*D) | v (Hkv*D)]
            copy(w, p + "self_attn.q_proj.weight", slice(0, H * D))
            copy(w, p + "self_attn.k_proj.weight", slice(H * D, (H + Hkv) * D))
            copy(w, p + "self_attn.v_proj.weight", slice((H + Hkv) * D, (H + 2 * Hkv) * D))
            copy(attn.o_proj.weight, p + "self_attn.o_proj.weight")
        mlp = block.mlp
        moe = p + ("mlp" if p + "mlp.gate.weight" in available else "block_sparse_moe")
        copy(mlp.gate.weight, moe + ".gate.weight")
        if moe + ".experts.gate_up_proj" in available:  # transformers: stacked (E, 2I, C) = [w1; w3] per expert
            key = moe + ".experts.gate_up_proj"
            used.add(key)
            gate_up = source.get(key)
            if tuple(gate_up.shape) != (config.num_experts, 2 * I, config.n_embd):
                raise ValueError(f"{key}: the checkpoint has shape {tuple(gate_up.shape)} but the config gives "
                                 f"{(config.num_experts, 2 * I, config.n_embd)}")
            copy_checked(mlp.w1, gate_up[:, :I], key + "[:, :I]")
            copy_checked(mlp.w3, gate_up[:, I:], key + "[:, I:]")
            del gate_up
            copy(mlp.w2, moe + ".experts.down_proj")
        else:  # remote code / Mixtral layout: one Linear per expert
            for e in range(config.num_experts):
                for name in ("w1", "w2", "w3"):
                    copy(getattr(mlp, name)[e], moe + f".experts.{e}.{name}.weight")
    unexpected = sorted(k for k in available - used if not DERIVED_KEYS.search(k))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config: missing {_listing(missing)}; "
                         f"unexpected {_listing(unexpected)}")


def _listing(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------------------------------------------
# the `convert` subcommand (wired into the CLI by minimax_gpt.__main__)
# ---------------------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_convert_parser(subparsers):
    """`minimax-gpt convert --from-hf DIR OUT` / `--to-hf DIR OUT` [--dtype ...]."""
    p = subparsers.add_parser(
        "convert", help="convert between Hugging Face MiniMax checkpoints and ours",
        description="--from-hf DIR: a transformers or released remote-code MiniMax directory -> our format in OUT. "
                    "--to-hf DIR: a directory written by save_pretrained -> a transformers MiniMax directory in OUT.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face MiniMax checkpoint directory to import")
    src.add_argument("--to-hf", metavar="DIR", help="our checkpoint directory (save_pretrained) to export")
    p.add_argument("out", metavar="OUT", help="output directory: new or empty, or replaced as a whole (atomically) "
                                               "with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it is a folder that is not empty")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep float32)")
    return p


def run_convert(args) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{args.out} exists and is not a folder; name a new output folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} is not empty; pass --overwrite to replace it, or name a new output folder")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.from_hf:
        model = from_hf(args.from_hf, dtype=dtype)
        save_pretrained(model, args.out)
    else:
        model = from_pretrained(args.to_hf, dtype=dtype)
        save_hf(model, args.out)
    print(f"wrote {args.out} ({model.num_params():,} parameters)")
