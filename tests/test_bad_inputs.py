"""The bad-input matrix: every row runs the `minimax-gpt` CLI in-process on one bad input and asserts that it fails
the way a user can act on: exit code 2, stderr ending in one line `minimax-gpt <cmd>: error: <what and how to fix>`
that holds the expected fragment, no traceback, and every file that was there before is still there, unchanged."""

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.__main__ import main
from minimax_gpt.training.checkpoint import resolve_checkpoint, save_checkpoint
from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.data.tokenizer import build_tokenizer
from minimax_gpt.training.trainer import train
from train_helpers import TEXT, write_config

LEARNED_BLOCK = 16  # block_size of the learned-position checkpoint


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The fixtures every row reads (never writes): a tiny trained run (char tokenizer, MoE, rotary positions), a
    learned-position checkpoint with block_size 16, an exportable (post-norm) model directory without a tokenizer,
    and small data files."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    out = tmp / "run"
    cfg = write_config(tmp, out)
    train(load_run_config(cfg, ["--train.stop_after", "1", "--train.eval_interval", "0",
                                "--train.sample_tokens", "0"]))
    tokenizer = build_tokenizer("char", text=TEXT)
    torch.manual_seed(0)
    learned = EnhancedMiniMaxGPT(MiniMaxConfig(
        vocab_size=tokenizer.vocab_size, block_size=LEARNED_BLOCK, n_layer=1, n_head=2, n_embd=16,
        intermediate_size=32, use_hybrid_attn=False, pos_embedding="learned", rotary_dim=0))
    save_checkpoint(tmp / "learned", learned, tokenizer)
    exportable = EnhancedMiniMaxGPT(MiniMaxConfig(
        vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, intermediate_size=32, hybrid_period=2,
        lightning_chunk_size=8, use_post_layernorm=True))
    exportable.save_pretrained(tmp / "exportable")
    files = tmp / "files"
    files.mkdir()
    (files / "empty.txt").write_text("")
    (files / "one_byte.txt").write_text("t")
    (files / "short.txt").write_text(TEXT[:40])
    (files / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    (files / "unknown_chars.txt").write_text("ZEBRA QUAGGA XYLOPHONE " * 20)
    (files / "empty_folder").mkdir()
    return SimpleNamespace(tmp=tmp, out=out, cfg=cfg, ckpt=resolve_checkpoint(out), learned=tmp / "learned",
                           exportable=tmp / "exportable", files=files, corpus=tmp / "corpus.txt")


# --- argv builders: (w, tmp) -> argv; tmp is the row's own folder (also the working directory) ----------------------
def _train(w, tmp, *extra):
    return ["train", "--config", str(w.cfg), "--out", str(tmp / "out"), *extra]


def _generate(checkpoint, *extra, prompt="the "):
    return ["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, *extra]


def _edited_config(w, tmp, old, new):
    path = tmp / "edited.toml"
    path.write_text(w.cfg.read_text().replace(old, new))
    assert path.read_text() != w.cfg.read_text()
    return ["train", "--config", str(path), "--out", str(tmp / "out")]


def _written(tmp, name, content):
    path = tmp / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _checkpoint_copy(w, tmp, edit=None, source=None):
    """A copy of the trained run's checkpoint (or of `source`) with `edit(copy)` applied."""
    copy = tmp / "ckpt"
    shutil.copytree(source or w.ckpt, copy)
    if edit is not None:
        edit(copy)
    return copy


def _replace(path, old, new):
    """Edit a file without changing its size (so that a checkpoint manifest's size check lets it through to its
    reader)."""
    assert len(old) == len(new)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _garble(path):
    """Zero the second half of a file, keeping its size (a manifest's size check lets it through to its reader)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))


def _run_copy(w, tmp, edit):
    """A copy of the whole trained run directory with `edit(copy)` applied (its saved run config still names the
    shared run's out_dir, which the snapshot guards)."""
    copy = tmp / "run"
    shutil.copytree(w.out, copy)
    edit(copy)
    return copy


def _non_empty(folder):
    folder.mkdir(exist_ok=True)
    (folder / "keep.txt").write_text("not ours to replace")
    return folder


ROWS = [
    # --- config keys and values ---------------------------------------------------------------------------------
    ("train: unknown key in the TOML file", lambda w, t: _edited_config(w, t, "n_layer = 2", "n_layers = 2"),
     "unknown key 'model.n_layers'"),
    ("train: mistyped key on the command line", lambda w, t: _train(w, t, "--train.lrate", "1e-3"),
     "unknown key 'train.lrate'"),
    ("train: value of the wrong type", lambda w, t: _train(w, t, "--model.n_layer", "two"),
     "n_layer must be int"),
    ("train: value not among the allowed ones", lambda w, t: _train(w, t, "--train.precision", "fp8"),
     "train.precision is 'fp8'; allowed: auto, fp32, bf16, fp16"),
    ("train: TOML syntax error", lambda w, t: ["train", "--config", _written(t, "broken.toml", "[model\nn_layer=2")],
     "broken.toml: not valid TOML"),
    ("train: config that does not exist", lambda w, t: ["train", "--config", str(t / "nope.toml")],
     "is neither a file nor a packaged config"),
    # --- impossible shapes ----------------------------------------------------------------------------------------
    ("train: heads do not divide the width", lambda w, t: _train(w, t, "--model.n_head", "3"),
     "n_embd (16) must be divisible by n_head (3)"),
    ("train: top-k above the number of experts", lambda w, t: _train(w, t, "--model.moe_top_k", "5"),
     "moe_top_k (5) must be <= num_experts (4)"),
    ("train: zero layers", lambda w, t: _train(w, t, "--model.n_layer", "0"), "n_layer must be >= 1, got 0"),
    ("train: zero-length phase", lambda w, t: _train(w, t, "--phases.0.seq_len", "0"),
     "phase seq_len must be >= 1, got 0"),
    ("train: phases shortened below their warm-up", lambda w, t: _train(w, t, "--phases.*.warmup_iters", "5"),
     "when shortening phases lower it too (e.g. --phases.*.iters 3 --phases.*.warmup_iters 1)"),
    # --- data files -----------------------------------------------------------------------------------------------
    ("train: missing data file", lambda w, t: _train(w, t, "--data", str(t / "nope.txt")), "does not exist"),
    ("train: empty data file", lambda w, t: _train(w, t, "--data", str(w.files / "empty.txt")), "no text"),
    ("train: 1-byte data file", lambda w, t: _train(w, t, "--data", str(w.files / "one_byte.txt")),
     "one_byte.txt: 1 tokens are too few to split"),
    ("train: data shorter than one sequence", lambda w, t: _train(w, t, "--data", str(w.files / "short.txt")),
     "fewer than one sequence of seq_len + 1 = 17"),
    ("train: binary data file", lambda w, t: _train(w, t, "--data", str(w.files / "binary.txt")),
     "binary.txt: invalid UTF-8 at byte offset 0"),
    ("train: data folder without text", lambda w, t: _train(w, t, "--data", str(w.files / "empty_folder")),
     "no text found"),
    ("prepare: empty data file", lambda w, t: ["prepare", "--data", str(w.files / "empty.txt"), "--out", str(t / "p")],
     "no text"),
    ("prepare: binary data file",
     lambda w, t: ["prepare", "--data", str(w.files / "binary.txt"), "--out", str(t / "p")], "invalid UTF-8"),
    ("prepare: unknown tokenizer",
     lambda w, t: ["prepare", "--data", str(w.corpus), "--out", str(t / "p"), "--tokenizer", "words"],
     "tokenizer kind must be one of"),
    ("prepare: val fraction of 1",
     lambda w, t: ["prepare", "--data", str(w.corpus), "--out", str(t / "p"), "--val-fraction", "1"],
     "val_fraction must be in [0, 1)"),
    # --- resume ---------------------------------------------------------------------------------------------------
    ("train: resume from a folder that is not a run",
     lambda w, t: ["train", "--resume", str(_non_empty(t / "elsewhere"))], "is neither a checkpoint"),
    ("train: resume with a changed architecture",
     lambda w, t: ["train", "--resume", str(w.out), "--model.n_embd", "32"],
     "incompatible with this run's: head_dim"),
    ("train: resume where latest names no checkpoint",
     lambda w, t: ["train", "--resume", str(_run_copy(w, t, lambda c: (c / "checkpoints" / "latest").write_text(
         "step-000999\n")))], "names step-000999, which is not a complete checkpoint"),
    ("train: resume from a corrupted trainer_state.pt",
     lambda w, t: ["train", "--resume", _run_copy(w, t, lambda c: _garble(resolve_checkpoint(c) / "trainer_state.pt"))],
     "trainer_state.pt: truncated or corrupted"),
    ("train: resume from a run whose run_config.json is not JSON",
     lambda w, t: ["train", "--resume",
                   str(_run_copy(w, t, lambda c: _garble(resolve_checkpoint(c) / "run_config.json")))],
     "run_config.json: not valid JSON"),
    # --- checkpoints as data --------------------------------------------------------------------------------------
    ("eval: missing checkpoint", lambda w, t: ["eval", "--checkpoint", str(t / "nope")], "is neither a checkpoint"),
    ("eval: truncated model.safetensors",
     lambda w, t: ["eval", "--checkpoint", _checkpoint_copy(w, t, lambda c: _truncate(c / "model.safetensors"))],
     "ckpt/model.safetensors: "),
    ("eval: config.json that is not JSON",
     lambda w, t: ["eval", "--checkpoint", _checkpoint_copy(w, t, lambda c: _replace(c / "config.json", "{", "#"))],
     "ckpt/config.json: not valid JSON"),
    ("eval: config.json with an unknown field",
     lambda w, t: ["eval", "--checkpoint", _checkpoint_copy(
         w, t, lambda c: _replace(c / "config.json", '"n_layer"', '"n_layez"'))],
     "ckpt/config.json: unknown MiniMaxConfig field(s): n_layez"),
    ("generate: truncated model.safetensors of a model folder",
     lambda w, t: _generate(_checkpoint_copy(w, t, lambda c: _truncate(c / "model.safetensors", 0.1),
                                             source=w.exportable)),
     "ckpt/model.safetensors: not a readable safetensors file"),
    ("generate: empty model.safetensors of a model folder",
     lambda w, t: _generate(_checkpoint_copy(w, t, lambda c: (c / "model.safetensors").write_bytes(b""),
                                             source=w.exportable)),
     "ckpt/model.safetensors: not a readable safetensors file"),
    ("generate: checkpoint without a tokenizer", lambda w, t: _generate(w.exportable),
     "has no tokenizer/ directory"),
    # --- eval arguments -------------------------------------------------------------------------------------------
    ("eval: --batch-size 0", lambda w, t: ["eval", "--checkpoint", str(w.out), "--batch-size", "0"],
     "batch_size must be >= 1, got 0"),
    ("eval: negative --batch-size", lambda w, t: ["eval", "--checkpoint", str(w.out), "--batch-size", "-4"],
     "batch_size must be >= 1, got -4"),
    ("eval: --seq-len 0", lambda w, t: ["eval", "--checkpoint", str(w.out), "--seq-len", "0"],
     "seq_len must be >= 1, got 0"),
    ("eval: --max-batches 0", lambda w, t: ["eval", "--checkpoint", str(w.out), "--max-batches", "0"],
     "max_batches must be >= 1, got 0"),
    ("eval: --seq-len beyond learned positions",
     lambda w, t: ["eval", "--checkpoint", str(w.learned), "--data", str(w.corpus), "--seq-len", "64"],
     f"seq_len 64 exceeds block_size {LEARNED_BLOCK}"),
    ("eval: missing --data file", lambda w, t: ["eval", "--checkpoint", str(w.out), "--data", str(t / "nope.txt")],
     "does not exist"),
    ("eval: binary --data file",
     lambda w, t: ["eval", "--checkpoint", str(w.out), "--data", str(w.files / "binary.txt")],
     "invalid UTF-8"),
    ("eval: --data the tokenizer cannot encode",
     lambda w, t: ["eval", "--checkpoint", str(w.out), "--data", str(w.files / "unknown_chars.txt")],
     "unknown_chars.txt: char tokenizer: character 'Z' (U+005A) is not in the vocabulary"),
    ("eval: 1-byte --data file",
     lambda w, t: ["eval", "--checkpoint", str(w.out), "--data", str(w.files / "one_byte.txt")],
     "one_byte.txt: 1 tokens are too few to split"),
    # --- sampling arguments ---------------------------------------------------------------------------------------
    ("generate: --max-new-tokens 0", lambda w, t: _generate(w.out, "--max-new-tokens", "0"),
     "--max-new-tokens must be >= 1, got 0"),
    ("generate: negative --max-new-tokens", lambda w, t: _generate(w.out, "--max-new-tokens", "-5"),
     "--max-new-tokens must be >= 1, got -5"),
    ("generate: negative --temperature", lambda w, t: _generate(w.out, "--temperature", "-0.5"),
     "--temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    ("generate: --temperature nan", lambda w, t: _generate(w.out, "--temperature", "nan"),
     "--temperature must be a finite number >= 0"),
    ("generate: --top-p 0", lambda w, t: _generate(w.out, "--top-p", "0"), "--top-p must be in (0, 1], got 0.0"),
    ("generate: --top-p above 1", lambda w, t: _generate(w.out, "--top-p", "1.5"),
     "--top-p must be in (0, 1], got 1.5"),
    ("generate: --top-k 0", lambda w, t: _generate(w.out, "--top-k", "0"), "--top-k must be >= 1, got 0"),
    ("generate: negative --top-k", lambda w, t: _generate(w.out, "--top-k", "-3"), "--top-k must be >= 1, got -3"),
    ("generate: empty prompt", lambda w, t: _generate(w.out, prompt=""), "--prompt is empty"),
    ("generate: prompt the tokenizer cannot encode", lambda w, t: _generate(w.out, prompt="Zebra"),
     "character 'Z' (U+005A) is not in the vocabulary"),
    ("generate: prompt longer than learned positions",
     lambda w, t: _generate(w.learned, prompt=TEXT[:LEARNED_BLOCK]),
     f"the prompt is {LEARNED_BLOCK} tokens; this model's learned positions take at most {LEARNED_BLOCK - 1}"),
    ("generate: sampling arguments are checked before the checkpoint",
     lambda w, t: _generate(t / "nope", "--top-p", "2"), "--top-p must be in (0, 1], got 2.0"),
    ("generate: missing checkpoint", lambda w, t: _generate(t / "nope"), "is neither a checkpoint"),
    # --- convert --------------------------------------------------------------------------------------------------
    ("convert: into a non-empty folder",
     lambda w, t: ["convert", "--to-hf", str(w.exportable), str(_non_empty(t / "hf"))],
     "hf is not empty; pass --overwrite to replace it"),
    ("convert: into the non-empty current folder",
     lambda w, t: ["convert", "--to-hf", w.exportable, _non_empty(t).relative_to(t).as_posix()],
     ". is not empty; pass --overwrite to replace it"),
    ("convert: --to-hf from a truncated model.safetensors",
     lambda w, t: ["convert", "--to-hf", str(_checkpoint_copy(w, t, lambda c: _truncate(c / "model.safetensors"),
                                                              source=w.exportable)), str(t / "hf")],
     "model.safetensors: not a readable safetensors file"),
    ("convert: --from-hf a missing folder", lambda w, t: ["convert", "--from-hf", str(t / "nope"), str(t / "ours")],
     "nope/config.json not found: not a Hugging Face MiniMax model folder"),
    ("convert: --from-hf config.json that is not JSON",
     lambda w, t: ["convert", "--from-hf", _written(_non_empty(t / "hf"), "config.json", '{"model_type": ').parent,
                   t / "ours"], "hf/config.json: not valid JSON"),
]


def _snapshot(*roots):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row, w, tmp_path, monkeypatch, capsys):
    _, build, fragment = row
    monkeypatch.chdir(tmp_path)
    argv = [str(a) for a in build(w, tmp_path)]
    before = _snapshot(w.tmp, tmp_path)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == "", out  # nothing printed before the error (generate echoes the prompt only once it runs)
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"minimax-gpt {argv[0]}: error: "), err
    assert fragment in last, last
    after = _snapshot(w.tmp, tmp_path)
    changed = sorted(str(p) for p, digest in before.items() if after.get(p) != digest)
    assert not changed, f"changed or vanished: {changed}"


def test_convert_overwrite_replaces_the_current_folder(w, tmp_path, monkeypatch, capsys):
    """The refused row's way out: --overwrite replaces OUT as a whole, also when OUT is "." (the working directory),
    and leaves no temporary or moved-aside sibling (`..tmp-*`, `..old-*`) inside it or next to it."""
    work = _non_empty(tmp_path / "work")
    monkeypatch.chdir(work)
    assert main(["convert", "--to-hf", str(w.exportable), ".", "--overwrite"]) == 0
    names = {p.name for p in work.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and "keep.txt" not in names
    assert not any(name.startswith(".") for name in names)
    assert [p.name for p in tmp_path.iterdir()] == ["work"]
