import json

import pytest

from minimax_gpt import MiniMaxConfig


def test_defaults_follow_minimax_layout():
    c = MiniMaxConfig(n_layer=16)
    assert c.layer_types == (["lightning"] * 7 + ["softmax"]) * 2
    assert c.head_dim == c.n_embd // c.n_head
    assert c.n_kv_head == c.n_head and c.rotary_dim == c.head_dim
    assert c.intermediate_size % 64 == 0 and c.intermediate_size >= 8 * c.n_embd / 3


def test_dense_and_explicit_layouts():
    assert MiniMaxConfig(n_layer=3, use_hybrid_attn=False).layer_types == ["softmax"] * 3
    assert MiniMaxConfig(n_layer=4, hybrid_period=2).layer_types == ["lightning", "softmax"] * 2
    lt = ["softmax", "lightning", "lightning"]
    assert MiniMaxConfig(n_layer=3, layer_types=lt).layer_types == lt


def test_json_round_trip(tmp_path):
    c = MiniMaxConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, use_moe=True, moe_capacity_factor=1.25,
                      adaptive_xpos=True, rotary_dim=8, pos_embedding="learned")
    assert MiniMaxConfig.from_json(c.to_json()) == c
    c.save(tmp_path / "config.json")
    assert MiniMaxConfig.load(tmp_path / "config.json") == c
    assert json.loads((tmp_path / "config.json").read_text())["layer_types"] == c.layer_types


def test_replace_rederives_derived_fields():
    c = MiniMaxConfig(n_layer=8, n_embd=64, n_head=4)
    d = c.replace(n_layer=2, n_embd=128)
    assert d.layer_types == ["lightning", "lightning"] and d.head_dim == 32
    explicit = MiniMaxConfig(n_layer=2, layer_types=["softmax", "lightning"])
    with pytest.raises(ValueError, match="layer_types"):
        explicit.replace(n_layer=3)  # an explicit layout is kept, and no longer fits


def test_unknown_keys_rejected():
    with pytest.raises(ValueError, match="bogus"):
        MiniMaxConfig.from_dict({"n_layer": 2, "bogus": 1})
    with pytest.raises(ValueError, match="nope"):
        MiniMaxConfig.from_json('{"nope": true}')


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=100, n_head=3), "n_embd"),
    (dict(n_head=8, n_kv_head=3), "n_kv_head"),
    (dict(use_moe=True, num_experts=2, moe_top_k=3), "moe_top_k"),
    (dict(n_layer=2, layer_types=["softmax", "mamba"]), "layer_types"),
    (dict(n_layer=3, layer_types=["softmax"] * 2), "layer_types"),
    (dict(use_hybrid_attn=False, n_layer=1, layer_types=["lightning"]), "use_hybrid_attn"),
    (dict(pos_embedding="sinusoidal"), "pos_embedding"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(n_embd=64, n_head=4, rotary_dim=32), "rotary_dim"),
    (dict(rotary_dim=0, adaptive_xpos=True), "adaptive_xpos"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=0), "block_size"),
    (dict(lightning_chunk_size=0), "lightning_chunk_size"),
    (dict(hybrid_period=0), "hybrid_period"),
    (dict(moe_capacity_factor=0.0), "moe_capacity_factor"),
    (dict(moe_aux_loss_coef=-1.0), "moe_aux_loss_coef"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(mlp_beta_factor=float("inf")), "mlp_beta_factor"),
    (dict(moe_jitter_noise=1.5), "moe_jitter_noise"),
    (dict(short_conv=1), "short_conv"),
    (dict(short_conv=-2), "short_conv"),
    (dict(use_hybrid_attn=False, short_conv=4), "short_conv"),  # no lightning layer to apply it to
])
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MiniMaxConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_layer=2.5), "n_layer"), (dict(use_moe="yes"), "use_moe"), (dict(n_head=True), "n_head"),
    (dict(layer_types="softmax"), "layer_types"),
])
def test_wrong_types_raise_type_error(kwargs, field):
    with pytest.raises(TypeError, match=field):
        MiniMaxConfig(**kwargs)
