"""Training with sequence and expert parallelism (gloo, 2 and 4 processes) equals training in one process.

Sequence parallelism: a 7:1 hybrid MoE with GQA and RoPE, and a variant with XPos and learned positions, trained
with sp = 2, sp = 4 and sp = 2 x dp_shard = 2 reach the single-process losses (1e-5) and weights; a checkpoint saved
with sp = 2 resumes with sp = 4 and in one process. Expert parallelism: the same hybrid with 8 experts trained with
ep = 2, ep = 4 (FSDP2 over every rank) and ep = 2 inside dp_shard = 4, the same way. Both in one group of processes
per world size (starting them is the slow part). A checkpoint saved with ep = 2 (each rank holding half of the
experts) resumes without expert parallelism on 2 ranks, with ep = 4, and in one process."""

import json
from pathlib import Path

import pytest
import torch

from minimax_gpt.interop.pretrained import SafetensorsReader
from test_distributed import _losses, _run, _spawn
from train_helpers import write_config

TOL = 1e-5
HYBRID = ["--model.n_layer", "8", "--model.hybrid_period", "8", "--model.n_head", "4", "--model.n_kv_head", "2"]
XPOS = [*HYBRID, "--model.adaptive_xpos", "true", "--model.pos_embedding", "learned"]
EXPERTS = [*HYBRID, "--model.num_experts", "8", "--phases.*.batch_size", "4"]  # rows for 4 data-parallel ranks
STEP3 = "checkpoints/step-000003"


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted((out_dir / "checkpoints").glob("step-*"))[-1]
    with SafetensorsReader(latest) as reader:
        return {name: reader.get(name) for name in reader.keys()}


def _assert_same_run(got: Path, want: Path, resumed: bool = False) -> None:
    """Same losses at every logged step (after the checkpoint, for a resumed run) and the same final weights."""
    a, b = _losses(got), _losses(want)
    if resumed:
        b = {k: v for k, v in b.items() if k[1] > 3}
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    diffs = {k: abs(a[k] - b[k]) for k in b}
    assert max(diffs.values()) < TOL, diffs
    wa, wb = _weights(got), _weights(want)
    assert wa.keys() == wb.keys()
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=TOL, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    config = write_config(tmp, tmp / "unused")
    out = {name: tmp / name for name in ("ref", "ref_xpos", "ref_experts", "sp2", "sp2_xpos", "sp4", "sp4_xpos",
                                          "sp2_dp2", "sp2_dp2_xpos", "sp4_from_sp2", "one_from_sp2", "ep2", "ep4",
                                          "ep2_dp4", "ep1_from_ep2", "ep4_from_ep2", "one_from_ep2")}
    _run(config, out["ref"], *HYBRID)
    _run(config, out["ref_xpos"], *XPOS)
    _run(config, out["ref_experts"], *EXPERTS)
    _spawn([(config, out["sp2"], [*HYBRID, "--parallel.sp", "2"], False),
            (config, out["sp2_xpos"], [*XPOS, "--parallel.sp", "2"], False),
            (config, out["ep2"], [*EXPERTS, "--parallel.ep", "2"], False),
            (config, out["ep1_from_ep2"], [*EXPERTS, "--train.parallel", "fsdp"], str(out["ep2"] / STEP3))], world=2)
    _spawn([(config, out["sp4"], [*HYBRID, "--parallel.sp", "4"], False),
            (config, out["sp4_xpos"], [*XPOS, "--parallel.sp", "4"], False),
            (config, out["sp2_dp2"], [*HYBRID, "--parallel.sp", "2", "--parallel.dp_shard", "2"], False),
            (config, out["sp2_dp2_xpos"], [*XPOS, "--parallel.sp", "2", "--parallel.dp_shard", "2"], False),
            (config, out["sp4_from_sp2"], [*HYBRID, "--parallel.sp", "4"], str(out["sp2"] / STEP3)),
            (config, out["ep4"], [*EXPERTS, "--parallel.ep", "4"], False),
            (config, out["ep2_dp4"], [*EXPERTS, "--parallel.ep", "2", "--parallel.dp_shard", "-1"], False),
            (config, out["ep4_from_ep2"], [*EXPERTS, "--parallel.ep", "4"], str(out["ep2"] / STEP3))], world=4)
    _run(config, out["one_from_sp2"], *HYBRID, resume=out["sp2"] / STEP3)
    _run(config, out["one_from_ep2"], *EXPERTS, resume=out["ep2"] / STEP3)
    return out


@pytest.mark.parametrize("name, ref", [("sp2", "ref"), ("sp4", "ref"), ("sp2_dp2", "ref"),
                                       ("sp2_xpos", "ref_xpos"), ("sp4_xpos", "ref_xpos"),
                                       ("sp2_dp2_xpos", "ref_xpos")])
def test_sequence_parallel_training_equals_one_process(runs, name, ref):
    _assert_same_run(runs[name], runs[ref])


@pytest.mark.parametrize("name", ["ep2", "ep4", "ep2_dp4"])
def test_expert_parallel_training_equals_one_process(runs, name):
    _assert_same_run(runs[name], runs["ref_experts"])


@pytest.mark.parametrize("name", ["sp4_from_sp2", "one_from_sp2"])
def test_a_sequence_parallel_checkpoint_resumes_with_another_degree(runs, name):
    _assert_same_run(runs[name], runs["ref"], resumed=True)


@pytest.mark.parametrize("name", ["ep1_from_ep2", "ep4_from_ep2", "one_from_ep2"])
def test_an_expert_parallel_checkpoint_resumes_with_another_degree(runs, name):
    _assert_same_run(runs[name], runs["ref_experts"], resumed=True)


def test_an_expert_parallel_checkpoint_holds_every_expert(runs):
    """The consolidated weights of an ep = 2 run are the full (E, ...) tensors in expert order, which `eval`,
    `generate`, `convert` and `to_hf` read as any checkpoint: the model loads in one process and computes the
    logits of the single-process run's checkpoint at the same step."""
    from minimax_gpt.training.checkpoint import load_model

    model, _ = load_model(runs["ep2"] / STEP3)
    want, _ = load_model(runs["ref_experts"] / STEP3)
    assert model.blocks[0].mlp.experts.w1.shape[0] == 8
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want(ids).logits, rtol=0, atol=TOL)
