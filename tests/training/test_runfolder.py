"""A run folder is the run's own: one writer (run.lock), no silent reuse (--overwrite moves the old run aside),
relocatable (a copied run resumes in place and never touches the original), and a finished run extends exactly."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minimax_gpt.__main__ import main
from minimax_gpt.training.checkpoint import resolve_checkpoint
from minimax_gpt.interop.pretrained import SafetensorsReader
from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.training.runfolder import LOCK_NAME, RunFolderError, claim
from minimax_gpt.training.trainer import train
from train_helpers import write_config

QUICK = ["--train.eval_interval", "3", "--train.sample_tokens", "0", "--train.threads", "1"]
NEW_PHASE = ["--phases.2.iters", "2", "--phases.2.seq_len", "8", "--phases.2.batch_size", "4", "--phases.2.lr", "5e-4",
             "--phases.2.min_lr", "5e-4"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(resolve_checkpoint(out)) as reader:
        return {name: reader.get(name) for name in reader.keys()}


def _train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run (2 phases) and its config."""
    tmp = tmp_path_factory.mktemp("runfolder")
    out = tmp / "out"
    cfg = write_config(tmp, out)
    train(load_run_config(cfg, QUICK))
    return tmp, out, cfg


# --- one writer -----------------------------------------------------------------------------------------------------
def test_a_second_train_into_a_live_run_fails_naming_the_process(finished, tmp_path, capsys):
    tmp, _, cfg = finished
    out = tmp_path / "live"
    proc = subprocess.Popen([sys.executable, "-m", "minimax_gpt", "train", "--config", str(cfg), "--out", str(out),
                             "--phases.*.iters", "100000", "--train.save_interval", "1", *QUICK], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
            time.sleep(0.1)
        first = resolve_checkpoint(out)
        before = _files(first)
        for argv in (["train", "--config", str(cfg), "--out", str(out), *QUICK], ["train", "--resume", str(out)],
                     ["train", "--config", str(cfg), "--out", str(out), "--overwrite", *QUICK]):
            assert main(argv) == 2
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"is in use by another run: pid {proc.pid}" in line, line
        assert proc.poll() is None and out.is_dir()  # --overwrite did not move a live run aside
        assert _files(first) == before
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
    assert not (out / LOCK_NAME).exists()  # released when the run stopped


def test_a_stale_or_copied_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for holder, why in (({"pid": int(gone.stdout), "host": os.uname().nodename, "folder": str(out.resolve())},
                         "its process is gone"),
                        ({"pid": os.getpid(), "host": os.uname().nodename, "folder": "/elsewhere"},
                         "written for another folder")):
        (out / LOCK_NAME).write_text(json.dumps(holder))
        with claim(out, continuing=True):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert why in caplog.text
        assert not (out / LOCK_NAME).exists()
    with claim(out, continuing=True):  # our own live lock: a second claim is refused
        with pytest.raises(RunFolderError, match=f"in use by another run: pid {os.getpid()}"):
            with claim(out, continuing=True):
                pass


# --- no silent reuse ------------------------------------------------------------------------------------------------
def test_a_fresh_train_into_a_run_is_refused_and_overwrite_moves_it_aside(finished, tmp_path, capsys, caplog):
    _, done, cfg = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = _files(out)
    assert main(["train", "--config", str(cfg), "--out", str(out), *QUICK]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already holds a run (checkpoints, metrics.jsonl, summary.json)" in line and "--overwrite" in line
    assert _files(out) == before
    assert main(["train", "--config", str(cfg), "--out", str(out), "--overwrite", *QUICK]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(aside) == 1 and _files(aside[0]) == before
    assert f"moved the previous run in {out} to {aside[0]}" in caplog.text
    assert json.loads((out / "summary.json").read_text())["iters"] == 6


# --- relocatable ----------------------------------------------------------------------------------------------------
def test_a_copied_run_resumes_in_place_and_never_touches_the_original(finished, tmp_path, capsys, monkeypatch):
    tmp, _, cfg = finished
    original = tmp_path / "original"
    assert main(["train", "--config", str(cfg), "--out", str(original), "--train.stop_after", "4", *QUICK]) == 0
    before = _files(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    saved = json.loads((resolve_checkpoint(copy) / "run_config.json").read_text())["train"]
    assert saved["out_dir"] == "." and saved["data"] == str((tmp / "corpus.txt").resolve())
    monkeypatch.chdir(tmp_path)  # another working directory than the run's
    assert main(["train", "--resume", str(copy)]) == 0
    assert _files(original) == before
    assert json.loads((copy / "summary.json").read_text())["iters"] == 6
    assert resolve_checkpoint(copy).name == "step-000006"
    moved = tmp_path / "moved"
    copy.rename(moved)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(moved)]) == 0
    assert str(moved / "data") in capsys.readouterr().out  # the data beside its checkpoints
    assert main(["generate", "--checkpoint", str(moved), "--prompt", "the ", "--max-new-tokens", "3"]) == 0
    assert _files(original) == before


# --- extending a finished run ---------------------------------------------------------------------------------------
def _uninterrupted(cfg: Path, out: Path, *overrides: str):
    train(load_run_config(cfg, [*QUICK, "--train.out_dir", str(out), *overrides]))
    return _train_losses(out), _weights(out)


@pytest.mark.parametrize("extension", ["added_phase", "longer_constant_lr_phase"])
def test_extending_a_finished_run_trains_exactly_the_new_steps(tmp_path, extension):
    cfg = write_config(tmp_path, tmp_path / "unused")
    base = ["--phases.1.min_lr", "1e-3"] if extension == "longer_constant_lr_phase" else []
    more = NEW_PHASE if extension == "added_phase" else ["--phases.1.iters", "5"]
    want_losses, want_weights = _uninterrupted(cfg, tmp_path / "whole", *base, *more)
    out = tmp_path / "extended"
    assert main(["train", "--config", str(cfg), "--out", str(out), *QUICK, *base]) == 0
    assert main(["train", "--resume", str(out), *more]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iters"] == 8 and summary["completed"] and summary["train_loss"] is not None
    assert _train_losses(out) == want_losses
    got = _weights(out)
    assert got.keys() == want_weights.keys() and all(torch.equal(got[k], want_weights[k]) for k in got)


@pytest.mark.parametrize("more, fragment", [
    ([], "the run is complete (6 steps in 2 phases) and the recipe is unchanged"),
    (["--phases.1.iters", "5"], "cannot extend phase 2 from 3 to 5 steps: its learning rate decays"),
    (["--phases.0.iters", "4", *NEW_PHASE], "phase 1 is complete with 3 steps; the recipe now gives it 4"),
    (["--phases.1.iters", "2", *NEW_PHASE], "phase 2 is complete with 3 steps; the recipe now gives it 2"),
])
def test_what_cannot_extend_is_refused_in_one_line_and_changes_nothing(finished, tmp_path, more, fragment, capsys):
    _, done, _ = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = _files(out)
    assert main(["train", "--resume", str(out), *more]) == 2
    assert fragment in capsys.readouterr().err.strip().splitlines()[-1]
    assert _files(out) == before
