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
from minimax_gpt.training.checkpoint import TRAINER_STATE_NAME, load_model, load_trainer_state, resolve_checkpoint
from minimax_gpt.interop.pretrained import SafetensorsReader, from_pretrained
from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.data.tokenizer import load_tokenizer
from minimax_gpt.training.trainer import train
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
    from minimax_gpt.interop.hf import from_hf

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


# --- sharded (DCP) checkpoints --------------------------------------------------------------------------------------
# torch's own DCP reader would run each of these payloads: a whole-file pickle as .metadata, a payload hidden as an
# extra attribute of an otherwise valid Metadata, and a payload as an optimizer param_groups value in a shard (read by
# DefaultLoadPlanner.load_bytes with weights_only=False). The manifest is rewritten to match, as an attacker would.
PAYLOAD_KINDS = ("whole_metadata", "metadata_attribute", "shard_item")


def _torchrun(*args: str, cwd: Path, script: Path | None = None):
    import os
    import subprocess
    import sys

    entry = [str(script)] if script else ["-m", "minimax_gpt"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--tee", "3", *entry, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A 1-step FSDP run on 2 ranks (torchrun): its checkpoint is sharded (post-norm, so that it converts to HF)."""
    tmp = tmp_path_factory.mktemp("sharded")
    out = tmp / "out"
    cfg = write_config(tmp, out)
    done = _torchrun("train", "--config", str(cfg), "--train.parallel", "fsdp", "--train.stop_after", "1",
                     "--model.use_post_layernorm", "true",
                     "--train.eval_interval", "0", "--train.sample_tokens", "0", "--train.threads", "1", cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, out, cfg


def _planted_copy(sharded_run, tmp_path: Path, kind: str, marker: Path) -> tuple[Path, Path]:
    """A copy of the sharded run with `kind` of payload planted; returns (run copy, the planted file)."""
    import pickle
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from minimax_gpt import EnhancedMiniMaxGPT
    from minimax_gpt.training.checkpoint import read_manifest, write_manifest
    from minimax_gpt.interop.pretrained import load_config
    from minimax_gpt.training.safe_dcp import read_metadata
    from minimax_gpt.training.trainer import make_optimizer

    tmp, out, _ = sharded_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    ckpt = resolve_checkpoint(copy)
    manifest = read_manifest(ckpt)
    metadata = ckpt / "distcp" / ".metadata"
    if kind == "whole_metadata":
        metadata.write_bytes(pickle.dumps(Payload(marker)))
        planted = metadata
    elif kind == "metadata_attribute":
        valid = read_metadata(metadata)
        valid.planner_data["x"] = Payload(marker)  # still a Metadata: only the extra item is foreign
        metadata.write_bytes(pickle.dumps(valid))
        planted = metadata
    else:
        model = EnhancedMiniMaxGPT(load_config(ckpt))
        optimizer = make_optimizer(model, load_run_config(tmp / "tiny.toml").train, torch.device("cpu"))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        optim_sd["param_groups"][0]["lr"] = Payload(marker)
        for shard in (ckpt / "distcp").glob("*.distcp"):
            shard.unlink()
        with warnings.catch_warnings():  # "saving in a single process", "overwriting": both intended here
            warnings.simplefilter("ignore")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "distcp"), no_dist=True)
        planted = ckpt / "distcp" / "__0_0.distcp"
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt, manifest["step"], manifest["sharded"])
    return copy, planted


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_sharded_payload_is_refused_by_single_process_resume(sharded_run, tmp_path, kind, capsys):
    marker = tmp_path / "pwned"
    copy, planted = _planted_copy(sharded_run, tmp_path, kind, marker)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(copy), "--train.out_dir", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minimax-gpt train: error: ") and str(planted) in err[-1] and "refused" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not marker.exists()
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["metadata_attribute", "shard_item"])
def test_sharded_payload_is_refused_under_torchrun(sharded_run, tmp_path, kind, parallel):
    marker = tmp_path / "pwned"
    copy, planted = _planted_copy(sharded_run, tmp_path, kind, marker)
    done = _torchrun("train", "--resume", str(copy), "--train.out_dir", str(copy), "--train.parallel", parallel,
                     cwd=tmp_path)
    ours = [line for line in done.stderr.splitlines() if "minimax-gpt train" in line]
    assert done.returncode != 0 and len(ours) == 1, done.stderr[-3000:]
    assert ours[0].startswith("[default0]:minimax-gpt train: error: ") and str(planted) in ours[0]
    assert "[default0]:Traceback" not in done.stderr and "[default1]:Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_eval_generate_and_convert_never_open_the_shards(sharded_run, tmp_path, kind, capsys):
    """They read the consolidated model.safetensors only; with the manifest left as it was, the changed size is
    named instead."""
    marker = tmp_path / "pwned"
    copy, planted = _planted_copy(sharded_run, tmp_path, kind, marker)
    assert main(["eval", "--checkpoint", str(copy), "--max-batches", "1"]) == 0
    assert main(["generate", "--checkpoint", str(copy), "--prompt", "the ", "--max-new-tokens", "2"]) == 0
    model, _ = load_model(copy)
    assert model.num_params() > 0
    ckpt = resolve_checkpoint(copy)
    assert main(["convert", "--to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][planted.relative_to(ckpt).as_posix()] += 1
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(copy)]) == 2
    assert str(planted) in capsys.readouterr().err
    assert not marker.exists()


