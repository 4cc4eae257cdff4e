"""The static decoding step (models/static_decode.py) against the eager step and the full forward, the gathered MoE
path against the one-token path, and how `generate` chooses and checks `compile_step`."""

import inspect

import pytest
import torch

from helpers import LAYOUTS, tiny_config
from minimax_gpt import EnhancedMiniMaxGPT, generation
from minimax_gpt.models import static_decode

STATIC_LAYOUTS = [name for name in LAYOUTS if name != "sparse"]
MOE_VARIANTS = {
    "top_k": {},
    "top_p": dict(moe_top_p=0.5, moe_top_k=3),
    "routing_bias": dict(moe_bias_update_rate=0.01),
    "top_1": dict(moe_top_k=1, moe_layer_scale=False),
}


def make(name, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config(name, **kw)).to(dtype).eval()
    if model.config.moe_bias_update_rate > 0:
        for block in model.blocks:  # a bias that changes the choice of experts
            block.mlp.routing_bias.copy_(torch.randn_like(block.mlp.routing_bias))
    return model


def decode_both(model, ids, n_steps):
    """(eager logits, static logits), each (n_steps, B, V), feeding both the eager step's greedy tokens."""
    B, T0 = ids.shape
    eager_cache = model.new_cache(B, capacity=T0 + n_steps)
    prefill = model.new_cache(B, capacity=static_decode.static_capacity(T0 + n_steps))
    eager, static = [], []
    with torch.no_grad():
        logits = model(ids, cache=eager_cache, logits_to_keep=1).logits[:, -1]
        model(ids, cache=prefill, logits_to_keep=1)
        cache = static_decode.StaticCache(prefill)
        for _ in range(n_steps):
            tok = logits.argmax(-1, keepdim=True)
            logits = model(tok, cache=eager_cache, logits_to_keep=1).logits[:, -1]
            eager.append(logits)
            static.append(static_decode.decode_step(model, tok, cache))
    return torch.stack(eager), torch.stack(static)


@pytest.mark.parametrize("name", STATIC_LAYOUTS)
def test_static_step_equals_eager_step_fp64(name):
    model = make(name)
    ids = torch.randint(0, 61, (2, 5))
    eager, static = decode_both(model, ids, 7)
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_static_step_with_moe_routing_variants(variant):
    model = make("moe", **MOE_VARIANTS[variant])
    eager, static = decode_both(model, torch.randint(0, 61, (3, 4)), 6)
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-10)


