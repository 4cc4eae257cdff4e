"""`minimax-gpt` (or `python -m minimax_gpt`): prepare, train, eval, generate, convert. Parsing only; the work is in the library.

    minimax-gpt train                                         the embedded default: hybrid MoE on the stdlib sources
    minimax-gpt train --config shakespeare_char_cpu --data input.txt --train.out_dir out/shakespeare
    minimax-gpt train --config my.toml --model.n_layer 4 --phases.0.iters 100 --train.lr...
    minimax-gpt train --resume [OUT_OR_CHECKPOINT]            continue a run (its saved config unless --config)
    minimax-gpt generate --checkpoint out --prompt "def "
    minimax-gpt eval --checkpoint out [--data PATH]
    minimax-gpt prepare --data PATH --out DIR --tokenizer bpe --vocab-size 4096
    minimax-gpt convert --from-hf HF_DIR OUT | --to-hf OUR_DIR OUT     Hugging Face MiniMax checkpoints in and out
    minimax-gpt recall [--out DIR] [--seq-lens 64,128] [--seeds 0,1,2]    MQAR accuracy of each layout (docs/recall.md)
    minimax-gpt recall --checkpoint out                       passkey retrieval at 1x, 2x, 4x the training length
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys



class _UsageError(ValueError):
    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see {prog} --help)")
        self.command = prog.removeprefix("minimax-gpt").strip()


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error raises (and so ends in the command's one line) instead of printing the
    usage and exiting."""

    def error(self, message: str):
        raise _UsageError(self.prog, message)


