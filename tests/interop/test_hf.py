"""Interop with transformers' MiniMax through the real converter: tiny configs, CPU, float32.

Random weights with a larger init std than training uses (0.3 instead of 0.02) so that attention is far from uniform
and the routers' choices are decisive: a wrong position, head order or expert layout changes the logits by O(1).
"""

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (extra [hf])")
pytest.importorskip("transformers.models.minimax", reason="this transformers has no MiniMax model")

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig  # noqa: E402
from minimax_gpt.interop.hf import config_from_hf, config_to_hf, from_hf, save_hf, to_hf  # noqa: E402

ALPHA = 3.5565588200778455  # MiniMax-Text-01's residual alpha
ATOL = 1e-4


def hf_config(**overrides):
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
              max_position_embeddings=128, block_size=16, initializer_range=0.3,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
              linear_attn_alpha_factor=ALPHA, full_attn_alpha_factor=ALPHA, mlp_alpha_factor=ALPHA,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=None, bos_token_id=None,
              attn_implementation="eager")
    kw.update(overrides)
    return transformers.MiniMaxConfig(**kw)


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.MiniMaxForCausalLM(hf_config(**overrides)).eval()


def our_config(**overrides):
    """Post-norm hybrid, GQA, MoE, non-default alpha/beta and a non-power-of-two head count (6 heads)."""
    kw = dict(vocab_size=89, block_size=128, n_layer=4, n_head=6, n_kv_head=2, n_embd=40, head_dim=8,
              intermediate_size=24, layer_types=["lightning", "softmax", "lightning", "softmax"],
              lightning_chunk_size=16, use_post_layernorm=True, linear_attn_alpha_factor=1.7,
              linear_attn_beta_factor=0.8, full_attn_alpha_factor=2.1, full_attn_beta_factor=1.3,
              mlp_alpha_factor=1.4, mlp_beta_factor=0.9, use_moe=True, num_experts=4, moe_top_k=2,
              moe_z_loss_coef=0.0, tie_word_embeddings=False, init_std=0.3, rope_theta=5000.0)
    kw.update(overrides)
    return MiniMaxConfig(**kw)


def our_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return EnhancedMiniMaxGPT(our_config(**overrides)).eval()


def ids_for(vocab, B=2, T=37, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- configs --------------------------------------------------------------------------------------------------------
def test_config_round_trip_ours_hf_ours():
    for cfg in (our_config(), our_config(tie_word_embeddings=True, use_hybrid_attn=False, layer_types=["softmax"] * 4)):
        assert config_from_hf(config_to_hf(cfg)) == cfg


def test_config_round_trip_hf_ours_hf():
    h = hf_config(tie_word_embeddings=True, router_aux_loss_coef=0.02, linear_attn_beta_factor=0.5)
    back = config_to_hf(config_from_hf(h)).to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "layer_types",
                "block_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                "router_aux_loss_coef", "initializer_range", "linear_attn_alpha_factor", "linear_attn_beta_factor",
                "full_attn_alpha_factor", "full_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor"):
        assert back[key] == h.to_dict()[key], key


def test_config_fields_map_to_their_counterparts():
    c = config_from_hf(hf_config())
    assert c.layer_types == ["lightning", "softmax", "lightning", "softmax"]
    assert c.lightning_chunk_size == 16 and c.block_size == 128  # HF block_size is the lightning chunk
    assert (c.n_head, c.n_kv_head, c.head_dim, c.rotary_dim) == (4, 2, 8, 8)
    assert (c.num_experts, c.moe_top_k, c.moe_z_loss_coef) == (4, 2, 0.0)
    assert c.use_post_layernorm and c.mlp_alpha_factor == ALPHA and c.rope_theta == 10000.0


def test_unexportable_config_lists_every_offending_field():
    cfg = MiniMaxConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, layer_types=["lightning", "softmax"],
                        use_moe=True, adaptive_xpos=True, moe_capacity_factor=1.25, moe_layer_scale=True,
                        lightning_use_rope=True, rotary_dim=4)
    with pytest.raises(ValueError) as e:
        config_to_hf(cfg)
    msg = str(e.value)
    for field in ("use_post_layernorm", "adaptive_xpos", "moe_capacity_factor", "moe_layer_scale",
                  "lightning_use_rope", "rotary_dim"):
        assert field in msg, field
    with pytest.raises(ValueError, match="pos_embedding"):
        config_to_hf(our_config(pos_embedding="learned"))
    with pytest.raises(ValueError, match="adaptive_xpos"):
        to_hf(our_model(adaptive_xpos=True))


