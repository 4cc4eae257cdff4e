"""The `minimax-gpt` console script, in-process: train writes every output; generate and eval print; unknown keys
are errors naming the key; the packaged configs parse and the repository's configs/ are identical copies."""

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from minimax_gpt import MiniMaxConfig
from minimax_gpt.__main__ import build_parser, main
from minimax_gpt.data.dataset import prepare
from minimax_gpt.training.run_config import load_run_config, packaged_configs
from train_helpers import write_config, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "out"
    config = write_config(tmp, tmp / "unused")
    code = main(["train", "--config", str(config), "--out", str(out), "--train.tensorboard", "true"])
    assert code == 0
    return tmp, out


def test_train_writes_every_output(trained, capsys):
    tmp, out = trained
    for name in ("metrics.jsonl", "summary.json", "loss.png", "sample.txt", "checkpoints/latest"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_loss", "train_loss", "iters", "tokens_seen", "tokens_per_second", "wall_seconds", "params",
                "active_params"):
        assert summary[key] is not None, key
    assert summary["iters"] == 6 and 0 < summary["active_params"] < summary["params"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sample.txt").read_text().startswith("the ")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == 6
    assert len(train_records[0]["moe_expert_load"]) == 2  # one load vector per MoE layer
    assert train_records[0]["moe_dropped_fraction"] == 0.0
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert not (out / "tensorboard").exists()
    else:
        assert any((out / "tensorboard").iterdir())


def test_generate_prints_text(trained, capsys):
    _, out = trained
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the ", "--max-new-tokens", "20",
                 "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the ") and len(text) > len("the ") + 5
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the ", "--max-new-tokens", "20",
                 "--seed", "1", "--top-k", "5", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out == text  # seeded: reproducible


