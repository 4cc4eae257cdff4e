"""Validation loss: of a model over batches (`evaluate`, what training runs) and of a saved checkpoint
(`evaluate_checkpoint`, what `minimax-gpt eval` runs: by default exactly as the checkpoint's run validated it)."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minimax_gpt.training.checkpoint import load_saved_run_config, resolve_checkpoint
from minimax_gpt.training.devices import autocast_context, resolve_device, resolve_precision

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, precision: str = "fp32",
             loss_chunk_size: int = 0) -> tuple[float, int]:
    """(mean cross-entropy per token, tokens) over an iterable of (x, y) batches; the MoE auxiliary losses are not
    included. The model is put back in the mode it was in."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            out = model(x, targets=y, loss_chunk_size=loss_chunk_size)
        total += float(out.ce_loss) * y.numel()
        n += y.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluation got no batches")
    return total / n, n


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike | None = None,
                        batch_size: int | None = None, seq_len: int | None = None,
                        max_batches: int | str | None = None, device: str = "auto",
                        precision: str | None = None) -> dict[str, Any]:
    """Loss and perplexity of a checkpoint; by default exactly as its run validated it.

    Without `data`: the run's validation split with the run's evaluation settings, i.e. the batch shape of the phase
    the checkpoint's step belongs to (the last phase for a finished run), train.eval_batches batches spread over the
    split (data.TokenDataset.eval_windows), train.precision and train.loss_chunk_size, through `evaluate`, as
    training does. So the final checkpoint of a finished single-process run gives summary.json's val_loss exactly,
    on the same kind of device. With `data` (a text file, folder, .jsonl or .parquet, tokenized with the
    checkpoint's tokenizer): every window of it unless max_batches is given. max_batches="all" evaluates every window
    of the split; batch_size, seq_len, max_batches and precision given here replace the run's. Returns loss,
    perplexity, tokens, batches, batch_size, seq_len, windows (used) of windows_total, precision, data (what was
    read), checkpoint, and run_settings (what was taken from the run, by its config key: "train.eval_batches": 20).
    The settings taken from the run are logged."""
    import tempfile

    from tqdm.auto import tqdm

    from minimax_gpt.training.checkpoint import TOKENIZER_DIR, load_model
    from minimax_gpt.data.dataset import TokenDataset, prepare

    if isinstance(max_batches, str) and max_batches != "all":
        raise ValueError(f"max_batches must be a number >= 1 or 'all' (every window), got {max_batches!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("max_batches", max_batches)):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value} (leave it unset for the default)")
    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    model, tokenizer = load_model(path, device=dev)
    run = load_saved_run_config(path)
    tc = run["train"] if run else {}
    phase_index, phase = _checkpoint_phase(path, run)
    from_run: dict[str, Any] = {}  # run config key -> value, for what the run decides
    if batch_size is None:
        batch_size = phase["batch_size"] if phase else 8
        if phase:
            from_run[f"phases.{phase_index}.batch_size"] = batch_size
    if seq_len is None:
        seq_len = phase["seq_len"] if phase else model.config.block_size
        if phase:
            from_run[f"phases.{phase_index}.seq_len"] = seq_len
    if max_batches is None and data is None and "eval_batches" in tc:
        max_batches = from_run["train.eval_batches"] = tc["eval_batches"]
    if precision is None:
        precision = tc.get("precision", "auto")
        if "precision" in tc:
            from_run["train.precision"] = precision
    prec = resolve_precision(precision, dev)
    if model.config.pos_embedding == "learned" and seq_len > model.config.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds block_size {model.config.block_size}, the reach of this model's "
                         f"learned position embedding; pass a seq_len <= {model.config.block_size}")
    chunk = tc.get("loss_chunk_size", 0)
    cap = None if max_batches in (None, "all") else max_batches
    if from_run:
        settings = [f"{k} {v}" + (f" ({prec} here)" if k == "train.precision" and v != prec else "")
                    for k, v in from_run.items()]
        logger.info("evaluating with the run's settings: %s", ", ".join(settings))
    with tempfile.TemporaryDirectory() as tmp:
        if data is not None:
            if tokenizer is None:
                raise ValueError(f"{path} has no tokenizer/ directory to tokenize {data} with")
            prepare(data, tmp, tokenizer_kind=tokenizer.kind, tokenizer_path=path / TOKENIZER_DIR, val_fraction=0.0)
            dataset, source = TokenDataset(tmp, "train"), str(data)
        else:
            prepared = _run_data_dir(run, path)
            if prepared is None:
                raise ValueError(f"{path}: the run's prepared data was not found; pass data (--data PATH)")
            dataset, source = TokenDataset(prepared, "val"), f"the validation split of {prepared}"
        windows = len(dataset.eval_windows(batch_size, seq_len, cap))
        n_batches = -(-windows // batch_size)
        batches = tqdm(dataset.iter_eval_batches(batch_size, seq_len, cap), total=n_batches, desc="eval",
                       unit="batch", file=sys.stderr, disable=None, dynamic_ncols=True, leave=False)  # off if no tty
        loss, n = evaluate(model, batches, dev, prec, chunk)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": n, "batches": n_batches,
            "batch_size": batch_size, "seq_len": seq_len, "windows": windows,
            "windows_total": (len(dataset) - 1) // seq_len, "precision": prec, "data": source,
            "checkpoint": str(path), "run_settings": from_run}


def _checkpoint_phase(path: Path, run: dict[str, Any] | None) -> tuple[int | None, dict[str, Any] | None]:
    """(index, phase dict) of the run's phase that the checkpoint's step belongs to: the phase whose steps
    (previous phases' iters, that + its iters] hold it, so the one training evaluated it with. The last phase when the
    step is not known (a checkpoint written before manifests); (None, None) without a run config."""
    from minimax_gpt.training.checkpoint import read_manifest

    phases = run.get("phases") if run else None
    if not phases:
        return None, None
    step, end = read_manifest(path).get("step"), 0
    for i, p in enumerate(phases):
        end += p["iters"]
        if step is not None and step <= end:
            return i, p
    return len(phases) - 1, phases[-1]


def _run_data_dir(run: dict[str, Any] | None, checkpoint: Path) -> Path | None:
    """The prepared data a run trained on: train.prepared, or the run folder's data/. Relative paths are relative to
    the run folder (the one holding the checkpoint's checkpoints/), so a moved or copied run finds its own data."""
    from minimax_gpt.training.runfolder import run_folder_of

    if not run:
        return None
    tc = run["train"]
    folder = run_folder_of(checkpoint) or Path(tc["out_dir"])
    if tc.get("prepared"):
        candidates = [folder / tc["prepared"]]  # an absolute path stays itself
    else:  # out_dir was saved as an absolute path before runs were relocatable
        candidates = [folder / "data", Path(tc["out_dir"]) / "data"]
    return next((c for c in candidates if (c / "meta.json").is_file()), None)
