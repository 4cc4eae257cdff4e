"""Every failure of `minimax-gpt` ends in one line on stderr, exit 2 (130 for Ctrl-C), with no traceback unless
--debug or MINIMAX_GPT_DEBUG=1 asks for it; under torchrun the line comes once, from rank 0, whichever rank failed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimax_gpt import __main__ as cli
from minimax_gpt.__main__ import main
from train_helpers import write_config


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"minimax-gpt {command}: "), err
    return lines[-1]


def test_a_base_exception_from_torch_is_one_line(monkeypatch, capsys):
    from torch.distributed.checkpoint.api import CheckpointException

    def fail(args, rest):
        raise CheckpointException("load failed", {0: (ValueError("shard __0_0.distcp is short"), None)})

    monkeypatch.setitem(cli._COMMANDS, "eval", fail)
    assert main(["eval", "--checkpoint", "x"]) == 2
    assert _one_line(capsys, "eval") == "minimax-gpt eval: error: shard __0_0.distcp is short"


def test_an_unexpected_exception_is_named_with_a_hint(monkeypatch, capsys):
    def fail(args, rest):
        raise KeyError("wte.weight")

    monkeypatch.setitem(cli._COMMANDS, "eval", fail)
    assert main(["eval", "--checkpoint", "x"]) == 2
    line = _one_line(capsys, "eval")
    assert line.startswith("minimax-gpt eval: error: KeyError: 'wte.weight'") and "--debug" in line


def test_usage_errors_are_one_line(capsys):
    assert main(["generate", "--checkpoint", "x", "--max-new-tokens", "many"]) == 2
    line = _one_line(capsys, "generate")
    assert "--max-new-tokens: invalid int value: 'many'" in line and "minimax-gpt generate --help" in line
    assert main([]) == 2
    assert "required: command" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["eval", "--checkpoint", str(tmp_path / "missing"), "--debug"])
    monkeypatch.setenv("MINIMAX_GPT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["eval", "--checkpoint", str(tmp_path / "missing")])


def test_the_package_imports_without_torch():
    """`import minimax_gpt` (and the console script's import of minimax_gpt.__main__) does not wait for torch, so a
    Ctrl-C during torch's import happens inside main(), which turns it into the one line."""
    code = "import sys, minimax_gpt, minimax_gpt.__main__; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_ctrl_c_while_torch_is_importing_is_one_line(tmp_path):
    """SIGINT arrives exactly when the command starts importing torch (an import hook sends it)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import builtins, os, signal, sys\n"
        "from minimax_gpt.__main__ import main\n"
        "real_import = builtins.__import__\n"
        "def hook(name, *args, **kwargs):\n"
        "    if name == 'torch' and 'torch' not in sys.modules:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = hook\n"
        "sys.exit(main(['eval', '--checkpoint', 'nowhere']))\n")
    # a shell's background job ignores SIGINT and its children inherit that: give the child the default disposition
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "minimax-gpt eval: interrupted"


def test_ctrl_c_during_training_saves_and_exits_130(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    proc = subprocess.Popen([sys.executable, "-m", "minimax_gpt", "train", "--config", str(cfg),
                             "--phases.*.iters", "100000", "--train.threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped by SIGINT" in err
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("failing", [1, 0])
def test_an_error_on_one_rank_is_printed_once_by_rank_zero(tmp_path, failing):
    """One rank fails in its second step while the other waits for it in the gradient all-reduce: both stop, and the
    one line naming the failing rank's error comes from rank 0 only."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os, sys\n"
        "from minimax_gpt.training import trainer as T\n"
        "original, calls = T._train_step, [0]\n"
        "def step(*args, **kwargs):\n"
        "    calls[0] += 1\n"
        f"    if os.environ['RANK'] == '{failing}' and calls[0] == 2:\n"
        f"        raise ValueError('shard 7 is unreadable (planted on rank {failing})')\n"
        "    return original(*args, **kwargs)\n"
        "T._train_step = step\n"
        "from minimax_gpt.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    from test_safety import _torchrun

    done = _torchrun("train", "--config", str(cfg), "--train.parallel", "ddp", "--train.threads", "1",
                     cwd=tmp_path, script=script)
    ours = [line for line in done.stderr.splitlines() if "minimax-gpt train:" in line]
    assert done.returncode != 0
    who = f"rank {failing}: " if failing else ""
    assert ours == [f"[default0]:minimax-gpt train: error: {who}shard 7 is unreadable (planted on rank {failing})"], \
        done.stderr[-3000:]
    assert "[default0]:Traceback" not in done.stderr and "[default1]:Traceback" not in done.stderr


def test_no_load_path_bypasses_the_safe_dcp_reader():
    """dcp.load and FileSystemReader appear only in minimax_gpt/training/safe_dcp.py, which replaces the unsafe parts."""
    import ast

    src = Path(cli.__file__).parent
    offenders = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
            value = node.value.id if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) else ""
            if (value, name) == ("dcp", "load") or name in ("FileSystemReader", "Unpickler", "load_state_dict_from"):
                offenders.append(f"{path.relative_to(src)}:{node.lineno}: {value + '.' if value else ''}{name}")
    assert all(o.startswith("training/safe_dcp.py:") for o in offenders), offenders
    assert offenders, "the check should see safe_dcp.py's own use"
