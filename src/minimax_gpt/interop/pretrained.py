"""Our own checkpoint format: a directory with `config.json` (a `MiniMaxConfig`) and `model.safetensors`.

    save_pretrained(model, "out/")                # or model.save_pretrained("out/")
    model = from_pretrained("out/")               # or EnhancedMiniMaxGPT.from_pretrained("out/")

The directory is written atomically: everything goes to a temporary sibling directory that is renamed into place, so
a crash never leaves a half-written checkpoint under the final name. Tied embeddings are stored once (`wte.weight`;
safetensors refuses tensors that share storage) and tied again on load. Loading reads one tensor at a time with
`safetensors.safe_open`, so the checkpoint and the model are never both fully in memory.

`SafetensorsReader` (also used by `minimax_gpt.interop.hf`) reads single files and sharded directories with a
`model.safetensors.index.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from minimax_gpt.atomic import atomic_directory
from minimax_gpt.config import MiniMaxConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# --- reading safetensors ------------------------------------------------------------------------------------------
class SafetensorsReader:
    """Tensors of a directory by name, read one at a time. Single file (`model.safetensors`) or shards listed in
    `model.safetensors.index.json` ({"weight_map": {name: file}}). Use as a context manager."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map' object naming the file of each tensor")
            self.file_of = dict(weight_map)
        elif single.is_file():
            self.file_of = None
        else:
            found = sorted(p.name for p in self.directory.glob("*")) if self.directory.is_dir() else []
            raise FileNotFoundError(f"{self.directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME} "
                                    f"(found: {', '.join(found) or 'nothing'})")
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}
        if self.file_of is None:
            self.file_of = {name: WEIGHTS_NAME for name in self._open(WEIGHTS_NAME).keys()}
        self.stored = {current_name(name): name for name in self.file_of}  # name -> its name in the file
        self.file_of = {name: self.file_of[old] for name, old in self.stored.items()}

    def _open(self, filename: str):
        if filename not in self._handles:
            from safetensors import safe_open

            path = self.directory / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {INDEX_NAME} but does not exist")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own SafetensorError for a bad header
                raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
            self._handles[filename] = self._stack.enter_context(handle)
        return self._handles[filename]

    def keys(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(self.stored[name]).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._open(self.file_of[name]).get_tensor(self.stored[name])

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Checkpoints written before a MoE layer's experts became a submodule name them `blocks.N.mlp.w1` (now
# `blocks.N.mlp.experts.w1`), also inside longer keys (a DCP checkpoint's `model.blocks.N.mlp.w1`,
# `optim.state.blocks.N.mlp.w1.exp_avg`).
_LEGACY_EXPERT = re.compile(r"(blocks\.\d+\.mlp)\.(w[123])(?=$|\.(?!weight))")
_CURRENT_EXPERT = re.compile(r"(blocks\.\d+\.mlp)\.experts\.(w[123])(?=$|\.(?!weight))")


def current_name(name: str) -> str:
    """A stored name as this version of the model names it (a legacy expert weight's name moves under `experts`)."""
    return _LEGACY_EXPERT.sub(r"\1.experts.\2", name)


def legacy_name(name: str) -> str:
    """The inverse of `current_name`: the name a checkpoint written before the experts submodule uses."""
    return _CURRENT_EXPERT.sub(r"\1.\2", name)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """dst.copy_(src) with an exact shape check (copy_ would broadcast a wrong shape silently)."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{name}: the checkpoint has shape {tuple(src.shape)} but the config gives "
                         f"{tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


# --- our format ---------------------------------------------------------------------------------------------------
def save_pretrained(model, directory: str | os.PathLike) -> None:
    """Write `config.json` and `model.safetensors` (every parameter under its own name, tied lm_head omitted)."""
    with atomic_directory(directory) as tmp:
        write_weights(model.config, model.state_dict(), tmp)


def write_weights(config: MiniMaxConfig, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """config.json + model.safetensors in `directory` from a full state dict; a tied lm_head.weight (the same
    storage as wte.weight, which safetensors refuses twice) is omitted and tied again on load."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()
               if not (name == "lm_head.weight" and config.tie_word_embeddings)}
    config.save(directory / CONFIG_NAME)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "minimax_gpt"})


def read_json(path: Path):
    """A JSON file's value; ValueError naming the file when it is not JSON (truncated, corrupted, or binary)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON (truncated or corrupted?): {e}") from None


def load_config(directory: str | os.PathLike) -> MiniMaxConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a directory written by save_pretrained")
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object of MiniMaxConfig fields, got {type(d).__name__}")
    if "model_type" in d or "architectures" in d:
        raise ValueError(f"{path} is a Hugging Face config (model_type={d.get('model_type')!r}); load that directory "
                         "with minimax_gpt.interop.hf.from_hf")
    try:
        return MiniMaxConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from None


def from_pretrained(directory: str | os.PathLike, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None):
    """The model saved by `save_pretrained`, in eval mode. Every parameter must be in the file, and nothing else."""
    from minimax_gpt.models.model import EnhancedMiniMaxGPT

    config = load_config(directory)
    model = EnhancedMiniMaxGPT(config)
    if dtype is not None:
        model.to(dtype)
    expected = {n for n in model.state_dict() if not (n == "lm_head.weight" and config.tie_word_embeddings)}
    params = model.state_dict(keep_vars=True)
    with SafetensorsReader(directory) as reader:
        missing, unexpected = sorted(expected - reader.keys()), sorted(reader.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"{directory} does not match its config: missing {_listing(missing)}; "
                             f"unexpected {_listing(unexpected)}")
        for name in sorted(expected):
            copy_checked(params[name], reader.get(name), name)
    if device is not None:
        model.to(device)
    return model.eval()


def _listing(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
