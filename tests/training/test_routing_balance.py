"""Aux-loss-free balancing in the training loop: the trainer moves the routing bias after each step, checkpoints
carry it, and a resumed run continues it bit-identically; the metrics log reports the router statistics."""

import json

import torch

from minimax_gpt.training.checkpoint import load_model
from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.training.trainer import train
from train_helpers import write_config

OVERRIDES = ["--model.moe_bias_update_rate", "0.01", "--model.moe_aux_loss_coef", "0.0", "--model.moe_top_p", "0.7",
             "--model.moe_top_k", "3"]


def _records(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_resume_continues_the_routing_bias_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(load_run_config(write_config(tmp_path, straight), OVERRIDES))
    cfg = write_config(tmp_path, interrupted, name="b.toml")
    train(load_run_config(cfg, OVERRIDES + ["--train.stop_after", "4"]))
    after_4, _ = load_model(interrupted)
    train(load_run_config(cfg, OVERRIDES), resume=True)
    model_a, _ = load_model(straight)
    model_b, _ = load_model(interrupted)
    biases = [b.mlp.routing_bias for b in model_a.blocks]
    # 6 steps of +-0.01 (or 0 for an expert exactly at the mean): multiples of 0.01, not all zero, and moved on
    # after the checkpoint at step 4
    assert all(float(b.abs().max()) <= 0.06 + 1e-6 for b in biases) and any(bool(b.ne(0).any()) for b in biases)
    assert any(not torch.equal(b.mlp.routing_bias, a) for b, a in zip(after_4.blocks, biases))
    for (n, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), n
    a, b = _records(straight), _records(interrupted)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "moe_imbalance", "moe_experts_per_token"):
            assert ra[key] == rb[key], (ra["step"], key)
    for r in a:  # top-p with a cap of 3: between 1 and 3 experts per token in each of the 2 layers
        assert len(r["moe_experts_per_token"]) == 2 and all(1 <= v <= 3 for v in r["moe_experts_per_token"])
        assert all(1 <= v <= 4 for v in r["moe_imbalance"])
        assert r["moe_mean_imbalance"] == sum(r["moe_imbalance"]) / 2
