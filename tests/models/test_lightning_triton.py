"""A model whose lightning layers run the Triton kernels (on CPU through Triton's interpreter) against the same model
on the PyTorch op: logits, loss, every gradient, and incremental decoding against its own full forward."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not importable (it is part of the dev install: pip install -e .[dev])")

from helpers import tiny_config  # noqa: E402
from minimax_gpt import EnhancedMiniMaxGPT  # noqa: E402
from minimax_gpt.ops.lightning import backend  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "_decided", {})  # decide afresh, and log, in each test


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def pair(name: str, **overrides):
    """The same weights twice: lightning layers on the PyTorch op and on the Triton kernels."""
    torch.manual_seed(0)
    ref = EnhancedMiniMaxGPT(tiny_config(name, lightning_chunk_size=16, lightning_backend="torch", **overrides))
    fast = EnhancedMiniMaxGPT(tiny_config(name, lightning_chunk_size=16, lightning_backend="triton", **overrides))
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("name", ["moe", "lightning_rope"])
def test_triton_model_matches_the_pytorch_model(name, caplog):
    """T = 37 (two chunks of 16 and a partial one), batch 2: a hybrid MoE model (packed projection path) and an
    all-lightning model with RoPE in its lightning layers (rotated q, k)."""
    ref, fast = pair(name)
    ids = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(1))
    results = []
    with caplog.at_level("INFO", logger=backend.__name__):
        for model in (ref, fast):
            out = model(ids, targets=ids)
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.logits.detach(), out.loss.detach(), grads))
    assert "the Triton kernels, through Triton's interpreter" in caplog.text
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
    assert max_rel_err(logits, ref_logits) < 1e-5
    assert abs(float(loss - ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for n in grads:
        assert max_rel_err(grads[n], ref_grads[n]) < 1e-5, n


def test_triton_model_decodes_as_its_full_forward():
    """Prefill 20 tokens (a chunk of 16 and a partial one), then one token at a time (the Triton recurrent kernel):
    the logits of one full forward."""
    _, model = pair("hybrid")
    model.eval()
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        steps = [model(ids[:, :20], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(20, 24)]
    assert max_rel_err(torch.cat(steps, 1), full) < 1e-5
