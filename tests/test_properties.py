"""Property tests (hypothesis, derandomized so CI is deterministic): random valid configs - layer layouts, heads, GQA,
MoE settings, positions (learned, none, partial rotary, XPos), pre/post-norm - build, train a step with finite
loss and gradients, and decode through the cache to the logits of one full forward; random invalid configs raise
ValueError (TypeError for a wrong type) and nothing else; the same seed gives the same loss curve."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.config import LAYER_TYPES, POS_EMBEDDINGS
from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.training.trainer import train
from train_helpers import write_config

FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_configs(draw) -> MiniMaxConfig:
    n_layer = draw(st.integers(1, 3))
    layer_types = draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=n_layer, max_size=n_layer))
    n_kv_head = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    rotary_dim = draw(st.sampled_from(sorted({0, 2, head_dim})))  # none, partial, full
    num_experts = draw(st.integers(1, 4))
    factor = st.sampled_from([0.5, 1.0, 1.7])
    return MiniMaxConfig(
        vocab_size=draw(st.integers(5, 40)), block_size=16, n_layer=n_layer,
        n_head=n_kv_head * draw(st.sampled_from([1, 2, 3])), n_kv_head=n_kv_head, head_dim=head_dim,
        n_embd=draw(st.sampled_from([8, 12, 16])), intermediate_size=draw(st.sampled_from([8, 16])),
        use_hybrid_attn="lightning" in layer_types or draw(st.booleans()), layer_types=layer_types,
        use_flash_attn=draw(st.booleans()), lightning_chunk_size=draw(st.sampled_from([2, 4, 8])),
        lightning_use_rope=draw(st.booleans()), pos_embedding=draw(st.sampled_from(POS_EMBEDDINGS)),
        rotary_dim=rotary_dim, adaptive_xpos=rotary_dim > 0 and "sparse" not in layer_types and draw(st.booleans()),
        xpos_scale_base=16.0, sparse_block_size=draw(st.sampled_from([2, 3, 512])),
        sparse_top_k=draw(st.integers(1, 2)),
        use_post_layernorm=draw(st.booleans()), linear_attn_alpha_factor=draw(factor),
        full_attn_beta_factor=draw(factor), mlp_alpha_factor=draw(factor),
        use_moe=draw(st.booleans()), num_experts=num_experts, moe_top_k=draw(st.integers(1, num_experts)),
        moe_capacity_factor=draw(st.sampled_from([None, 1.0, 2.0])), moe_layer_scale=draw(st.booleans()),
        moe_top_p=draw(st.sampled_from([None, 0.5, 0.9])), moe_bias_update_rate=draw(st.sampled_from([0.0, 0.01])),
        moe_jitter_noise=draw(st.sampled_from([0.0, 0.1])), moe_diversity_loss_coef=draw(st.sampled_from([0.0, 0.01])),
        tie_word_embeddings=draw(st.booleans()), use_checkpoint=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.1])), init_std=draw(st.sampled_from([0.02, 0.1])),
    )


@FAST
@given(config=valid_configs(), data=st.data())
def test_valid_config_trains_and_decodes_like_a_full_forward(config, data):
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(config)
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 12))
    ids = torch.randint(0, config.vocab_size, (B, T))
    _, loss = model.train()(ids, targets=ids)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name

    model.eval()
    with torch.no_grad():
        full = model(ids).logits  # (B, T, V)
        prefill = data.draw(st.integers(1, T))
        cache = model.new_cache(B, capacity=2)  # too small on purpose: it has to grow
        parts = [model(ids[:, :prefill], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(prefill, T)]
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


# (field, bad value, exception): each alone makes a valid config invalid
INVALID = [
    ("vocab_size", 0, ValueError), ("block_size", -1, ValueError), ("n_layer", 0, ValueError),
    ("n_head", 0, ValueError), ("n_kv_head", 0, ValueError), ("n_embd", 0, ValueError), ("head_dim", 0, ValueError),
    ("intermediate_size", 0, ValueError), ("lightning_chunk_size", 0, ValueError), ("num_experts", 0, ValueError),
    ("moe_top_k", 0, ValueError), ("rotary_dim", 3, ValueError), ("rotary_dim", 64, ValueError),
    ("pos_embedding", "rope", ValueError), ("layer_types", ["softmax", "mamba"], ValueError),
    ("rope_theta", 0.0, ValueError), ("rope_theta", math.inf, ValueError), ("norm_eps", -1e-5, ValueError),
    ("norm_eps", math.nan, ValueError), ("init_std", 0.0, ValueError), ("xpos_scale_base", -1.0, ValueError),
    ("mlp_alpha_factor", math.nan, ValueError), ("full_attn_beta_factor", math.inf, ValueError),
    ("dropout", 1.0, ValueError), ("dropout", -0.1, ValueError), ("moe_jitter_noise", 1.0, ValueError),
    ("moe_aux_loss_coef", -1.0, ValueError), ("moe_capacity_factor", 0.0, ValueError),
    ("moe_capacity_factor", math.nan, ValueError), ("sparse_block_size", 0, ValueError),
    ("sparse_top_k", 0, ValueError), ("moe_top_p", 0.0, ValueError), ("moe_top_p", 1.5, ValueError),
    ("moe_bias_update_rate", -0.1, ValueError), ("moe_bias_update_rate", math.nan, ValueError),
    ("n_layer", 2.0, TypeError), ("n_head", "4", TypeError), ("use_moe", 1, TypeError), ("dropout", "0.1", TypeError),
    ("layer_types", "softmax", TypeError), ("tie_word_embeddings", None, TypeError), ("vocab_size", True, TypeError),
    ("rope_theta", [1.0], TypeError),
]


@FAST
@given(base=valid_configs(), case=st.sampled_from(INVALID))
def test_invalid_field_raises_value_or_type_error_naming_it(base, case):
    name, value, exc = case
    d = base.to_dict()
    d[name] = value
    with pytest.raises(exc, match=name):
        MiniMaxConfig.from_dict(d)


@FAST
@given(base=valid_configs(), n_head=st.integers(1, 6), n_kv_head=st.integers(1, 6), top_k=st.integers(1, 8),
       n_layer=st.integers(1, 4), which=st.sampled_from(["heads", "experts", "layers"]))
def test_inconsistent_fields_raise_value_error(base, n_head, n_kv_head, top_k, n_layer, which):
    """One pair of fields at a time: heads (n_head a multiple of n_kv_head), experts (moe_top_k <= num_experts),
    layers (len(layer_types) == n_layer)."""
    d = base.to_dict()
    change, consistent, field = {
        "heads": (dict(n_head=n_head, n_kv_head=n_kv_head), n_head % n_kv_head == 0, "n_kv_head"),
        "experts": (dict(use_moe=True, moe_top_k=top_k), top_k <= d["num_experts"], "moe_top_k"),
        "layers": (dict(n_layer=n_layer), n_layer == len(d["layer_types"]), "layer_types"),
    }[which]
    d.update(change)
    if consistent:
        MiniMaxConfig.from_dict(d)
    else:
        with pytest.raises(ValueError, match=field):
            MiniMaxConfig.from_dict(d)


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(allow_nan=True),
                      st.text(max_size=5), st.lists(st.sampled_from(["softmax", "lightning", "x", 1]), max_size=4))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(changes=st.dictionaries(st.sampled_from(sorted(MiniMaxConfig().to_dict())), ANY_VALUE, max_size=3))
def test_random_fields_give_a_config_or_value_type_error_and_nothing_else(changes):
    try:
        config = MiniMaxConfig(**{"n_layer": 2, "n_embd": 16, "n_head": 2, **changes})
    except (ValueError, TypeError):
        return
    assert MiniMaxConfig.from_json(config.to_json()) == config  # what is accepted also round-trips


def test_same_seed_same_loss_curve(tmp_path):
    """Two CPU runs of the same config and seed, with dropout and router jitter drawing random numbers, log the
    same loss at every step, and a different seed does not."""
    def losses(name, seed):
        out = tmp_path / name
        overrides = ["--model.dropout", "0.1", "--model.moe_jitter_noise", "0.05", "--train.seed", str(seed),
                     "--train.eval_interval", "0", "--train.sample_tokens", "0"]
        train(load_run_config(write_config(tmp_path, out, name=f"{name}.toml"), overrides))
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    a, b, c = losses("a", 1), losses("b", 1), losses("c", 2)
    assert len(a) == 6 and a == b
    assert a != c
