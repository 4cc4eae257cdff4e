"""Loading a file runs no code. Every load path reads safetensors, JSON, TOML or text, or torch.load with
weights_only=True: a pickle payload (an object whose unpickling would create a marker file) planted where a
checkpoint, tokenizer or config is expected is refused, and the marker never appears."""

import ast
import json
from pathlib import Path

import pytest
import torch

import minimax_gpt
from minimax_gpt.__main__ import main
from minimax_gpt.checkpoint import TRAINER_STATE_NAME, load_model, load_trainer_state, resolve_checkpoint
from minimax_gpt.pretrained import SafetensorsReader, from_pretrained
from minimax_gpt.run_config import load_run_config
from minimax_gpt.tokenizer import load_tokenizer
from minimax_gpt.train import train
from train_helpers import write_config

SRC = Path(minimax_gpt.__file__).parent


class Payload:
    """Unpickling this calls open(marker, "w"), creating the file: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, container=lambda p: {"optimizer": p, "progress": {"step": 1}}) -> None:
    torch.save(container(Payload(marker)), path)


def test_payload_would_run_without_weights_only(tmp_path):
    """The control: the planted file does run code when loaded the unsafe way."""
    marker, path = tmp_path / "pwned", tmp_path / "payload.pt"
    _plant(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    out = tmp / "out"
    cfg = write_config(tmp, out)
    train(load_run_config(cfg, ["--train.stop_after", "1", "--train.eval_interval", "0",
                                "--train.sample_tokens", "0"]))
    return tmp, out, cfg


def test_trainer_state_payload_is_refused_by_load_resume_and_cli(run_dir, tmp_path):
    tmp, out, cfg = run_dir
    marker = tmp_path / "pwned"
    state = resolve_checkpoint(out) / TRAINER_STATE_NAME
    original = state.read_bytes()
    try:
        _plant(state, marker)
        with pytest.raises(ValueError, match=r"trainer_state\.pt: refused to load") as info:
            load_trainer_state(out)
        assert str(state) in str(info.value)
        with pytest.raises(ValueError, match="refused to load"):
            train(load_run_config(cfg), resume=True)
        assert main(["train", "--resume", str(out)]) == 2  # the CLI reports it as an error
    finally:
        state.write_bytes(original)
    assert not marker.exists()


def test_pytorch_model_bin_is_never_read(tmp_path):
    """A directory with only a pickled `pytorch_model.bin` (plus config.json) is not a checkpoint for any reader."""
    marker = tmp_path / "pwned"
    directory = tmp_path / "model"
    directory.mkdir()
    _plant(directory / "pytorch_model.bin", marker, container=lambda p: {"model.embed_tokens.weight": p})
    (directory / "config.json").write_text(json.dumps({"vocab_size": 32, "n_layer": 1, "n_head": 1, "n_embd": 8}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SafetensorsReader(directory)  # what from_pretrained and hf.from_hf read weights with
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(directory)
    with pytest.raises(FileNotFoundError):
        load_model(directory)
    assert not marker.exists()


def test_pytorch_model_bin_is_never_read_by_hf_import(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (extra [hf])")
    from minimax_gpt.hf import from_hf

    marker = tmp_path / "pwned"
    directory = tmp_path / "hf"
    directory.mkdir()
    _plant(directory / "pytorch_model.bin", marker, container=lambda p: {"model.embed_tokens.weight": p})
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "minimax", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "intermediate_size": 16, "num_local_experts": 2, "num_experts_per_tok": 1}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_hf(directory)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_or_tokenizer_is_refused(run_dir, tmp_path):
    import shutil

    _, out, _ = run_dir
    marker = tmp_path / "pwned"
    copy = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(out), copy)
    _plant(copy / "model.safetensors", marker)
    with pytest.raises(ValueError, match=r"model\.safetensors: \d+ bytes where .*manifest\.json says"):
        load_model(copy)  # the checkpoint's manifest notices first
    (copy / "manifest.json").unlink()  # a bare model directory, as save_pretrained writes: the reader refuses it
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(copy)
    tok = tmp_path / "tok"
    tok.mkdir()
    _plant(tok / "tokenizer_meta.json", marker)
    with pytest.raises(ValueError, match=r"tokenizer_meta\.json: not a JSON tokenizer description"):
        load_tokenizer(tok)
    (tok / "tokenizer_meta.json").write_text(json.dumps({"kind": "bpe", "vocab_size": 3, "eos_token_id": None}))
    _plant(tok / "tokenizer.json", marker)
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer\.json"):
        load_tokenizer(tok)  # the tokenizers library parses JSON
    assert not marker.exists()


def test_run_config_is_parsed_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.toml"
    path.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(ValueError):  # tomllib.TOMLDecodeError
        load_run_config(path)
    path.write_text(f'[model]\nn_layer = "__import__(\'pathlib\').Path({str(marker)!r}).touch()"\n'
                    '[[phases]]\niters = 1\nseq_len = 8\nbatch_size = 1\nlr = 1e-3\nmin_lr = 0.0\n')
    with pytest.raises(TypeError, match="n_layer must be int"):
        load_run_config(path)
    assert not marker.exists()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else (
                f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else f.attr if isinstance(f, ast.Attribute) else "")
            yield name, node


def test_no_load_path_can_unpickle_or_execute():
    """Static guard over the package: torch.load only with weights_only=True; no pickle / marshal / eval / exec /
    np.load / torch.jit.load / trust_remote_code anywhere."""
    forbidden = {"pickle.load", "pickle.loads", "marshal.loads", "eval", "exec", "np.load", "numpy.load",
                 "load_state_dict_from_url", "yaml.load", "dill.load", "joblib.load"}
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text()
        for name, node in _calls(ast.parse(source)):
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if name in forbidden:
                problems.append(f"{where}: {name}")
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name == "jit.load" or any(k.arg == "trust_remote_code" for k in node.keywords):
                problems.append(f"{where}: {name} runs code from the file")
    assert not problems, problems
