"""Tiny configurations shared by the tests."""

from minimax_gpt import MiniMaxConfig

BASE = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=61, block_size=48, lightning_chunk_size=8)

# name -> overrides; together they cover every mixer, norm placement and positional choice
LAYOUTS = {
    "dense_softmax": dict(use_hybrid_attn=False),
    "hybrid": dict(n_layer=3, layer_types=["lightning", "softmax", "lightning"]),
    "gqa_partial_rope": dict(use_hybrid_attn=False, n_kv_head=2, rotary_dim=4),
    "post_norm_deepnorm": dict(layer_types=["lightning", "softmax"], use_post_layernorm=True,
                               linear_attn_alpha_factor=1.5, full_attn_alpha_factor=1.2, mlp_alpha_factor=1.1,
                               mlp_beta_factor=0.9),
    "xpos": dict(use_hybrid_attn=False, adaptive_xpos=True, xpos_scale_base=16.0, block_size=8),
    "learned_pos": dict(layer_types=["softmax", "lightning"], pos_embedding="learned", rotary_dim=0),
    "lightning_rope": dict(layer_types=["lightning", "lightning"], lightning_use_rope=True),
    "short_conv": dict(n_layer=3, layer_types=["lightning", "softmax", "lightning"], short_conv=4),
    "sparse": dict(layer_types=["sparse", "lightning"], sparse_block_size=4, sparse_top_k=1, n_kv_head=2),
    "moe": dict(layer_types=["lightning", "softmax"], use_moe=True, num_experts=4, moe_top_k=2,
                moe_capacity_factor=1.0, moe_layer_scale=True, moe_diversity_loss_coef=0.01, intermediate_size=48),
}


def tiny_config(name: str = "hybrid", **overrides) -> MiniMaxConfig:
    return MiniMaxConfig(**{**BASE, **LAYOUTS[name], **overrides})
