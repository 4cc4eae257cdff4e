"""benchmarks/nanogpt_ref.py, the nanoGPT-architecture reference of the suite's `nanogpt` rows (issue 21): nanoGPT's
parameter count for its Shakespeare-char recipe, tied embeddings, causality, the loss of an untrained model, and the
recipe's optimizer groups."""

import math

import torch

from benchmarks.nanogpt_ref import RECIPE, NanoGPTConfig, NanoGPTReference, recipe_optimizer


def test_shape_of_nanogpt_shakespeare_char():
    torch.manual_seed(0)
    model = NanoGPTReference(NanoGPTConfig())
    n = sum(p.numel() for p in model.parameters())
    # nanoGPT prints "number of parameters: 0.80M" for this recipe, counting without the position table
    assert n == 809_856 and n - model.wpe.weight.numel() == 801_664
    assert model.lm_head.weight is model.wte.weight


def test_causal_and_untrained_loss():
    torch.manual_seed(0)
    model = NanoGPTReference(NanoGPTConfig()).eval()
    x = torch.randint(0, 65, (2, 64), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 65, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss = model(x, y)
        logits2, _ = model(x2 := _future_changed(x))
    assert logits.shape == (2, 64, 65)
    assert abs(loss.item() - math.log(65)) < 0.05  # near-uniform predictions at init
    torch.testing.assert_close(logits2[:, :40], logits[:, :40], rtol=0, atol=1e-6)
    assert not torch.allclose(logits2[:, 40:], logits[:, 40:])


def test_recipe_optimizer_decays_matrices_only():
    model = NanoGPTReference(NanoGPTConfig())
    opt = recipe_optimizer(model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == RECIPE["weight_decay"] and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert opt.defaults["lr"] == RECIPE["lr"] and opt.defaults["betas"] == RECIPE["betas"]
    assert not opt.defaults.get("fused")  # fused only on CUDA, as nanoGPT


def _future_changed(x: torch.Tensor) -> torch.Tensor:
    """x with every token from position 40 on changed: the logits up to position 39 must not move."""
    x2 = x.clone()
    x2[:, 40:] = (x2[:, 40:] + 1) % 65
    return x2