def main(argv: list[str] | None = None) -> int:
    """The command line; every failure ends in one line on stderr (minimax_gpt.cli_errors): exit 2 for an error,
    130 for Ctrl-C, 143 for SIGTERM. `--debug` anywhere (or MINIMAX_GPT_DEBUG=1) shows the traceback instead."""
    from minimax_gpt import cli_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli_errors.debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), "")
    previous = cli_errors.raise_on_sigterm()
    try:
        return _main(argv)
    except SystemExit:  # --help
        raise
    except BaseException as e:
        if debug:
            raise
        return cli_errors.report(getattr(e, "command", None) or command or "", e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help followed by "(default: VALUE)", unless the text already says its default (options whose
    default is None or off say in words what happens without them)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The `minimax-gpt` parser with every subcommand; every option has a help text that gives its default."""
    parser = _Parser(prog="minimax-gpt", description=__doc__.split("\n")[0],
                     epilog="--debug (with any command) or MINIMAX_GPT_DEBUG=1: show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_generate, _add_prepare, _add_recall):
        add(sub)
    from minimax_gpt.interop.hf import add_convert_parser

    add_convert_parser(sub)
    for p in sub.choices.values():
        p.formatter_class = _HelpFormatter
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config (default: the embedded default config)",
                       description="Train. Any config field is overridable with dotted flags: --model.n_layer 4, "
                                   "--train.precision bf16, --phases.0.iters 100, --phases.*.lr 3e-4.")
    p.add_argument("--config", help="a TOML file or packaged config name: default, shakespeare_char_cpu, "
                                    "shakespeare_char_cpu_hybrid, minimax_200k (default: the embedded default "
                                    "config; with --resume, the run's saved config)")
    p.add_argument("--data", help="text file, folder, .jsonl or .parquet to train on; sets train.data (default: the "
                                  "config's, and for the default config this interpreter's standard-library sources)")
    p.add_argument("--prepared", help="a directory written by `minimax-gpt prepare`, used instead of --data; sets "
                                      "train.prepared (default: the config's, else --data is prepared into OUT/data)")
    p.add_argument("--out", help="output directory; sets train.out_dir (default: the config's, 'out' for the "
                                 "default config)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue from the latest checkpoint of the output directory, or of DIR (default: start a "
                        "new run)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON, with the model's derived fields, and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="train a fresh run into a folder that holds one: the old run is moved to a sibling "
                        "<folder>.old-<time> first (nothing is deleted)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint",
                       description="Loss and perplexity of a checkpoint. By default on the run's validation split "
                                   "with the run's own evaluation settings (the batch shape of the checkpoint's "
                                   "phase, train.eval_batches batches spread over the split, train.precision), so "
                                   "a finished run's final checkpoint gives summary.json's val_loss exactly.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or training output directory")
    p.add_argument("--data", help="text file, folder, .jsonl or .parquet (default: the run's validation split)")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: the batch_size of the run's phase "
                                                  "that wrote the checkpoint: the last phase for a finished run)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: that phase's seq_len)")
    p.add_argument("--max-batches", type=_count_or_all, metavar="N|all",
                   help="evaluate at most N batches, their windows spread evenly over the data; all: every window "
                        "(default: the run's train.eval_batches on its validation split, as training evaluated it; "
                        "all with --data)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="fp32, bf16 (autocast), fp16 (CUDA), or auto: bf16 on CUDA with bf16 support, else fp32 "
                        "(default: the run's train.precision)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream text from a checkpoint",
                       description="Continue --prompt with text sampled from a checkpoint (which needs its "
                                   "tokenizer/), printed as it is produced.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or training output directory")
    p.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only (default: all tokens)")
    p.add_argument("--top-p", type=float,
                   help="sample from the fewest most likely tokens whose probabilities reach p (default: off)")
    p.add_argument("--seed", type=int, help="seed of the sampling, for reproducible text (default: unseeded)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="decode with a torch.compile'd static step: on, off, or auto (when it pays: from 4096 new "
                        "tokens; compiling takes seconds)")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize data once into memory-mapped token files",
                       description="Tokenize data once into --out: train.bin, val.bin (the last --val-fraction of "
                                   "the tokens), tokenizer/ and meta.json; `minimax-gpt train --prepared DIR` trains "
                                   "from it.")
    p.add_argument("--data", help="text file, folder, .jsonl or .parquet (default: the stdlib corpus)")
    p.add_argument("--out", required=True, help="directory to write train.bin, val.bin, tokenizer/ and meta.json to")
    p.add_argument("--tokenizer", default="bytes", help="bytes, char, bpe, tiktoken or hf")
    p.add_argument("--vocab-size", type=int, help="size of the BPE to train; required by --tokenizer bpe, for other "
                                                  "tokenizers a check (default: the tokenizer's own size)")
    p.add_argument("--tokenizer-path", help="tiktoken encoding name or .tiktoken file, or hf tokenizer directory; "
                                            "required by --tokenizer tiktoken and hf (default: none)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the last fraction of the tokens, held out as the validation split")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is not empty and not data prepared from this source with these "
                        "settings (without it such a folder is refused and left as it is)")


def _add_recall(sub) -> None:
    p = sub.add_parser("recall", help="MQAR recall of each layout, or passkey retrieval of a checkpoint",
                       description="Train small models of each layout (equal width and depth: all softmax, all "
                                   "lightning, 7:1 and 3:1 hybrids, and any named in --config or --layout) on "
                                   "multi-query associative recall under one budget; write DIR/recall.json and "
                                   "DIR/recall.png (accuracy against sequence length). With --checkpoint: passkey "
                                   "retrieval of a trained checkpoint at 1x, 2x and 4x its training length.")
    p.add_argument("--out", default="out/recall", help="directory for recall.json and recall.png")
    p.add_argument("--config", help="a TOML recall budget: RecallBudget fields, [recipe], [layouts] (default: the "
                                    "packaged budget, 17 minutes measured on one CPU core)")
    p.add_argument("--layouts", type=_names, help="only these layouts, comma-separated (default: all four; also "
                                                  "built in: sparse-7-1, and NAME-conv for a short convolution in "
                                                  "NAME's lightning layers, e.g. hybrid-7-1-conv)")
    p.add_argument("--layout", action="append", metavar="NAME=TYPE,...",
                   help="add a layout, e.g. mine=lightning,lightning,softmax,...; repeatable (default: none)")
    p.add_argument("--seq-lens", type=_ints, help="MQAR sequence lengths, comma-separated (default: the budget's)")
    p.add_argument("--seeds", type=_ints, help="seeds, comma-separated (default: the budget's)")
    p.add_argument("--steps", type=int, help="training steps per model (default: the budget's)")
    p.add_argument("--n-pairs", type=int, help="key-value pairs per sequence (default: seq_len // 16)")
    p.add_argument("--stage-steps", type=int, help="staged context extension: the shortest length trains with the "
                                                   "recipe, each longer one continues the model before it for this "
                                                   "many steps (default: a fresh model per length)")
    p.add_argument("--save-models", action="store_true", help="write every trained model to DIR/models/")
    p.add_argument("--checkpoint", help="passkey retrieval of this checkpoint or training output directory instead "
                                        "(default: none, train and measure the layouts on MQAR)")
    p.add_argument("--trials", type=int, default=4, help="with --checkpoint: passkeys per depth and length")
    p.add_argument("--device", default="auto", help="with --checkpoint: auto, cpu, cuda or cuda:N")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _count_or_all(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or all, got {text!r}") from None


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return _COMMANDS[args.command](args, rest)


def _train(args, overrides: list[str]) -> int:
    from minimax_gpt.training.checkpoint import load_saved_run_config, resolve_checkpoint
    from minimax_gpt.training.run_config import load_run_config
    from minimax_gpt.training.runfolder import run_folder_of
    from minimax_gpt.training.trainer import train

    for flag, key in (("data", "train.data"), ("prepared", "train.prepared"), ("out", "train.out_dir")):
        if getattr(args, flag) is not None:
            overrides = [f"--{key}", json.dumps(getattr(args, flag))] + overrides
    base, resume = None, args.resume
    if args.resume:
        resume = resolve_checkpoint(args.resume if args.resume is not True else _out_dir_for_resume(overrides))
        if (folder := run_folder_of(resume)) is not None:  # the run goes on in its own folder, wherever it was
            overrides = ["--train.out_dir", json.dumps(str(folder))] + overrides  # copied (unless --out says else)
        if args.config is None:
            base = load_saved_run_config(resume)
    run = load_run_config(args.config, overrides, base=base)
    if args.print_config:
        print(json.dumps(run.to_resolved_dict(), indent=2))
        return 0
    summary = train(run, resume=resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps(summary, indent=2))
    if summary.get("interrupted"):  # stopped by a signal, checkpoint saved: the shell's 128 + signal number
        return 128 + int(getattr(signal, summary["interrupted"]))
    return 0


def _out_dir_for_resume(overrides: list[str]) -> str:
    """train.out_dir as the command line sets it (else the default's), read without applying the other overrides,
    which belong to the run being resumed, not to the default config."""
    from minimax_gpt.training.run_config import TrainConfig, parse_overrides

    given = [value for key, value in parse_overrides(overrides) if key == "train.out_dir"]
    return str(given[-1]) if given else TrainConfig.out_dir


def _eval(args, _) -> int:
    from minimax_gpt.training.trainer import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.seq_len, args.max_batches,
                            args.device, args.precision)
    shape = f"{r['batches']} batch{'es' if r['batches'] != 1 else ''} of {r['batch_size']} x {r['seq_len']} windows"
    used = (f"{shape} spread over {r['data']}" if r["windows"] < r["windows_total"]
            else f"every window of {r['data']}: {shape}")
    print(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  ({used}, {r['tokens']:,} tokens)")
    return 0


def _generate(args, _) -> int:
    from minimax_gpt.training.checkpoint import load_model
    from minimax_gpt.textgen import stream_text
    from minimax_gpt.training.trainer import resolve_device

    _check_sampling_flags(args)  # before the checkpoint is read
    model, tokenizer = load_model(args.checkpoint, device=resolve_device(args.device))
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer/ directory; cannot turn a prompt into tokens")
    pieces = stream_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                         args.top_p, args.seed, compile_step={"auto": None, "on": True, "off": False}[args.compile])
    for i, piece in enumerate(pieces):  # the prompt is echoed once it has been accepted and generation runs
        sys.stdout.write(args.prompt + piece if i == 0 else piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _check_sampling_flags(args) -> None:
    """ValueError naming the flag for a value generate cannot use."""
    import math

    if not args.prompt:
        raise ValueError('--prompt is empty; give the text to continue, e.g. --prompt "def "')
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def _prepare(args, _) -> int:
    from minimax_gpt.data.dataset import prepare

    meta = prepare(args.data, args.out, tokenizer_kind=args.tokenizer, vocab_size=args.vocab_size,
                   tokenizer_path=args.tokenizer_path, val_fraction=args.val_fraction, overwrite=args.overwrite)
    files = meta["fingerprint"]["files"]  # one record per source file: summarized, the full list is in meta.json
    size = sum(f["size"] for f in files)
    meta["fingerprint"]["files"] = f"{len(files)} file{'s' * (len(files) != 1)}, {size:,} bytes (see meta.json)"
    print(json.dumps(meta, indent=2))
    return 0


def _convert(args, _) -> int:
    from minimax_gpt.interop.hf import run_convert

    run_convert(args)
    return 0


def _recall(args, _) -> int:
    from tqdm import tqdm

    if args.checkpoint is not None:
        from minimax_gpt.evals.passkey import evaluate_checkpoint_passkey

        r = evaluate_checkpoint_passkey(args.checkpoint, trials=args.trials, device=args.device)
        print(json.dumps(r, indent=2))
        return 0
    from minimax_gpt.evals.recall import format_table, make_budget, run_recall

    budget = make_budget(args.config, args.layouts, args.layout, seq_lens=args.seq_lens, seeds=args.seeds,
                         steps=args.steps, n_pairs=args.n_pairs, stage_steps=args.stage_steps,
                         save_models=args.save_models or None)
    with tqdm(total=budget.total_steps(), desc="recall", unit="step", file=sys.stderr) as bar:
        def report(name, T, seed, accuracy):
            bar.write(f"{name} T={T} seed {seed}: accuracy {accuracy:.3f}", file=sys.stderr)

        results = run_recall(budget, args.out, on_step=lambda: bar.update(1), on_result=report)
    print(format_table(results))
    print(f"{results['wall_seconds']:.0f} s; wrote {os.path.join(args.out, 'recall.json')} and recall.png")
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "generate": _generate, "prepare": _prepare, "convert": _convert,
             "recall": _recall}

if __name__ == "__main__":
    sys.exit(main())
