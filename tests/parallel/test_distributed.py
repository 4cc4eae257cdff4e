"""Data-parallel training on CPU (gloo), 2 processes started with torch.multiprocessing: DDP and FSDP2 follow the
single-process loss curve on the same global batch; distributed checkpoints resume on 1 and on 2 ranks.

The tiny config (tests/train_helpers.py) is a hybrid lightning/softmax MoE (dropless) of 6 steps in two phases,
with a checkpoint at the phase boundary (step 3). Because the global batch does not depend on the number of ranks
(minimax_gpt.parallel.distributed), every run here must reproduce the single-process reference's metrics.
"""

import json
import re
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.training.trainer import train
from gloo_cases import free_port
from train_helpers import legacy_copy, write_config

TOL = 1e-5


def _losses(out_dir: Path) -> dict[tuple[str, int], float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["step"]): r["loss"] if r["kind"] == "train" else r["val_loss"] for r in records}


def _assert_same(got: dict, want: dict, steps=None) -> None:
    keys = [k for k in want if steps is None or k[1] in steps]
    assert keys and all(k in got for k in keys), (sorted(got), sorted(keys))
    diffs = {k: abs(got[k] - want[k]) for k in keys}
    assert max(diffs.values()) < TOL, diffs


def _run(config: Path, out_dir: Path, *overrides: str, resume=False):
    run = load_run_config(config, ["--train.out_dir", str(out_dir), "--train.threads", "1", *overrides])
    return train(run, resume=resume)