def test_static_step_equals_full_forward_fp64():
    model = make("short_conv")
    ids = torch.randint(0, 61, (2, 9))
    prefill = model.new_cache(2, capacity=static_decode.static_capacity(9))
    with torch.no_grad():
        model(ids[:, :4], cache=prefill, logits_to_keep=1)
        cache = static_decode.StaticCache(prefill)
        steps = [static_decode.decode_step(model, ids[:, t:t + 1], cache) for t in range(4, 9)]
        full = model(ids).logits[:, 4:]  # (B, 5, V)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-10)
    assert int(cache.slot) == 9 and cache.next_position.tolist() == [9, 9]


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_gathered_experts_equal_the_one_token_path(variant, monkeypatch):
    """_forward_few under compilation (the gathered experts: no host sync) against _forward_few in eager, which runs
    each chosen expert alone."""
    model = make("moe", **MOE_VARIANTS[variant])
    mlp = model.blocks[0].mlp
    for N in (1, 3):
        x = torch.randn(N, 1, 32, dtype=torch.float64)
        xf = x.reshape(N, 32)
        routed = mlp.route(xf)
        with torch.no_grad():
            want, want_stats = mlp._forward_few(xf, None, *routed, N, 1)
            with monkeypatch.context() as m:
                m.setattr(torch.compiler, "is_compiling", lambda: True)
                got, got_stats = mlp._forward_few(xf, None, *routed, N, 1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for field in ("expert_counts", "prob_sum", "z_sum", "num_tokens"):
            torch.testing.assert_close(getattr(got_stats, field), getattr(want_stats, field), rtol=0, atol=1e-12)


def test_compiled_generation_equals_eager():
    """One real torch.compile of the step (seconds): greedy tokens equal, logits to fp32 rounding."""
    model = make("moe", dtype=torch.float32, n_kv_head=2, short_conv=4, moe_capacity_factor=None)
    ids = torch.randint(0, 61, (2, 6))
    eager = model.generate(ids, 10, temperature=0, compile_step=False)
    assert not static_decode.is_warm(model)
    compiled = model.generate(ids, 10, temperature=0, compile_step=True)
    assert static_decode.is_warm(model)
    assert torch.equal(compiled, eager)
    prefill = model.new_cache(2, capacity=static_decode.static_capacity(16))
    with torch.no_grad():
        model(ids, cache=prefill, logits_to_keep=1)
        cache, step = static_decode.StaticCache(prefill), static_decode.compiled_step(model)
        eager_logits, _ = decode_both(model, ids, 10)
        got = torch.stack([step(model, eager[:, t:t + 1], cache) for t in range(6, 16)])
    torch.testing.assert_close(got, eager_logits, rtol=0, atol=1e-5)
    # warm: None (auto) now takes the compiled step, and gives the same tokens
    assert generation.use_compiled_step(model, None, None, True, 10)
    assert torch.equal(model.generate(ids, 10, temperature=0), eager)


def test_compile_step_argument_is_checked():
    model = make("hybrid", dtype=torch.float32)
    ids = torch.randint(0, 61, (1, 4))
    with pytest.raises(TypeError, match="compile_step must be True, False or None"):
        model.generate(ids, 3, compile_step="yes")
    with pytest.raises(ValueError, match="compile_step=True cannot be used: use_cache=False"):
        model.generate(ids, 3, compile_step=True, use_cache=False)
    with pytest.raises(ValueError, match="compile_step=True cannot be used: an attention mask"):
        model.generate(ids, 3, compile_step=True, attention_mask=torch.ones(1, 4))
    sparse = make("sparse", dtype=torch.float32)
    with pytest.raises(ValueError, match="compile_step=True cannot be used: sparse layers"):
        sparse.generate(ids, 3, compile_step=True)
    with pytest.raises(ValueError, match="sparse layers"):
        static_decode.StaticCache(sparse.new_cache(1))


def test_auto_chooses_by_length_and_falls_back_when_compiling_fails(monkeypatch):
    model = make("hybrid", dtype=torch.float32)
    assert not generation.use_compiled_step(model, None, None, True, generation.COMPILE_PAYS_AFTER - 1)
    assert generation.use_compiled_step(model, None, None, True, generation.COMPILE_PAYS_AFTER)
    assert not generation.use_compiled_step(make("sparse"), None, None, True, generation.COMPILE_PAYS_AFTER)
    assert not generation.use_compiled_step(model, False, None, True, generation.COMPILE_PAYS_AFTER)
    moe = make("moe", dtype=torch.float32)  # 4 experts, top-2: gathering pays up to 8 rows per step
    assert generation.use_compiled_step(moe, None, None, True, generation.COMPILE_PAYS_AFTER, batch_size=8)
    assert not generation.use_compiled_step(moe, None, None, True, generation.COMPILE_PAYS_AFTER, batch_size=9)
    assert generation.use_compiled_step(moe, True, None, True, 1, batch_size=9)  # asked for: taken

    def broken(model):
        def step(*args):
            raise RuntimeError("no C++ compiler")
        return step

    monkeypatch.setattr(static_decode, "compiled_step", broken)
    monkeypatch.setattr(generation, "COMPILE_PAYS_AFTER", 1)
    ids = torch.randint(0, 61, (2, 4))
    want = model.generate(ids, 6, temperature=0, compile_step=False)
    assert torch.equal(model.generate(ids, 6, temperature=0), want)  # auto: logged, then the eager step
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        model.generate(ids, 6, temperature=0, compile_step=True)


def test_each_model_compiles_its_own_code_object():
    """torch.compile counts recompiles (limit 8, then a hard failure under fullgraph) per code object: models of many
    shapes in one process must not share one."""
    a, b = make("hybrid", dtype=torch.float32), make("moe", dtype=torch.float32)
    step_a, step_b = static_decode.compiled_step(a), static_decode.compiled_step(b)
    assert static_decode.compiled_step(a) is step_a
    code = [inspect.unwrap(s).__code__ for s in (step_a, step_b)]
    assert code[0] is not code[1] and code[0] is not static_decode.decode_step.__code__
    assert code[0].co_code == static_decode.decode_step.__code__.co_code


def test_one_new_token_compiles_nothing():
    """The first new token comes from the prefill: a generation of one token never needs the compiled step."""
    model = make("hybrid", dtype=torch.float32)
    ids = torch.randint(0, 61, (1, 4))
    assert torch.equal(model.generate(ids, 1, temperature=0, compile_step=True),
                       model.generate(ids, 1, temperature=0, compile_step=False))
    assert not static_decode.is_warm(model)
