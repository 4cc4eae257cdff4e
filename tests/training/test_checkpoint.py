"""Checkpoints: round trip of weights, tokenizer and trainer state (weights_only); an interrupted write leaves the
previous checkpoint and the `latest` pointer intact; directories resolve from a run's output directory."""

import pytest
import safetensors.torch
import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.training.checkpoint import (TRAINER_STATE_NAME, latest_checkpoint, load_model, load_trainer_state,
                                    resolve_checkpoint, save_training_checkpoint)
from minimax_gpt.data.tokenizer import build_tokenizer


def _model(seed=0):
    torch.manual_seed(seed)
    config = MiniMaxConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16, hybrid_period=2,
                           use_moe=True, intermediate_size=16)
    return EnhancedMiniMaxGPT(config)


def _state(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "rng": {"torch": torch.get_rng_state(), "data": g.get_state(),
                                  "python": (3, tuple(range(5)), None)},
            "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}}


def test_round_trip(tmp_path):
    model, tok = _model(), build_tokenizer("bytes")
    path = save_training_checkpoint(tmp_path, 5, model, tok, _state(5), {"train": {}})
    assert path == tmp_path / "checkpoints" / "step-000005"
    loaded, loaded_tok = load_model(tmp_path)  # from the output directory: the latest checkpoint
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert loaded.lm_head.weight is loaded.wte.weight  # tied again
    assert loaded_tok.encode("déf") == tok.encode("déf")
    state = load_trainer_state(path)  # torch.load(weights_only=True)
    assert state["step"] == 5 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(state["rng"]["data"], _state(5)["rng"]["data"])
    x = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0], rtol=0, atol=0)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good, tok = _model(0), build_tokenizer("bytes")
    save_training_checkpoint(tmp_path, 1, good, tok, _state(1), {})

    def killed(*args, **kwargs):  # the temporary directory exists by now; the weights never land
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, 1, _model(1), tok, _state(2), {})  # would replace step-000001
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, 2, _model(1), tok, _state(2), {})  # a new step
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not (tmp_path / "checkpoints" / "step-000002").exists()
    loaded, _ = load_model(tmp_path)
    for a, b in zip(good.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert load_trainer_state(tmp_path)["step"] == 1


def test_hard_kill_leftovers_are_ignored(tmp_path):
    """A process killed mid-write leaves a `.step-N.tmp-*` directory with partial files behind; it is never
    mistaken for a checkpoint."""
    model, tok = _model(), build_tokenizer("bytes")
    save_training_checkpoint(tmp_path, 3, model, tok, _state(3), {})
    partial = tmp_path / "checkpoints" / ".step-000004.tmp-abc123"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    assert resolve_checkpoint(tmp_path).name == "step-000003"
    assert resolve_checkpoint(tmp_path / "checkpoints").name == "step-000003"
    assert (resolve_checkpoint(tmp_path) / TRAINER_STATE_NAME).is_file()


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no training state"):
        model = _model()
        from minimax_gpt.training.checkpoint import save_checkpoint

        save_checkpoint(tmp_path / "bare", model)
        load_trainer_state(tmp_path / "bare")