def test_manifest_names_a_missing_stray_or_resized_piece(sharded_run, tmp_path):
    import shutil

    from minimax_gpt.training.checkpoint import read_manifest

    _, out, _ = sharded_run
    copy = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(out), copy)
    manifest = read_manifest(copy)
    assert manifest["sharded"] == {"format": "torch.distributed.checkpoint", "path": "distcp", "world_size": 2,
                                   "parallel": "fsdp"}
    assert {"distcp/.metadata", "distcp/__0_0.distcp", "distcp/__1_0.distcp", "model.safetensors",
            "trainer_state.pt"} <= set(manifest["files"])
    shard = copy / "distcp" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard}: missing; .*manifest\.json lists it"):
        read_manifest(copy)
    shard.write_bytes(data[:-1])
    with pytest.raises(ValueError, match=rf"{shard}: {len(data) - 1} bytes where .* says {len(data)}"):
        read_manifest(copy)
    shard.write_bytes(data)
    (copy / "distcp" / "__2_0.distcp").write_bytes(b"")
    with pytest.raises(ValueError, match=r"__2_0\.distcp: not part of this checkpoint"):
        read_manifest(copy)


def test_a_plain_checkpoint_with_a_stray_distcp_is_refused(run_dir, tmp_path):
    """The loader follows the manifest: a distcp/ planted next to a plain checkpoint (the layout of
    checkpoint.save_training_checkpoint, and of single-process runs before every run wrote distcp/) is never read, it
    is named."""
    from minimax_gpt.training.checkpoint import read_manifest, save_training_checkpoint

    _, out, _ = run_dir
    model, tokenizer = load_model(out)
    copy = save_training_checkpoint(tmp_path, 1, model, tokenizer, {"progress": {"step": 1}}, {})
    assert read_manifest(copy)["sharded"] is None
    (copy / "distcp").mkdir()
    (copy / "distcp" / ".metadata").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"distcp/\.metadata: not part of this checkpoint"):
        read_manifest(copy)


def test_prepared_data_folder_is_parsed_not_unpickled(run_dir, tmp_path, capsys):
    import pickle
    import shutil

    _, out, cfg = run_dir
    data = tmp_path / "data"
    shutil.copytree(out / "data", data)
    marker = tmp_path / "pwned"
    (data / "meta.json").write_bytes(pickle.dumps(Payload(marker)))
    assert main(["train", "--config", str(cfg), "--prepared", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "meta.json" in err and "Traceback" not in err
    assert not marker.exists()


def _refit_manifest(ckpt: Path) -> None:
    """Rewrite the manifest to the files' new sizes, as someone planting a payload would."""
    from minimax_gpt.training.checkpoint import write_manifest

    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt, manifest["step"], manifest["sharded"])


# (load path, a file it reads): eval and generate also read the tokenizer; convert and from_pretrained do not
PLAIN_LOADS = [(command, planted) for command in ("eval", "generate", "convert_to_hf", "from_pretrained")
               for planted in ("model.safetensors", "config.json", "tokenizer/tokenizer_meta.json")
               if command in ("eval", "generate") or not planted.startswith("tokenizer/")]


@pytest.mark.parametrize("command, planted", PLAIN_LOADS)
def test_every_plain_load_path_refuses_a_payload_naming_the_file(run_dir, tmp_path, command, planted, capsys):
    import shutil

    _, out, _ = run_dir
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(out), ckpt)
    _plant(ckpt / planted, marker)
    _refit_manifest(ckpt)
    argv = {"eval": ["eval", "--checkpoint", str(ckpt)],
            "generate": ["generate", "--checkpoint", str(ckpt), "--prompt", "the "],
            "convert_to_hf": ["convert", "--to-hf", str(ckpt), str(tmp_path / "hf")]}.get(command)
    if argv is None:
        with pytest.raises(ValueError, match=str(ckpt / planted)):
            from_pretrained(ckpt)
    else:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(ckpt / planted) in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("planted", ["config.json", "model.safetensors"])
def test_hf_import_refuses_a_payload_naming_the_file(tmp_path, planted, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed (extra [hf])")
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "minimax", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "intermediate_size": 16, "num_local_experts": 2, "num_experts_per_tok": 1}))
    save_file({"model.embed_tokens.weight": torch.zeros(32, 16)}, str(directory / "model.safetensors"))
    _plant(directory / planted, marker)
    assert main(["convert", "--from-hf", str(directory), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert str(directory / planted) in err and "Traceback" not in err
    assert not marker.exists()
