"""Training loop: resume equals an uninterrupted run step for step; phases switch shape and schedule at the
boundary; frozen parameters stay put; optimizer groups; active parameters; non-finite steps are skipped."""

import json
import math

import pytest
import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.training.checkpoint import load_model, load_trainer_state
from minimax_gpt.training.run_config import PhaseConfig, TrainConfig, load_run_config
from minimax_gpt.training.trainer import count_params, evaluate_checkpoint, make_optimizer, train
from train_helpers import poison_training_forward, write_config


def _records(out_dir, kind="train"):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_resume_equals_uninterrupted(tmp_path):
    """Stop after step 4 (mid phase 2), resume: the loss, lr and grad norm of every step equal those of a run that
    was never interrupted, exactly (CPU fp32). Dropout and MoE routing exercise the restored RNG states."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    overrides = ["--model.dropout", "0.1", "--model.moe_jitter_noise", "0.05"]
    train(load_run_config(write_config(tmp_path, straight), overrides))
    cfg = write_config(tmp_path, interrupted, name="b.toml")
    first = train(load_run_config(cfg, overrides + ["--train.stop_after", "4"]))
    assert first["iters"] == 4 and not first["completed"]
    second = train(load_run_config(cfg, overrides), resume=True)
    assert second["iters"] == 6 and second["completed"]
    a, b = _records(straight), _records(interrupted)
    assert [r["step"] for r in b] == list(range(1, 7))  # records after the checkpoint were not duplicated
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "ce_loss", "lr", "grad_norm", "seq_len", "tokens_seen"):
            assert ra[key] == rb[key], (ra["step"], key)
    model_a, _ = load_model(straight)
    model_b, _ = load_model(interrupted)
    for (n, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_a_checkpoint_in_the_earlier_plain_layout_resumes_exactly(tmp_path):
    """Checkpoints written before every checkpoint had distcp/ (full weights, the optimizer's state dict in
    trainer_state.pt) still resume, and the steps after equal those of an uninterrupted run."""
    from train_helpers import legacy_copy

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    overrides = ["--model.dropout", "0.1", "--model.moe_jitter_noise", "0.05"]
    train(load_run_config(write_config(tmp_path, straight), overrides))
    train(load_run_config(write_config(tmp_path, stopped, name="b.toml"), overrides + ["--train.stop_after", "4"]))
    legacy = legacy_copy(stopped / "checkpoints" / "step-000004", tmp_path / "legacy")
    assert not (legacy / "distcp").exists() and isinstance(load_trainer_state(legacy)["optimizer"], dict)
    resumed = tmp_path / "resumed"
    train(load_run_config(write_config(tmp_path, resumed, name="c.toml"), overrides), resume=legacy)
    a = {r["step"]: r for r in _records(straight)}
    for rb in _records(resumed):
        for key in ("loss", "ce_loss", "lr", "grad_norm"):
            assert a[rb["step"]][key] == rb[key], (rb["step"], key)
    model_a, _ = load_model(straight)
    model_b, _ = load_model(resumed)
    for (n, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_phases_switch_shape_and_schedule(tmp_path):
    out = tmp_path / "out"
    run = load_run_config(write_config(tmp_path, out))
    summary = train(run)
    recs = _records(out)
    assert [r["seq_len"] for r in recs] == [8, 8, 8, 16, 16, 16]
    assert [r["batch_size"] for r in recs] == [4, 4, 4, 2, 2, 2]
    assert [r["phase"] for r in recs] == [1, 1, 1, 2, 2, 2]
    expected = [run.phases[0].lr_at(i) for i in range(3)] + [run.phases[1].lr_at(i) for i in range(3)]
    assert [r["lr"] for r in recs] == pytest.approx(expected, rel=0, abs=0)
    assert recs[3]["lr"] == pytest.approx(1e-3 / 2)  # phase 2 restarts its warm-up
    assert recs[-1]["tokens_seen"] == summary["tokens_seen"] == 3 * 4 * 8 + 3 * 2 * 16
    # a checkpoint at the phase boundary (step 3) and at the end (step 6)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000003", "step-000006"]
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [3, 6] and all(math.isfinite(r["val_loss"]) for r in evals)


def test_evaluate_checkpoint_reproduces_the_runs_validation_losses_exactly(tmp_path):
    """By default eval validates as the run did (the batch shape of the checkpoint's phase, train.eval_batches windows
    spread over the split, train.precision, train.loss_chunk_size), on the checkpoint's weights, which are the model
    training evaluated: the final checkpoint gives summary.json's val_loss and the phase-boundary checkpoint its
    metrics.jsonl record, bit for bit."""
    out = tmp_path / "out"
    summary = train(load_run_config(write_config(tmp_path, out), ["--train.loss_chunk_size", "5"]))
    result = evaluate_checkpoint(out)
    assert result["loss"] == summary["val_loss"] == json.loads((out / "summary.json").read_text())["val_loss"]
    assert result["run_settings"] == {"phases.1.batch_size": 2, "phases.1.seq_len": 16, "train.eval_batches": 2,
                                      "train.precision": "auto"}
    assert (result["batches"], result["windows"], result["windows_total"], result["tokens"]) == (2, 4, 27, 4 * 16)
    boundary = evaluate_checkpoint(out / "checkpoints" / "step-000003")
    assert (boundary["batch_size"], boundary["seq_len"]) == (4, 8)  # phase 0's shape, as at step 3 in training
    assert boundary["loss"] == _records(out, "eval")[0]["val_loss"]
    whole = evaluate_checkpoint(out, max_batches="all")
    assert (whole["windows"], whole["batches"], whole["tokens"]) == (27, 14, 27 * 16)
    assert whole["loss"] != summary["val_loss"]


def test_freeze_keeps_parameters(tmp_path):
    out = tmp_path / "out"
    run = load_run_config(write_config(tmp_path, out), ["--phases.1.freeze", '["wte", "blocks.0"]'])
    train(run)
    before, _ = load_model(out / "checkpoints" / "step-000003")
    after, _ = load_model(out / "checkpoints" / "step-000006")
    sb, sa = before.state_dict(), after.state_dict()
    assert torch.equal(sb["wte.weight"], sa["wte.weight"])
    assert all(torch.equal(sb[n], sa[n]) for n in sb if n.startswith("blocks.0."))
    assert not torch.equal(sb["blocks.1.norm1.weight"], sa["blocks.1.norm1.weight"])
    with pytest.raises(ValueError, match="nope"):
        train(load_run_config(write_config(tmp_path, tmp_path / "o2"), ["--phases.0.freeze", '["nope"]']))


def test_lr_schedule_warmup_and_cosine():
    p = PhaseConfig(iters=110, seq_len=8, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_iters=10)
    assert p.lr_at(0) == pytest.approx(1e-3 / 11)
    assert p.lr_at(9) == pytest.approx(1e-3 * 10 / 11)
    assert p.lr_at(10) == pytest.approx(1e-3)
    assert p.lr_at(60) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert p.lr_at(110) == pytest.approx(1e-4)


def test_optimizer_groups_and_active_params():
    config = MiniMaxConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, use_moe=True,
                           num_experts=4, moe_top_k=1, intermediate_size=8, pos_embedding="learned")
    model = EnhancedMiniMaxGPT(config)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(model.wte.weight) in no_decay and id(model.wpe.weight) in no_decay
    assert id(model.blocks[0].mlp.w1) in decay and id(model.blocks[0].attn.out_proj.weight) in decay
    embeddings = {id(model.wte.weight), id(model.wpe.weight)}
    assert all(p.dim() == 1 or id(p) in embeddings for p in model.parameters() if id(p) in no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    total, active = count_params(model)
    assert total == sum(p.numel() for p in model.parameters())
    experts = sum(b.mlp.w1.numel() + b.mlp.w2.numel() + b.mlp.w3.numel() for b in model.blocks)
    assert active == total - experts * 3 // 4


def test_non_finite_step_is_skipped(tmp_path, monkeypatch):
    poison_training_forward(monkeypatch.setattr, lambda n: n == 2)
    out = tmp_path / "out"
    summary = train(load_run_config(write_config(tmp_path, out)))
    assert summary["skipped_steps"] == 1
    assert math.isfinite(summary["val_loss"])
    recs = _records(out)
    assert math.isnan(recs[1]["loss"]) and recs[-1]["skipped_steps"] == 1


def test_keep_checkpoints_prunes_the_oldest_and_resume_still_works(tmp_path):
    """save_interval 1 writes a checkpoint after every step; keep_checkpoints 2 leaves the newest two, the latest
    among them, and a resumed run continues from it."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    common = ["--train.save_interval", "1", "--train.keep_checkpoints", "2", "--train.sample_tokens", "0"]
    first = train(load_run_config(cfg, common + ["--train.stop_after", "4"]))
    assert first["iters"] == 4
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names == ["latest", "step-000003", "step-000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    done = train(load_run_config(cfg, common), resume=True)
    assert done["completed"] and done["iters"] == 6
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step-000005", "step-000006"]  # no hidden leftovers either
    with pytest.raises(ValueError, match="keep_checkpoints"):
        TrainConfig(keep_checkpoints=-1)


def test_compile_option_compiles_the_training_forward_only(tmp_path, monkeypatch):
    """train.compile wraps the module the training step calls in torch.compile (recorded here instead of compiling:
    tests/test_model.py checks that the forward traces as one graph), with dynamo capturing the dropless MoE's
    data-dependent buffer size; checkpoints still hold the plain model's weights."""
    import torch._dynamo

    calls = []

    def fake_compile(module, *args, **kwargs):
        calls.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", False)
    out = tmp_path / "out"
    summary = train(load_run_config(write_config(tmp_path, out), ["--train.compile", "true"]))
    assert summary["completed"] and len(calls) == 1 and isinstance(calls[0], EnhancedMiniMaxGPT)
    assert torch._dynamo.config.capture_scalar_outputs  # the tiny config is a dropless MoE
    model, _ = load_model(out)
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_tune_malloc_option(tmp_path, monkeypatch):
    """CPU runs call hostmem.tune_malloc unless train.tune_malloc is false (tests/test_hostmem.py checks its effect)."""
    import minimax_gpt.training.hostmem

    calls = []
    monkeypatch.setattr(minimax_gpt.training.hostmem, "tune_malloc", lambda: calls.append(1) or True)
    quick = ["--train.stop_after", "1", "--train.sample_tokens", "0"]
    for flag, want in (([], 1), (["--train.tune_malloc", "false"], 0)):
        calls.clear()
        train(load_run_config(write_config(tmp_path, tmp_path / f"o{want}"), [*quick, *flag]))
        assert len(calls) == want
