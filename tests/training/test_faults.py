"""Training faults: non-finite steps are skipped and counted, too many in a row stop the run with the last good
checkpoint intact; SIGINT / SIGTERM save a checkpoint and `--resume` continues to the same losses; a failed write
(disk full) keeps the previous checkpoint; corrupted or incompatible checkpoints fail naming the file and keys."""

import errno
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from minimax_gpt import EnhancedMiniMaxGPT
from minimax_gpt.training.checkpoint import load_model, load_trainer_state, resolve_checkpoint
from minimax_gpt.training.faults import BadStepTracker, GracefulStop, TrainingDiverged
from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.training.trainer import train
from train_helpers import poison_training_forward, write_config

QUICK = ["--train.eval_interval", "0", "--train.sample_tokens", "0"]


def _losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def test_non_finite_gradient_is_skipped_and_weights_stay_finite(tmp_path, monkeypatch):
    poison_training_forward(monkeypatch.setattr, lambda n: n == 2, where="grad")  # the hook is registered on a model built per run
    out = tmp_path / "out"
    summary = train(load_run_config(write_config(tmp_path, out), QUICK))
    assert summary["skipped_steps"] == 1
    model, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(summary["val_loss"])


def test_consecutive_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Steps 5, 6, 7 are non-finite with max_bad_steps = 3: the run stops at step 7 with a message naming the
    setting and the last checkpoint, which holds finite weights, equal to those after step 4 (skipped steps
    never update)."""
    poison_training_forward(monkeypatch.setattr, lambda n: 5 <= n < 100)
    out = tmp_path / "out"
    run = load_run_config(write_config(tmp_path, out), QUICK + ["--train.save_interval", "2", "--phases.1.iters", "9",
                                                                "--train.max_bad_steps", "3"])
    with pytest.raises(TrainingDiverged, match=r"step 7: 3 consecutive .*max_bad_steps = 3.*step-000006"):
        train(run)
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5, 6, 7]
    assert resolve_checkpoint(out).name == "step-000006"  # saved during the streak: weights of step 4
    good, _ = load_model(out / "checkpoints" / "step-000004")
    last, _ = load_model(out)
    for (name, a), b in zip(good.state_dict().items(), last.state_dict().values()):
        assert torch.isfinite(b).all() and torch.equal(a, b), name
    assert load_trainer_state(out)["progress"]["skipped_steps"] == 2


def test_bad_step_tracker_counts_streaks_and_zero_means_never():
    t = BadStepTracker(2)
    for finite in (False, True, False, True, False):
        t.record(finite)
        t.check(1)
    assert (t.skipped, t.streak) == (3, 1)
    t.record(False)
    with pytest.raises(TrainingDiverged, match="no checkpoint yet"):
        t.check(6)
    never = BadStepTracker(0)
    for step in range(50):
        never.record(False)
        never.check(step)
    assert never.skipped == 50
    with pytest.raises(ValueError, match="max_bad_steps"):
        BadStepTracker(-1)
    with pytest.raises(ValueError, match="max_bad_steps"):
        load_run_config(None, ["--train.max_bad_steps", "-1"])


def test_sigint_saves_a_checkpoint_and_resume_completes(tmp_path, monkeypatch):
    calls = poison_training_forward(monkeypatch.setattr, lambda n: False)
    original = EnhancedMiniMaxGPT.forward

    def forward(self, *args, **kwargs):  # Ctrl-C arrives during step 3
        out = original(self, *args, **kwargs)
        if self.training and calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(EnhancedMiniMaxGPT, "forward", forward)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when pytest runs as a background job
    first = train(load_run_config(cfg, QUICK))
    assert first["interrupted"] == "SIGINT" and first["iters"] == 3 and not first["completed"]
    assert resolve_checkpoint(out).name == "step-000003"
    assert signal.getsignal(signal.SIGINT) is before  # handlers are put back
    monkeypatch.undo()
    second = train(load_run_config(cfg, QUICK), resume=True)
    assert second["completed"] and second["iters"] == 6 and second["interrupted"] is None


def test_second_signal_stops_at_once():
    with GracefulStop() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second stop signal"):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_to_the_cli_saves_and_resume_equals_an_uninterrupted_run(tmp_path):
    """A real process gets SIGTERM after its first steps: it exits with 128 + 15, leaves a checkpoint at the step
    it finished, and resuming from it gives, step for step, the losses of a run that was never interrupted."""
    overrides = QUICK + ["--phases.1.iters", "100", "--train.threads", "1"]
    out = tmp_path / "interrupted"
    cfg = write_config(tmp_path, out)
    proc = subprocess.Popen([sys.executable, "-m", "minimax_gpt", "train", "--config", str(cfg), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and len(_losses(out)) >= 4):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr
    summary = json.loads(stdout)
    stopped_at = summary["iters"]
    assert summary["interrupted"] == "SIGTERM" and 4 <= stopped_at < 103
    assert resolve_checkpoint(out).name == f"step-{stopped_at:06d}"

    resumed = train(load_run_config(cfg, overrides), resume=True)
    straight_out = tmp_path / "straight"
    straight = train(load_run_config(write_config(tmp_path, straight_out, name="b.toml"), overrides))
    assert resumed["completed"] and resumed["iters"] == straight["iters"] == 103
    assert _losses(out) == _losses(straight_out)  # exact, every step, including those after the resume


def test_disk_full_keeps_the_previous_checkpoint_and_reports(tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    train(load_run_config(cfg, QUICK + ["--train.stop_after", "2"]))
    saves = {"n": 0}
    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        saves["n"] += 1
        with open(filename, "wb") as f:
            f.write(b"partial")  # some bytes land before the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*step-000003: No space left on device; the "
                                      r"previous checkpoint .*step-000002 is intact") as info:
        train(load_run_config(cfg, QUICK), resume=True)
    assert info.value.errno == errno.ENOSPC and saves["n"] == 1
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert resolve_checkpoint(out).name == "step-000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002"]  # no leftovers
    model, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert train(load_run_config(cfg, QUICK), resume=True)["completed"]  # and training can go on from it


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    out = tmp / "out"
    train(load_run_config(write_config(tmp, out), QUICK + ["--train.stop_after", "1"]))
    return tmp, out, resolve_checkpoint(out)


def _damaged_copy(checkpoint_dir, tmp_path, name, damage):
    """A copy of the checkpoint with one file damaged and no manifest.json, so that the file's own reader is what
    notices (with the manifest, its size check notices first: test_manifest_names_a_damaged_missing_or_stray_file)."""
    import shutil

    _, _, ckpt = checkpoint_dir
    copy = tmp_path / "damaged"
    shutil.copytree(ckpt, copy)
    (copy / "manifest.json").unlink()
    path = copy / name
    data = path.read_bytes()
    path.write_bytes(damage(data))
    return copy, path


@pytest.mark.parametrize("name, damage, match", [
    ("model.safetensors", lambda b: b[: len(b) // 2], "not a readable safetensors file"),
    ("model.safetensors", lambda b: b"\xff" * 16 + b[16:], "not a readable safetensors file"),
    ("model.safetensors", lambda b: b"", "not a readable safetensors file"),
    ("config.json", lambda b: b[: len(b) // 2], "not valid JSON"),
    ("config.json", lambda b: b.replace(b'"n_layer": 2', b'"n_layers": 2'), "unknown MiniMaxConfig field"),
    ("trainer_state.pt", lambda b: b[: len(b) // 2], "truncated or corrupted"),
    ("trainer_state.pt", lambda b: b"", "truncated or corrupted"),
])
def test_damaged_checkpoint_fails_naming_the_file(checkpoint_dir, tmp_path, name, damage, match):
    copy, path = _damaged_copy(checkpoint_dir, tmp_path, name, damage)
    load = load_trainer_state if name == "trainer_state.pt" else load_model
    with pytest.raises(ValueError, match=match) as info:
        load(copy)
    assert str(path) in str(info.value)


def test_resume_with_an_incompatible_config_names_the_keys(checkpoint_dir):
    tmp, out, ckpt = checkpoint_dir
    run = load_run_config(write_config(tmp, out), QUICK + ["--model.n_embd", "24", "--model.intermediate_size", "48"])
    with pytest.raises(ValueError, match=r"config\.json: the checkpoint's model config is incompatible") as info:
        train(run, resume=ckpt)
    msg = str(info.value)
    assert "n_embd: checkpoint 16, run 24" in msg and "intermediate_size: checkpoint 32, run 48" in msg
    assert "n_layer" not in msg  # only the keys that differ