def test_unimportable_config_lists_every_offending_field():
    d = hf_config().to_dict()
    d.update(hidden_act="gelu", sliding_window=8, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 1e4})
    with pytest.raises(ValueError) as e:
        config_from_hf(d)
    for word in ("hidden_act", "sliding_window", "rope type"):
        assert word in str(e.value), word


def test_training_only_settings_are_reported_not_carried(caplog):
    with caplog.at_level(logging.WARNING, logger="minimax_gpt.interop.hf"):
        config_to_hf(our_config(dropout=0.1, moe_z_loss_coef=0.001))
    assert "dropout=0.1" in caplog.text and "moe_z_loss_coef" in caplog.text


# --- weights: transformers -> ours --------------------------------------------------------------------------------
def test_from_hf_logits_aux_loss_and_state_dict_round_trip():
    hf = hf_model()
    ours = from_hf(hf)
    ids = ids_for(97)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        out = ours(ids)
    assert max_diff(out.logits, ref.logits) < ATOL
    assert ref.logits.std() > 0.5  # the comparison is not between near-constant logits
    torch.testing.assert_close(out.aux_losses["load_balance"], ref.aux_loss, rtol=0, atol=1e-5)
    back = to_hf(ours, attn_implementation="eager").state_dict()
    sd = hf.state_dict()
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_imported_model_loss_equals_transformers_loss():
    hf = hf_model()
    ours = from_hf(hf)
    ids = ids_for(97, T=20)
    with torch.no_grad():
        ref = hf(ids, labels=ids, output_router_logits=True).loss
        # transformers shifts labels inside; ours takes next-token targets
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        loss = ours(ids, targets=targets).loss
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


def test_incremental_decoding_of_imported_model_equals_transformers_full_forward():
    hf = hf_model()
    ours = from_hf(hf)
    ids = ids_for(97, T=30)
    with torch.no_grad():
        ref = hf(ids).logits
        cache = ours.new_cache(2, capacity=30)
        steps = [ours(ids[:, :19], cache=cache).logits]  # prefill crosses a lightning chunk boundary
        steps += [ours(ids[:, t:t + 1], cache=cache).logits for t in range(19, 30)]
    assert max_diff(torch.cat(steps, dim=1), ref) < ATOL


def test_transformers_decode_needs_position_ids_when_layer0_is_lightning():
    """Documents deviation 3: transformers' cache length comes from layer 0, which is 0 for a lightning layer."""
    hf = hf_model()
    ids = ids_for(97, B=1, T=12)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
        out = hf(ids[:, :11], use_cache=True)
        assert out.cache.get_seq_length() == 0
        with_pos = hf(ids[:, 11:], cache=out.cache, use_cache=True, position_ids=torch.tensor([[11]])).logits[:, -1]
    assert max_diff(with_pos, ref) < ATOL


def test_greedy_generation_matches_transformers():
    hf = hf_model()
    ours = from_hf(hf)
    prompt = ids_for(97, B=1, T=6)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(prompt))
    got = ours.generate(prompt, max_new_tokens=32, temperature=0.0)
    assert ref.shape == (1, 38)
    assert torch.equal(got, ref)


