"""Checkpoints for every tool: find them (`resolve_checkpoint`, `latest`), check them against their manifest, load a
model or a trainer state, and the plain writer (`save_checkpoint`). Training runs write through
`training.checkpointer.Checkpointer`, which adds `distcp/` (model and optimizer by parameter name) and keeps the
optimizer out of trainer_state.pt; the plain layout below is this module's writer's and that of single-process runs
before every checkpoint had distcp/:

    out/checkpoints/step-000500/
        config.json           the MiniMaxConfig
        model.safetensors     the weights (tied lm_head stored once)
        tokenizer/            the tokenizer (Tokenizer.save)
        run_config.json       the run's full config (model, train, phases), to resume or evaluate with it
        trainer_state.pt      optimizer, grad scaler, schedule position, RNG states (torch, CUDA, python, and the
                              data sampler's torch.Generator), step / phase counters; plain tensors and Python
                              containers only, read with torch.load(weights_only=True)
        manifest.json         what the checkpoint is, written last: {"format", "version", "step", "sharded": null
                              or {"format": "torch.distributed.checkpoint", "path": "distcp", "world_size",
                              "parallel"}, "files": {relative path: size in bytes}}
    out/checkpoints/latest    one line: the name of the newest complete checkpoint

`train.keep_checkpoints = N` keeps the newest N `step-*` directories (`prune_checkpoints`, after each save).

A checkpoint is written into a temporary sibling `.step-000500.tmp-XXXX` and renamed into place when complete; the
`latest` pointer is replaced (write to a temporary file, os.replace) only after that rename. A write interrupted at any
point therefore leaves the previous checkpoint, and the pointer to it, intact.

Loaders follow the manifest (`read_manifest`), never the mere presence of a file: a listed file that is missing or
has another size, or a file the manifest does not list, is an error naming it. Checkpoints written before manifests
existed are described from their trainer_state.pt (whose optimizer entry is a marker string when it was sharded).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from minimax_gpt.atomic import atomic_directory, atomic_file, remove_directory
from minimax_gpt.interop.pretrained import (CONFIG_NAME, WEIGHTS_NAME, from_pretrained, load_config, read_json,
                                            save_pretrained)
from minimax_gpt.training.safe_dcp import refusal_reason

TRAINER_STATE_NAME = "trainer_state.pt"
RUN_CONFIG_NAME = "run_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "minimax_gpt checkpoint"
MANIFEST_VERSION = 1


def save_checkpoint(path: str | os.PathLike, model, tokenizer=None, trainer_state: dict[str, Any] | None = None,
                    run_config: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically (replacing `path` if it exists); returns `path`."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        if run_config is not None:
            (tmp / RUN_CONFIG_NAME).write_text(json.dumps(run_config, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE_NAME)
        write_manifest(tmp, step=(trainer_state or {}).get("progress", {}).get("step"))
    return path


# --- the manifest ---------------------------------------------------------------------------------------------------
def write_manifest(directory: str | os.PathLike, step: int | None = None,
                   sharded: dict[str, Any] | None = None) -> None:
    """manifest.json listing every file now under `directory` with its size; written last, when all are there."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "sharded": sharded,
                "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint (or of the latest checkpoint of an output directory), checked against the files:
    each listed file must be there with its size, and nothing else may be. A checkpoint without manifest.json
    (written before manifests) is described from its trainer_state.pt."""
    path = resolve_checkpoint(path)
    file = path / MANIFEST_NAME
    if not file.is_file():
        return _legacy_manifest(path)
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file}: not a minimax_gpt checkpoint manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{file}: manifest version {manifest.get('version')!r}; this minimax_gpt reads version "
                         f"{MANIFEST_VERSION} (upgrade minimax_gpt to read this checkpoint)")
    files, sharded = manifest.get("files"), manifest.get("sharded")
    if not isinstance(files, dict) or not (sharded is None or isinstance(sharded, dict)):
        raise ValueError(f"{file}: \"files\" must be an object and \"sharded\" null or an object")
    if sharded is not None and (sharded.get("format"), sharded.get("path")) != ("torch.distributed.checkpoint",
                                                                                 "distcp"):
        raise ValueError(f"{file}: unknown sharded layout {sharded!r} (this minimax_gpt writes "
                         f"torch.distributed.checkpoint shards in distcp/)")
    for name, size in files.items():
        piece = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ValueError(f"{file}: lists {name!r}, which is outside the checkpoint")
        if not piece.is_file():
            raise FileNotFoundError(f"{piece}: missing; {file} lists it as part of this checkpoint")
        if piece.stat().st_size != size:
            raise ValueError(f"{piece}: {piece.stat().st_size} bytes where {file} says {size}: the file was "
                             f"truncated or replaced after the checkpoint was written")
    for piece in sorted(path.rglob("*")):
        if piece.is_file() and piece != file and piece.relative_to(path).as_posix() not in files:
            raise ValueError(f"{piece}: not part of this checkpoint ({file} does not list it); remove it")
    if sharded is not None and "distcp/.metadata" not in files:
        raise ValueError(f"{file}: says the checkpoint is sharded in distcp/ but lists no distcp/.metadata")
    return manifest


def _legacy_manifest(path: Path) -> dict[str, Any]:
    state_file = path / TRAINER_STATE_NAME
    optimizer = load_trainer_state(path)["optimizer"] if state_file.is_file() else None
    sharded = ({"format": "torch.distributed.checkpoint", "path": "distcp"} if isinstance(optimizer, str) else None)
    return {"format": MANIFEST_FORMAT, "version": 0, "step": None, "sharded": sharded, "files": None}


def write_latest(root: Path, name: str) -> None:
    """Point `root/latest` at the checkpoint `root/name` (atomically: the pointer is never half written)."""
    with atomic_file(root / LATEST_NAME) as f:
        f.write(name + "\n")


def save_training_checkpoint(out_dir: str | os.PathLike, step: int, model, tokenizer, trainer_state: dict[str, Any],
                             run_config: dict[str, Any]) -> Path:
    """`out_dir/checkpoints/step-{step:06d}`, then point `out_dir/checkpoints/latest` at it."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    name = f"step-{step:06d}"
    try:
        path = save_checkpoint(root / name, model, tokenizer, trainer_state, run_config)
        write_latest(root, name)
    except OSError as e:  # disk full, quota, permissions: nothing under a final name was touched
        try:
            previous = latest_checkpoint(out_dir)
        except OSError:
            previous = None
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise OSError(e.errno, f"could not write checkpoint {root / name}: {e.strerror or e}; {kept}") from e
    return path


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` `step-N` checkpoints of `out_dir` (by step; the one `latest` names is always
    kept); returns the deleted paths. keep = 0 keeps everything. Each directory is first renamed to a hidden sibling,
    so no half-deleted directory is ever left under a checkpoint's name."""
    if keep <= 0:
        return []
    root = Path(out_dir) / CHECKPOINTS_DIR
    latest = latest_checkpoint(out_dir)
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    doomed = [p for p in steps[:-keep] if latest is None or p.name != latest.name]
    for path in doomed:
        remove_directory(path)
    return doomed


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `out_dir/checkpoints/latest` names, or None when there is none."""
    pointer = Path(out_dir) / CHECKPOINTS_DIR / LATEST_NAME
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not _is_checkpoint(path):
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint directory, a training output directory (its latest checkpoint) or
    a `checkpoints/` directory."""
    path = Path(path)
    if _is_checkpoint(path):
        return path
    for out_dir in (path, path.parent if path.name == CHECKPOINTS_DIR else None):
        if out_dir is not None and (found := latest_checkpoint(out_dir)) is not None:
            return found
    raise FileNotFoundError(f"{path} is neither a checkpoint (with {CONFIG_NAME} and {WEIGHTS_NAME}) nor a training "
                            f"output directory with {CHECKPOINTS_DIR}/{LATEST_NAME}")


def load_model(path: str | os.PathLike, device: torch.device | str | None = None):
    """(model in eval mode, tokenizer or None) from a checkpoint or training output directory."""
    from minimax_gpt.data.tokenizer import load_tokenizer

    path = resolve_checkpoint(path)
    read_manifest(path)
    model = from_pretrained(path, device=device)
    tokenizer = load_tokenizer(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).is_dir() else None
    return model, tokenizer


def check_same_config(path: Path, model) -> None:
    """ValueError naming every field where the checkpoint's config.json differs from `model.config`."""
    saved, ours = load_config(path).to_dict(), model.config.to_dict()
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"{path / CONFIG_NAME}: the checkpoint's model config is incompatible with this run's: " +
                         "; ".join(f"{k}: checkpoint {saved.get(k)!r}, run {ours.get(k)!r}" for k in differ))


def load_trainer_state(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """trainer_state.pt, read with torch.load(weights_only=True): tensors and plain containers only, so a file
    holding any other object (a pickle payload) is refused without running it. `required`: keys that must be there."""
    path = resolve_checkpoint(path) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this checkpoint has no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain Python containers "
                         f"(only weights_only=True loading is allowed): {refusal_reason(e)}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: truncated or corrupted ({type(e).__name__}: {_last_line(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of training state, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (has {', '.join(map(str, state)) or 'nothing'})")
    return state


def load_saved_run_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run config dict saved with a checkpoint, or None."""
    path = resolve_checkpoint(path) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    run = read_json(path)
    if not isinstance(run, dict):
        raise ValueError(f"{path}: expected a JSON object (the run's model, train and phases), got "
                         f"{type(run).__name__}")
    return run


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else "no message"


def _is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