def _worker(rank: int, world: int, port: int, jobs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for config, out_dir, overrides, resume, *sigterm in jobs:
        if sigterm and sigterm[0][0] == rank:  # (rank, n): this rank receives SIGTERM during its n-th training step
            _sigterm_during_step(sigterm[0][1])
        _run(Path(config), Path(out_dir), *overrides, resume=resume)


def _sigterm_during_step(n: int) -> None:
    """SIGTERM to this process from inside its n-th training forward (the model class is patched in this worker
    process only)."""
    import signal

    from minimax_gpt import EnhancedMiniMaxGPT

    original, calls = EnhancedMiniMaxGPT.forward, [0]

    def forward(self, *args, **kwargs):
        if self.training:
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    EnhancedMiniMaxGPT.forward = forward


def _spawn(jobs: list, world: int = 2) -> None:
    mp.start_processes(_worker, args=(world, free_port(), jobs), nprocs=world, join=True, start_method="spawn")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references (with and without gradient accumulation, MoE and dense), then one 2-process group
    running every distributed job of this module in turn."""
    tmp = tmp_path_factory.mktemp("dist")
    config = write_config(tmp, tmp / "unused")
    dense = ["--model.use_moe", "false"]
    accum = ["--train.grad_accum_steps", "2"]
    freeze = ["--phases.1.freeze", '["wte", "blocks.0"]']  # the tied embedding too; after the step-3 evaluation
    out = {name: tmp / name for name in ("ref", "ref_dense", "ref_accum", "ref_freeze", "ddp", "fsdp", "fsdp_dense",
                                          "ddp_accum", "ddp_freeze", "fsdp_freeze", "fsdp_resume", "fsdp_from_plain",
                                          "one_from_fsdp", "ddp_from_fsdp", "ddp_sigterm", "fsdp_degrees", "fsdp_ac")}
    _run(config, out["ref"])
    _run(config, out["ref_dense"], *dense)
    _run(config, out["ref_accum"], *accum)
    _run(config, out["ref_freeze"], *freeze)
    step3 = "checkpoints/step-000003"
    # a single-process checkpoint in the layout written before every checkpoint had distcp/ (full weights and the
    # optimizer's state dict): resumed on 2 FSDP ranks through torch's full-state-dict loading
    legacy = legacy_copy(out["ref"] / step3, tmp / "legacy")
    _spawn([
        (config, out["ddp"], ["--train.parallel", "ddp"], False),
        (config, out["fsdp"], ["--train.parallel", "fsdp"], False),
        (config, out["fsdp_dense"], ["--train.parallel", "fsdp", *dense], False),
        (config, out["ddp_accum"], ["--train.parallel", "ddp", *accum], False),
        (config, out["ddp_freeze"], ["--train.parallel", "ddp", *freeze], False),
        (config, out["fsdp_freeze"], ["--train.parallel", "fsdp", *freeze], False),
        # a 2-rank distributed checkpoint resumed on 2 FSDP ranks and on 2 DDP ranks (DCP read into DDP's unwrapped
        # module), and a plain 1-process checkpoint resumed on 2 ranks
        (config, out["fsdp_resume"], ["--train.parallel", "fsdp"], str(out["fsdp"] / step3)),
        (config, out["ddp_from_fsdp"], ["--train.parallel", "ddp"], str(out["fsdp"] / step3)),
        (config, out["fsdp_from_plain"], ["--train.parallel", "fsdp"], str(legacy)),
        # the [parallel] degrees: FSDP over the whole world as dp_shard = -1
        (config, out["fsdp_degrees"], ["--parallel.dp_shard", "-1"], False),
        # activation checkpointing applied by parallelize before fully_shard: recomputation changes no number
        (config, out["fsdp_ac"], ["--train.parallel", "fsdp", "--model.use_checkpoint", "true"], False),
        # SIGTERM reaches rank 1 only, during step 2
        (config, out["ddp_sigterm"], ["--train.parallel", "ddp"], False, (1, 2)),
    ])
    # the 2-rank distributed checkpoint resumed by one process without a process group
    _run(config, out["one_from_fsdp"], resume=out["fsdp"] / step3)
    return out


def test_ddp_and_fsdp_follow_the_single_process_loss_curve(runs):
    ref = _losses(runs["ref"])
    assert len([k for k in ref if k[0] == "train"]) == 6
    for name in ("ddp", "fsdp"):
        _assert_same(_losses(runs[name]), ref)  # train losses of all 6 steps and both validations
    _assert_same(_losses(runs["fsdp_dense"]), _losses(runs["ref_dense"]))
    _assert_same(_losses(runs["ddp_accum"]), _losses(runs["ref_accum"]))


def test_a_phase_freeze_holds_under_ddp_and_fsdp(runs):
    """Phase 2 freezes the tied embedding and block 0, right after the step-3 evaluation (after which FSDP2 had left
    the root's parameters gathered: the freeze then reached copies, and the embedding kept training)."""
    from minimax_gpt.interop.pretrained import from_pretrained

    want = _losses(runs["ref_freeze"])
    for name in ("ddp_freeze", "fsdp_freeze"):
        _assert_same(_losses(runs[name]), want)
        before, after = (from_pretrained(runs[name] / "checkpoints" / step).state_dict()
                         for step in ("step-000003", "step-000006"))
        for key in before:
            moved = not torch.equal(before[key], after[key])
            assert moved == (not key.startswith(("wte.", "lm_head.", "blocks.0."))), (name, key)


def test_only_rank_zero_writes_and_tokens_are_global(runs):
    ref = json.loads((runs["ref"] / "summary.json").read_text())
    got = json.loads((runs["fsdp"] / "summary.json").read_text())
    assert got["tokens_seen"] == ref["tokens_seen"] == 3 * 4 * 8 + 3 * 2 * 16
    lines = (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((runs["ref"] / "metrics.jsonl").read_text().splitlines())  # not one set per rank
    assert (runs["fsdp"] / "sample.txt").read_text() == (runs["ref"] / "sample.txt").read_text()


def test_aux_losses_are_global_not_summed_over_ranks(runs):
    def aux(out_dir):
        return [r["aux_load_balance"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    want = aux(runs["ref"])
    for name in ("ddp", "fsdp"):
        assert max(abs(a - b) for a, b in zip(aux(runs[name]), want)) < TOL


def test_distributed_checkpoint_resumes_on_two_ranks_and_on_one(runs):
    ref = _losses(runs["ref"])
    after = range(4, 7)
    _assert_same(_losses(runs["fsdp_resume"]), ref, after)
    _assert_same(_losses(runs["one_from_fsdp"]), ref, after)
    _assert_same(_losses(runs["fsdp_from_plain"]), ref, after)


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_process_and_on_two_ddp_ranks(runs):
    """Issue 16: the 2-rank FSDP checkpoint of step 3 (sharded DCP) resumed by one process, by 2 DDP ranks and by 2
    FSDP ranks: the next step's loss (step 4, the first after the resume) is the uninterrupted runs' step 4, and so is
    the rest of the curve (steps 4-6 and the step-6 validation)."""
    from minimax_gpt.training.checkpointer import is_sharded as is_distributed_checkpoint

    assert is_distributed_checkpoint(runs["fsdp"] / "checkpoints" / "step-000003")
    ref, fsdp = _losses(runs["ref"]), _losses(runs["fsdp"])
    assert abs(fsdp[("train", 4)] - ref[("train", 4)]) < TOL
    for name in ("one_from_fsdp", "ddp_from_fsdp", "fsdp_resume"):
        got = _losses(runs[name])
        assert min(step for _, step in got) == 4, (name, sorted(got))  # a new folder: the resumed steps only
        for want in (ref, fsdp):
            assert abs(got[("train", 4)] - want[("train", 4)]) < TOL, (name, got[("train", 4)], want[("train", 4)])
            _assert_same(got, want, range(4, 7))
    trainer_state = torch.load(runs["ddp_from_fsdp"] / "checkpoints" / "step-000006" / "trainer_state.pt",
                               weights_only=False)
    assert trainer_state["parallel"] == "ddp" and trainer_state["world_size"] == 2


def test_distributed_checkpoint_converts_to_the_plain_format(runs, tmp_path):
    from minimax_gpt.training.checkpointer import dcp_to_safetensors
    from minimax_gpt.training.checkpointer import is_sharded as is_distributed_checkpoint
    from minimax_gpt.interop.pretrained import from_pretrained

    ckpt = runs["fsdp"] / "checkpoints" / "step-000006"
    assert is_distributed_checkpoint(ckpt)
    converted = from_pretrained(dcp_to_safetensors(ckpt, tmp_path / "plain"))
    consolidated = from_pretrained(ckpt)  # the model.safetensors written next to distcp/
    reference = from_pretrained(runs["ref"] / "checkpoints" / "step-000006")
    for (name, a), b, c in zip(converted.state_dict().items(), consolidated.state_dict().values(),
                               reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(a, c, rtol=0, atol=2e-5, msg=name)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(runs):
    """Rank 1 alone gets SIGTERM during step 2: both ranks finish step 2, save one checkpoint together and leave (a
    rank stopping alone would leave the other waiting in a collective: this test would hang)."""
    out = runs["ddp_sigterm"]
    summary = json.loads((out / "summary.json").read_text())  # written by rank 0, which got no signal itself
    assert summary["iters"] == 2 and summary["interrupted"] == "a signal to another rank"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    _assert_same(_losses(out), _losses(runs["ref"]), steps={1, 2})
    assert max(step for _, step in _losses(out)) == 2


def test_config_errors(tmp_path, monkeypatch):
    from minimax_gpt.parallel.distributed import setup

    with pytest.raises(ValueError, match="train.parallel"):
        load_run_config(write_config(tmp_path, tmp_path / "o"), ["--train.parallel", "tp"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="--train.parallel ddp"):
        setup("none", "cpu")


def test_parallel_degrees_as_a_mesh_follow_the_single_process_curve(runs):
    """--parallel.dp_shard -1 is FSDP over every rank (the trainer state says so) and trains as one process does."""
    _assert_same(_losses(runs["fsdp_degrees"]), _losses(runs["ref"]))
    from minimax_gpt.training.checkpoint import load_trainer_state

    state = load_trainer_state(runs["fsdp_degrees"])
    assert (state["parallel"], state["world_size"]) == ("fsdp", 2)


def test_fsdp_with_activation_checkpointing_follows_the_single_process_curve(runs):
    _assert_same(_losses(runs["fsdp_ac"]), _losses(runs["ref"]))


def test_hsdp_on_a_two_by_two_mesh_follows_the_single_process_curve(tmp_path):
    """4 gloo processes, replicated over dp_replicate = 2 and sharded over dp_shard = 2 (FSDP2's HSDP)."""
    config = write_config(tmp_path, tmp_path / "unused")
    rows = ["--phases.*.batch_size", "4"]  # the global micro-batch, one row per rank
    _run(config, tmp_path / "ref", *rows)
    out = tmp_path / "hsdp"
    _spawn([(config, out, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2", *rows], False)], world=4)
    _assert_same(_losses(out), _losses(tmp_path / "ref"))
    from minimax_gpt.training.checkpoint import load_trainer_state

    assert load_trainer_state(out)["parallel"] == "hsdp"


@pytest.mark.parametrize("parallel, degrees, world, want", [
    ("none", None, 1, ("none", {"dp_replicate": 1, "dp_shard": 1})),
    ("ddp", None, 4, ("ddp", {"dp_replicate": 4, "dp_shard": 1})),
    ("fsdp", None, 1, ("fsdp", {"dp_replicate": 1, "dp_shard": 1})),  # a group of one without torchrun
    ("none", {"dp_replicate": 1, "dp_shard": -1}, 4, ("fsdp", {"dp_replicate": 1, "dp_shard": 4})),
    ("none", {"dp_replicate": 2, "dp_shard": -1}, 4, ("hsdp", {"dp_replicate": 2, "dp_shard": 2})),
    ("none", {"dp_replicate": -1, "dp_shard": 1}, 2, ("ddp", {"dp_replicate": 2, "dp_shard": 1})),
])
def test_degrees_resolve_to_an_engine_and_a_mesh_shape(parallel, degrees, world, want):
    from minimax_gpt.parallel.distributed import resolve_degrees

    assert resolve_degrees(parallel, degrees, world) == want


@pytest.mark.parametrize("degrees, world, fragment", [
    ({"dp_replicate": 2, "dp_shard": 2}, 2, "parallel.dp_replicate 2 x parallel.dp_shard 2 must multiply to the "
                                            "world size 2 (launched as WORLD_SIZE=2 (torchrun))"),
    ({"dp_replicate": 1, "dp_shard": 2}, 1, "must multiply to the world size 1 (this is one process: launch with "
                                            "torchrun --nproc_per_node N)"),
    ({"dp_replicate": 3, "dp_shard": -1}, 4, "parallel.dp_replicate 3 x parallel.dp_shard -1 must multiply"),
])
def test_degrees_that_do_not_fit_the_world_are_refused(degrees, world, fragment):
    from minimax_gpt.parallel.distributed import resolve_degrees

    with pytest.raises(ValueError, match=re.escape(fragment)):
        resolve_degrees("none", degrees, world)


def test_parallel_table_errors(tmp_path, capsys):
    from minimax_gpt.__main__ import main

    cfg = write_config(tmp_path, tmp_path / "o")
    for overrides, fragment in ((["--parallel.dp_shrd", "2"], "did you mean dp_shard"),
                                (["--parallel.dp_shard", "0"], "parallel.dp_shard must be >= 1, or -1"),
                                (["--parallel.dp_shard", "-1", "--parallel.dp_replicate", "-1"],
                                 "only one parallel degree may be -1"),
                                (["--parallel.dp_shard", "2", "--train.parallel", "ddp"], "are both set"),
                                (["--parallel.dp_shard", "2"], "must multiply to the world size 1")):
        assert main(["train", "--config", str(cfg), *overrides]) == 2
        assert fragment in capsys.readouterr().err.strip().splitlines()[-1]