def remote_code_checkpoint(hf, directory, shards=3):
    """Write `hf` in the released remote-code layout: attn_type_list config, block_sparse_moe per-expert weights,
    sharded safetensors with an index."""
    from safetensors.torch import save_file

    c = hf.config
    config = {
        "architectures": ["MiniMaxText01ForCausalLM"], "model_type": "MiniMaxText01",
        "attn_type_list": [0 if t == "linear_attention" else 1 for t in c.layer_types],
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "head_dim": c.head_dim,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "num_local_experts": c.num_local_experts,
        "num_experts_per_tok": c.num_experts_per_tok, "vocab_size": c.vocab_size, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"], "rotary_dim": c.head_dim, "postnorm": True,
        "layernorm_linear_attention_alpha": c.linear_attn_alpha_factor, "layernorm_linear_attention_beta": 1,
        "layernorm_full_attention_alpha": c.full_attn_alpha_factor, "layernorm_full_attention_beta": 1,
        "layernorm_mlp_alpha": c.mlp_alpha_factor, "layernorm_mlp_beta": 1, "shared_intermediate_size": 0,
        "tie_word_embeddings": False, "router_aux_loss_coef": c.router_aux_loss_coef,
        "initializer_range": c.initializer_range,
    }
    tensors = {}
    for k, v in hf.state_dict().items():
        if ".mlp.experts.gate_up_proj" in k:
            p = k.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(v.shape[0]):
                w1, w3 = v[e].chunk(2, dim=0)
                tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"] = w1.clone(), w3.clone()
        elif ".mlp.experts.down_proj" in k:
            p = k.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(v.shape[0]):
                tensors[f"{p}.{e}.w2.weight"] = v[e].clone()
        elif "slope_rate" in k or "_decay" in k:
            continue  # the remote code computes these
        else:
            tensors[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v.clone()
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return config


def test_sharded_remote_code_checkpoint_loads_and_equals(tmp_path):
    hf = hf_model(tie_word_embeddings=False)
    config = remote_code_checkpoint(hf, tmp_path)
    ours = from_hf(tmp_path)
    # the remote code's lightning block is a constant 256 (it changes the blocking, not the numbers)
    assert ours.config == config_from_hf(hf.config).replace(lightning_chunk_size=256)
    ids = ids_for(97)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < ATOL
    # the released model's partial RoPE is followed on import, and then refused on export
    assert config_from_hf({**config, "rotary_dim": 4}).rotary_dim == 4
    with pytest.raises(ValueError, match="rotary_dim"):
        config_to_hf(config_from_hf({**config, "rotary_dim": 4}))
    # released pre-norm models import as pre-norm
    assert not config_from_hf({**config, "postnorm": False}).use_post_layernorm
    # non-power-of-two heads: the released slopes differ, so import refuses
    with pytest.raises(ValueError, match="power of two"):
        config_from_hf({**config, "num_attention_heads": 6})


def test_missing_and_unexpected_checkpoint_tensors_are_listed(tmp_path):
    hf = hf_model()
    remote_code_checkpoint(hf, tmp_path, shards=1)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing model\.layers\.2\.block_sparse_moe\.experts\.3\.w2\.weight"):
        from_hf(tmp_path)


def test_transformers_save_pretrained_directory_loads(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    ids = ids_for(97)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < ATOL


# --- weights: ours -> transformers --------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_logits_equal_ours(tied):
    ours = our_model(tie_word_embeddings=tied)
    hf = to_hf(ours, attn_implementation="eager")
    ids = ids_for(89)
    with torch.no_grad():
        out, ref = ours(ids), hf(ids, output_router_logits=True)
    assert max_diff(out.logits, ref.logits) < ATOL
    assert out.logits.std() > 0.5
    torch.testing.assert_close(out.aux_losses["load_balance"], ref.aux_loss, rtol=0, atol=1e-5)


def test_dense_model_exports_as_one_expert_moe():
    ours = our_model(use_moe=False)
    hf = to_hf(ours, attn_implementation="sdpa")
    assert hf.config.num_local_experts == 1 and hf.config.num_experts_per_tok == 1
    ids = ids_for(89)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < ATOL
        back = from_hf(hf)
        assert back.config.use_moe and back.config.num_experts == 1
        assert max_diff(back(ids).logits, hf(ids).logits) < ATOL


def test_trained_model_exports_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    ours = EnhancedMiniMaxGPT(our_config(init_std=0.02)).train()
    opt = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    ids = ids_for(89, B=4, T=32)
    for _ in range(5):
        loss = ours(ids, targets=torch.roll(ids, -1, dims=1)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ours.eval()
    save_hf(ours, tmp_path / "hf")
    hf = transformers.MiniMaxForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < ATOL


def test_convert_cli_round_trip(tmp_path):
    from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
    from minimax_gpt.__main__ import main

    torch.manual_seed(0)
    config = MiniMaxConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, layer_types=["lightning", "softmax"],
                           use_post_layernorm=True, use_moe=True, num_experts=2, moe_top_k=1, intermediate_size=48)
    model = EnhancedMiniMaxGPT(config).eval()
    model.save_pretrained(tmp_path / "ours")
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = EnhancedMiniMaxGPT.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_sparse_layers_are_refused_by_name():
    cfg = MiniMaxConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, layer_types=["lightning", "sparse"],
                        use_post_layernorm=True, sparse_block_size=8)
    with pytest.raises(ValueError, match=r"'sparse' layers \[1\]: transformers' MiniMax has no block-sparse"):
        config_to_hf(cfg)
    with pytest.raises(ValueError, match="block-sparse"):
        to_hf(EnhancedMiniMaxGPT(cfg))


def test_short_conv_is_refused_by_name():
    cfg = MiniMaxConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, layer_types=["lightning", "softmax"],
                        use_post_layernorm=True, short_conv=4)
    with pytest.raises(ValueError, match=r"short_conv=4: transformers' MiniMax has no convolution"):
        config_to_hf(cfg)
    with pytest.raises(ValueError, match="short_conv=4"):
        to_hf(EnhancedMiniMaxGPT(cfg))