def test_generate_compiled_step_prints_the_eager_text(trained, capsys):
    _, out = trained
    capsys.readouterr()
    texts = []
    for mode in ("off", "on"):
        assert main(["generate", "--checkpoint", str(out), "--prompt", "the ", "--max-new-tokens", "12",
                     "--temperature", "0", "--compile", mode]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > len("the ") + 5


def test_eval_prints_loss_and_perplexity(trained, capsys):
    tmp, out = trained
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 0  # the run's validation split
    line = capsys.readouterr().out
    assert "loss" in line and "perplexity" in line
    loss = float(line.split()[1])
    summary = json.loads((out / "summary.json").read_text())
    assert loss == pytest.approx(summary["val_loss"], rel=0.05)  # the run's settings: equal (test_train)
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "step-000003"),
                 "--data", str(write_corpus(tmp)), "--max-batches", "3"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_says_which_batches_it_used(trained, capsys, caplog):
    _, out = trained
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="minimax_gpt"):
        assert main(["eval", "--checkpoint", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert captured.out.startswith(f"loss {summary['val_loss']:.4f}  perplexity {summary['val_ppl']:.3f}  ")
    assert (f"(2 batches of 2 x 16 windows spread over the validation split of {out / 'data'}, 64 tokens)"
            in captured.out)  # the last phase's batch_size x seq_len, train.eval_batches = 2
    assert ("the run's settings: phases.1.batch_size 2, phases.1.seq_len 16, train.eval_batches 2, "
            "train.precision auto (fp32 here)" in caplog.text)  # logged: on stderr
    assert main(["eval", "--checkpoint", str(out), "--max-batches", "all", "--batch-size", "8"]) == 0
    line = capsys.readouterr().out  # 444 validation tokens: 27 windows of 16 (and the next token)
    assert f"(every window of the validation split of {out / 'data'}: 4 batches of 8 x 16 windows, 432 tokens)" in line
    assert main(["eval", "--checkpoint", str(out), "--max-batches", "many"]) == 2
    assert "argument --max-batches: expected a number or all, got 'many'" in capsys.readouterr().err


def test_resume_from_cli(tmp_path):
    config = write_config(tmp_path, tmp_path / "out")
    assert main(["train", "--config", str(config), "--train.stop_after", "2"]) == 0
    assert main(["train", "--resume", str(tmp_path / "out")]) == 0  # the saved run config, without --config
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["iters"] == 6 and summary["completed"]


def test_unknown_key_in_file_is_named(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "out")
    config.write_text(config.read_text().replace("n_layer = 2", "n_layers = 2"))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.n_layers" in err and str(config) in err
    with pytest.raises(ValueError, match="train.lrate"):
        load_run_config(write_config(tmp_path, tmp_path / "o"), ["--train.lrate", "1"])


@pytest.mark.parametrize("flag", ["--model.n_layerz", "--phases.0.itres", "--optim.lr", "--train.seedd=3"])
def test_unknown_key_on_command_line_is_named(tmp_path, capsys, flag):
    config = write_config(tmp_path, tmp_path / "out")
    args = ["train", "--config", str(config), flag] + ([] if "=" in flag else ["4"])
    assert main(args) == 2
    assert flag[2:].split("=")[0] in capsys.readouterr().err


def test_overrides_are_typed(tmp_path):
    run = load_run_config(write_config(tmp_path, tmp_path / "out"),
                          ["--model.n_layer", "3", "--train.precision=bf16", "--phases.*.lr", "1e-2",
                           "--train.stop_after", "none", "--model.layer_types", '["softmax","lightning","softmax"]'])
    assert run.model["n_layer"] == 3 and run.train.precision == "bf16"
    assert [p.lr for p in run.phases] == [1e-2, 1e-2] and run.train.stop_after is None
    with pytest.raises(TypeError, match="train.seed"):
        load_run_config(write_config(tmp_path, tmp_path / "out"), ["--train.seed", "abc"])


def test_packaged_configs_parse_and_match_repository_copies():
    names = packaged_configs()
    assert {"default", "shakespeare_char_cpu", "shakespeare_char_cpu_hybrid", "minimax_200k"} <= set(names)
    for name in names:
        load_run_config(name)
        packaged = REPO / "src" / "minimax_gpt" / "configs" / f"{name}.toml"
        copy = REPO / "configs" / f"{name}.toml"
        assert copy.read_text() == packaged.read_text(), f"configs/{name}.toml differs from the packaged copy"
    default = load_run_config(None)
    assert default.model["use_moe"] and default.model["hybrid_period"] == 2 and default.train.data is None


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "minimax_gpt", "train", "--print-config", "--model.n_layer", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["n_layer"] == 2


def test_every_option_says_what_it_does_and_its_default(capsys):
    """Every option of every subcommand has help text; one that takes a value and may be left out says what it
    defaults to, and a default value is printed as "(default: VALUE)"."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == {"train", "eval", "generate", "prepare", "convert", "recall"}
    for name, sub in subcommands.items():
        assert sub.description, name
        one_required = {a for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
        formatter = sub._get_formatter()
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main([name, "--help"])
        printed = " ".join(capsys.readouterr().out.split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action) if action.help else ""
            where = f"{name} {action.option_strings or action.dest}"
            assert text.strip(), f"{where} has no help"
            assert " ".join(text.split()) in printed, where
            if action.default not in (None, False):
                assert f"(default: {action.default})" in text, f"{where} does not show its default"
            elif action.nargs != 0 and action.option_strings and not action.required and action not in one_required:
                assert "(default: " in text, f"{where} does not say what happens without it"


def test_print_config_shows_every_model_field_resolved_and_marks_the_derived_ones(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "out")  # char tokenizer; [model] sets intermediate_size
    assert main(["train", "--config", str(config), "--print-config", "--model.n_kv_head", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["n_embd"] == 16 and "head_dim" not in printed["model"]  # as given
    resolved = printed["model_resolved"]
    fields = [f.name for f in dataclasses.fields(MiniMaxConfig) if not f.name.startswith("_")]
    assert list(resolved) == fields
    assert printed["model_derived"] == ["vocab_size", "block_size", "head_dim", "rotary_dim", "layer_types"]
    assert resolved["block_size"] == 16  # the longest phase's seq_len
    assert (resolved["head_dim"], resolved["rotary_dim"], resolved["n_kv_head"]) == (8, 8, 1)
    assert resolved["intermediate_size"] == 32 and resolved["layer_types"] == ["lightning", "softmax"]
    assert resolved["vocab_size"] == "the tokenizer's, known at train time"  # char: it depends on the text
    assert (printed["train"], printed["phases"]) == (load_run_config(config).to_dict()["train"],
                                                     load_run_config(config).to_dict()["phases"])
    assert main(["train", "--print-config"]) == 0  # the default config: the bytes tokenizer has 256
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_resolved"]["vocab_size"] == ("the tokenizer's, known at train time (256 for the bytes "
                                                       "tokenizer)")
    assert "intermediate_size" not in printed["model_derived"] and printed["model_resolved"]["head_dim"] == 32
    assert main(["train", "--print-config", "--model.vocab_size", "300"]) == 0  # set: not derived
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_resolved"]["vocab_size"] == 300 and "vocab_size" not in printed["model_derived"]
    prepare(write_corpus(tmp_path), tmp_path / "prepared", tokenizer_kind="char")
    assert main(["train", "--print-config", "--prepared", str(tmp_path / "prepared")]) == 0  # its meta.json says
    vocab = json.loads((tmp_path / "prepared" / "meta.json").read_text())["vocab_size"]
    assert json.loads(capsys.readouterr().out)["model_resolved"]["vocab_size"] == (
        f"the tokenizer's, known at train time ({vocab} in {tmp_path / 'prepared'})")


def test_prepare_command(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    assert main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "prep"), "--tokenizer", "char"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["tokenizer"] == "char" and (tmp_path / "prep" / "train.bin").is_file()
