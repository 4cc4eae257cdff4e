"""Our checkpoint format: exact round trips, tied weights stored once, atomic writes, strict loading."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import tiny_config
from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.interop.pretrained import SafetensorsReader, from_pretrained, save_pretrained


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    return EnhancedMiniMaxGPT(tiny_config(name, **kw)).eval()


@pytest.mark.parametrize("name,kw", [
    ("hybrid", {}),
    ("post_norm_deepnorm", dict(use_moe=True, num_experts=3, moe_top_k=2, moe_layer_scale=True)),
    ("xpos", dict(tie_word_embeddings=False)),
    ("learned_pos", {}),
])
def test_round_trip_is_exact(tmp_path, name, kw):
    model = make(name, **kw)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = EnhancedMiniMaxGPT.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_tied_embedding_is_stored_once_and_tied_again(tmp_path):
    model = make("hybrid", tie_word_embeddings=True)
    save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "wte.weight" in f.keys() and "lm_head.weight" not in f.keys()
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.wte.weight


def test_save_replaces_an_existing_checkpoint_atomically(tmp_path):
    out = tmp_path / "ckpt"
    make("hybrid", seed=0).save_pretrained(out)
    second = make("hybrid", seed=1)
    second.save_pretrained(out)
    assert torch.equal(from_pretrained(out).wte.weight, second.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directories left behind

    class Boom(RuntimeError):
        pass

    broken = make("hybrid", seed=2)
    broken.state_dict = lambda: (_ for _ in ()).throw(Boom())  # fails while writing
    with pytest.raises(Boom):
        save_pretrained(broken, out)
    assert torch.equal(from_pretrained(out).wte.weight, second.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_loading_is_strict(tmp_path):
    model = make("hybrid")
    save_pretrained(model, tmp_path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del tensors["blocks.0.norm1.weight"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing blocks\.0\.norm1\.weight; unexpected extra\.weight"):
        from_pretrained(tmp_path)


def test_wrong_shape_is_an_error_not_a_broadcast(tmp_path):
    model = make("hybrid")
    save_pretrained(model, tmp_path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors["ln_f.weight"] = torch.ones(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"ln_f\.weight: the checkpoint has shape \(1,\)"):
        from_pretrained(tmp_path)


def test_hugging_face_directory_points_to_from_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minimax", "hidden_size": 8}))
    with pytest.raises(ValueError, match="from_hf"):
        from_pretrained(tmp_path)


def test_dtype_and_sharded_reader(tmp_path):
    model = make("hybrid")
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.wte.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.wte.weight, model.wte.weight.bfloat16())
    # a sharded directory reads the same tensors
    shard = tmp_path / "sharded"
    shard.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(sd)
    save_file({n: sd[n] for n in names[::2]}, str(shard / "a.safetensors"))
    save_file({n: sd[n] for n in names[1::2]}, str(shard / "b.safetensors"))
    weight_map = {n: ("a.safetensors" if i % 2 == 0 else "b.safetensors") for i, n in enumerate(names)}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with SafetensorsReader(shard) as reader:
        assert reader.keys() == set(names)
        assert all(torch.equal(reader.get(n), sd[n]) for n in names)
