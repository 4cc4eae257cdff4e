"""Which lightning implementation runs (ops/lightning/backend.py): config, environment switch, device, one log line."""

import logging

import pytest

from minimax_gpt import MiniMaxConfig
from minimax_gpt.ops.lightning import backend

CPU, CUDA = "cpu", "cuda"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "_decided", {})


def test_config_field_is_validated():
    assert MiniMaxConfig().lightning_backend == "auto"
    with pytest.raises(ValueError, match="lightning_backend is 'cuda'; allowed: auto, torch, triton"):
        MiniMaxConfig(lightning_backend="cuda")


def test_environment_switch_applies_to_auto_and_must_agree_with_the_config(monkeypatch):
    assert backend.requested_backend("auto") == "auto"
    assert backend.requested_backend("torch") == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert backend.requested_backend("auto") == "triton"
    assert backend.requested_backend("triton") == "triton"
    with pytest.raises(ValueError, match="lightning_backend is 'torch' in the config but MINIMAX_GPT_LIGHTNING_BACK"):
        backend.requested_backend("torch")
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MINIMAX_GPT_LIGHTNING_BACKEND is 'fast'; allowed: auto, torch, triton"):
        backend.requested_backend("auto")


def test_auto_on_cpu_runs_pytorch_and_says_why_once(caplog):
    with caplog.at_level(logging.INFO, logger=backend.__name__):
        assert backend.lightning_backend("auto", CPU, 64, 64) == "torch"
        assert backend.lightning_backend("auto", CPU, 64, 64) == "torch"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["lightning layers on cpu: the PyTorch chunked op, not the Triton kernels: no CUDA device"]


def test_auto_on_cuda_falls_back_with_a_warning_naming_the_reason(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_triton_missing", lambda: "Triton cannot be imported (no module named 'triton')")
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        assert backend.lightning_backend("auto", CUDA, 64, 64) == "torch"
        assert backend.lightning_backend("auto", CUDA, 24, 64) == "torch"
        assert backend.lightning_backend("auto", CUDA, 64, 256) == "torch"
    assert "Triton cannot be imported" in caplog.records[0].getMessage()
    assert "lightning_chunk_size 24 is not one of the kernels' (16, 32, 64)" in caplog.records[1].getMessage()
    assert "head_dim 256 is over the kernels' 128" in caplog.records[2].getMessage()
    monkeypatch.setattr(backend, "_triton_missing", lambda: None)
    assert backend.lightning_backend("auto", CUDA, 32, 64) == "triton"


def test_forcing_triton_where_it_cannot_run_is_one_clear_error(monkeypatch):
    original = backend._triton_missing
    monkeypatch.setattr(backend, "_triton_missing", lambda: "Triton cannot be imported (no module named 'triton')")
    with pytest.raises(RuntimeError, match="lightning_backend='triton' but Triton cannot be imported"):
        backend.lightning_backend("triton", CUDA, 64, 64)
    assert backend._decided == {}  # an error is not remembered as a decision
    pytest.importorskip("triton", reason="the CPU checks below import the Triton ops")
    monkeypatch.setattr(backend, "_triton_missing", original)
    with pytest.raises(RuntimeError, match="needs CUDA tensors .*TRITON_INTERPRET=1"):
        backend.lightning_backend("triton", CPU, 64, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.lightning_backend("triton", CPU, 64, 64) == "triton"
    with pytest.raises(ValueError, match="lightning_backend='triton': lightning_chunk_size 24 is not one of"):
        backend.lightning_backend("triton", CPU, 24, 64)
    with pytest.raises(ValueError, match="lightning_backend='triton': head_dim 256 is over the kernels' 128"):
        backend.lightning_backend("triton", CPU, 64, 256)


@pytest.mark.parametrize("fields,why", [(dict(lightning_chunk_size=24), "lightning_chunk_size 24 is not one of"),
                                        (dict(n_embd=512), "head_dim 256 is over the kernels' 128")])
def test_a_triton_model_the_kernels_cannot_run_is_refused_at_build(fields, why):
    from minimax_gpt import EnhancedMiniMaxGPT

    config = MiniMaxConfig(**{**dict(n_layer=1, n_head=2, n_embd=32, vocab_size=11, lightning_backend="triton"),
                              **fields})
    with pytest.raises(ValueError, match=f"lightning_backend='triton': {why}"):
        EnhancedMiniMaxGPT(config)
