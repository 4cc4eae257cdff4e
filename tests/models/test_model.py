import pytest
import torch

from helpers import LAYOUTS, tiny_config
from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig


def make(name="hybrid", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return EnhancedMiniMaxGPT(tiny_config(name, **kw)).to(dtype).eval()


def test_seed_api_shapes_and_loss():
    config = MiniMaxConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=16, dropout=0.1,
                           use_checkpoint=True)
    model = EnhancedMiniMaxGPT(config)
    ids = torch.randint(0, 50, (3, 16))
    logits, loss = model(ids, targets=ids)
    assert logits.shape == (3, 16, 50)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # a fresh model predicts close to uniform: loss near ln(V)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    logits, loss = model(ids)
    assert loss is None


@pytest.mark.parametrize("name", ["hybrid", "post_norm_deepnorm"])
def test_pre_and_post_norm_forward_and_loss(name):
    model = make(name)
    ids = torch.randint(0, 61, (2, 12))
    out = model(ids, targets=ids)
    ref = torch.nn.functional.cross_entropy(out.logits.view(-1, 61), ids.view(-1))
    torch.testing.assert_close(out.loss, ref)
    assert out.ce_loss is out.loss  # dense model: no auxiliary losses
    model.train()
    out.loss.backward() if out.loss.requires_grad else None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_post_norm_block_matches_formula():
    """MiniMax post-norm: h = norm(x); y = alpha * h + beta * mixer(h)."""
    model = make("post_norm_deepnorm")
    block = model.blocks[1]  # softmax layer
    x = torch.randn(2, 5, 32)
    from minimax_gpt.models.context import build_context

    ctx = build_context(torch.zeros(2, 5, dtype=torch.long), None, None)
    ctx.rope = model.rotary(ctx.positions)
    h = block.norm1(x)
    y = 1.2 * h + 1.0 * block.attn(h, ctx)
    h2 = block.norm2(y)
    expected = 1.1 * h2 + 0.9 * block.mlp(h2)[0]
    torch.testing.assert_close(block(x, ctx)[0], expected)


def test_weight_tying_shares_storage():
    model = make()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = make(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    n_tied = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 61 * 32


def test_init_weights_table():
    model = make(n_layer=2, layer_types=["softmax", "softmax"], init_std=0.02)
    torch.manual_seed(0)
    big = EnhancedMiniMaxGPT(tiny_config("dense_softmax", n_embd=256, n_head=4, vocab_size=4096))
    assert abs(big.wte.weight.std().item() - 0.02) < 1e-3
    out_std = 0.02 / (2 * 2) ** 0.5
    assert abs(big.blocks[0].attn.o_proj.weight.std().item() - out_std) < 1e-3
    assert abs(big.blocks[0].mlp.w2.weight.std().item() - out_std) < 1e-3
    assert abs(big.blocks[0].attn.qkv_proj.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(32))


@pytest.mark.parametrize("name", ["dense_softmax", "hybrid", "xpos", "moe"])
def test_gradient_checkpointing_gives_identical_gradients(name):
    ids = torch.randint(0, 61, (2, 20))
    losses, grads = [], []
    for ckpt in (False, True):
        model = make(name, use_checkpoint=ckpt, dropout=0.1).train()
        torch.manual_seed(1)  # same dropout masks
        out = model(ids, targets=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # the auxiliary losses are counted once, not again by the recomputation
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


def incremental_logits(model, ids, mask, prefill, step):
    """Prefill `prefill` tokens, then feed the rest `step` tokens at a time through the cache."""
    cache = model.new_cache(ids.shape[0], capacity=4)  # small on purpose: the buffers must grow
    outs = [model(ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill], cache=cache).logits]
    for t in range(prefill, ids.shape[1], step):
        m = None if mask is None else mask[:, : t + step]  # the full mask so far, as transformers users pass it
        outs.append(model(ids[:, t:t + step], attention_mask=m, cache=cache).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("prefill, step", [(5, 1), (3, 4)])
def test_incremental_decode_equals_full_forward(name, padded, prefill, step):
    model = make(name)
    B, T = 3, 19
    ids = torch.randint(0, 61, (B, T))
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :4] = 0
        mask[2, :2] = 0
    full = model(ids, attention_mask=mask).logits
    inc = incremental_logits(model, ids, mask, prefill, step)
    keep = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(inc[keep], full[keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_left_padded_row_equals_unpadded_row(name):
    model = make(name)
    ids = torch.randint(0, 61, (1, 11))
    pad = 5
    padded = torch.cat((torch.zeros(1, pad, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, pad), torch.ones(1, 11)), dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, pad:], model(ids).logits,
                               rtol=0, atol=1e-5)


def test_padding_positions_ignored_in_loss():
    model = make()
    ids = torch.randint(0, 61, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, :3] = False
    _, loss = model(ids, targets=ids, attention_mask=mask)
    logits = model(ids[:, 3:]).logits
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[0], ids[0, 3:]), rtol=1e-5, atol=1e-5)


def test_rotary_model_runs_past_block_size_but_learned_positions_do_not():
    make("hybrid", block_size=8)(torch.randint(0, 61, (1, 20)))
    with pytest.raises(ValueError, match="block_size"):
        make("learned_pos", block_size=8)(torch.randint(0, 61, (1, 20)))


def test_bf16_forward_is_finite():
    model = make("hybrid", dtype=torch.bfloat16)
    logits, loss = model(torch.randint(0, 61, (2, 30)), targets=torch.randint(0, 61, (2, 30)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all() and torch.isfinite(loss)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.tensor([[1.0, 2.0]]), TypeError, "input_ids"),
    (torch.tensor([1, 2]), ValueError, "input_ids"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    (torch.tensor([[1, 61]]), ValueError, "vocab_size"),
    (torch.tensor([[-1, 2]]), ValueError, "vocab_size"),
])
def test_bad_input_ids(bad, exc, match):
    with pytest.raises(exc, match=match):
        make()(bad)


def test_bad_targets_and_mask():
    model = make()
    ids = torch.randint(0, 61, (2, 6))
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=ids[:, :5])
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=torch.full_like(ids, 61))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.full((2, 6), 2))


def test_moe_model_loss_is_ce_plus_weighted_aux_and_reported():
    model = make("moe").train()
    cfg = model.config
    ids = torch.randint(0, 61, (2, 16))
    out = model(ids, targets=ids)
    assert set(out.aux_losses) == {"load_balance", "router_z", "diversity"}
    expected = (out.ce_loss + cfg.moe_aux_loss_coef * out.aux_losses["load_balance"]
                + cfg.moe_z_loss_coef * out.aux_losses["router_z"]
                + cfg.moe_diversity_loss_coef * out.aux_losses["diversity"])
    torch.testing.assert_close(out.loss, expected)
    assert len(out.moe_stats) == 2
    for s in out.moe_stats:  # observability for the training loop
        torch.testing.assert_close(s.load.sum(), torch.tensor(1.0))
        assert 0 <= float(s.dropped_fraction) <= 1
    out.loss.backward()
    assert model.blocks[0].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_aux_losses_without_targets_are_computed_on_access_and_differentiable():
    model = make("moe").eval()  # eval: no jitter, so both calls route the same way
    ids = torch.randint(0, 61, (2, 16))
    with_targets = model(ids, targets=ids).aux_losses
    out = model(ids)
    assert out.loss is None and callable(out._aux_losses)  # nothing computed yet
    lazy = out.aux_losses
    assert set(lazy) == set(with_targets)
    for name in lazy:
        torch.testing.assert_close(lazy[name], with_targets[name], rtol=0, atol=0)
    assert out.aux_losses is lazy  # computed once
    lazy["load_balance"].backward()
    assert model.blocks[0].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_model_trains():
    torch.manual_seed(0)
    model = make("moe").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 61, (4, 16))
    first = None
    for _ in range(30):
        _, loss = model(ids, targets=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("name", ["hybrid", "moe"])
def test_bf16_autocast_training_step(name):
    model = make(name).train()
    ids = torch.randint(0, 61, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(ids, targets=ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
@pytest.mark.parametrize("T", [48, 8])
def test_training_forward_compiles_without_graph_breaks(capacity_factor, T):
    """torch.compile traces the whole training forward of a hybrid MoE model as one graph. Dropless MoE sizes its
    expert buffer from the routing: with capture_scalar_outputs that is a data-dependent size, not a break. At T = 8
    (32 assignments) eager dropless routing would take the few-token path, whose loop over the used experts is a
    host sync; compiled, the bmm dispatch is used (tracing the loop failed on an expert index that was a SymInt)."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(tiny_config("moe", moe_capacity_factor=capacity_factor)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, T))  # 192 or 32 assignments
    dynamo.reset()
    with dynamo.config.patch(capture_scalar_outputs=capacity_factor is None):
        explain = dynamo.explain(model)(ids, targets=ids)
    assert explain.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explain.break_reasons]
    assert explain.graph_count == 1
