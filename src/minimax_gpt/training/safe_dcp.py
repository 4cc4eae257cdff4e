"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

torch's own reader is not safe for checkpoints from elsewhere: `FileSystemReader.read_metadata` reads `.metadata`
with a plain `pickle.load`, and `DefaultLoadPlanner.load_bytes` reads every non-tensor item (an optimizer's
`param_groups` values) with `torch.load(weights_only=False)`. Either runs whatever a crafted file asks for.

    load(state_dict, directory)     dcp.load with the two replaced:
        .metadata                   unpickled with `find_class` limited to ALLOWED: DCP's metadata dataclasses,
                                    torch.Size, dtypes, the layout lookup and PosixPath (what torch 2.4-2.13 write);
                                    builtin containers and scalars need no lookup
        bytes items                 torch.load(weights_only=True): tensors, numbers, strings and containers only
        tensors                     already torch.load(weights_only=True) in torch's reader

Anything else is refused with `UnsafeCheckpointError` naming the file (and the item), before any of it runs.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from minimax_gpt.interop.pretrained import current_name, legacy_name

METADATA_NAME = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
} | {("torch", str(dtype).removeprefix("torch.")) for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)})


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than the data its format allows (it would run code when loaded)."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpointError(
                f"{self.path}: refused to load: it asks for {module}.{name}, which is not part of DCP metadata "
                f"(a pickle that would run code); only checkpoint metadata classes, torch.Size and dtypes are read")
        return super().find_class(module, name)


def read_metadata(path: str | os.PathLike) -> Metadata:
    """A DCP `.metadata` file, unpickled with only the ALLOWED classes."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # truncated, not a pickle, a class's constructor refusing its arguments
            raise ValueError(f"{path}: not readable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"{path}: not DCP metadata (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """torch's FileSystemReader with `.metadata` read by `read_metadata` (once, in the constructor, so that a refused
    file fails before DCP starts, instead of DCP logging it and falling back to per-rank metadata files)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._metadata_path = Path(path) / METADATA_NAME
        self._metadata = read_metadata(self._metadata_path)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank files, which we never write
            raise FileNotFoundError(f"{self._metadata_path.parent}: only the global {METADATA_NAME} is read")
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default planner, except that bytes items are read with torch.load(weights_only=True)."""

    def __init__(self, directory: Path, **kwargs):
        super().__init__(**kwargs)
        self.directory = directory

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            shard = self.metadata.storage_data[read_item.storage_index].relative_path
            raise UnsafeCheckpointError(
                f"{self.directory / shard}: refused to load item {read_item.dest_index.fqn!r}: it holds objects "
                f"other than tensors, numbers, strings and containers ({refusal_reason(e)})") from None
        # the parent stores the item where the (possibly flattened) state dict wants it, reading it back with
        # weights_only=False: hand it the object re-serialized, which holds only what weights_only admitted
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


def load(state_dict: dict, directory: str | os.PathLike) -> None:
    """`dcp.load(state_dict, checkpoint_id=directory)` through the safe reader and planner; any failure, on any rank,
    becomes one exception naming the file (torch wraps failures in CheckpointException, a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    try:
        reader = SafeFileSystemReader(directory)
        request = state_dict
        if any(current_name(key) != key for key in reader._metadata.state_dict_metadata):  # written before 0b
            request = _renamed(state_dict, legacy_name)  # the same tensors (read in place) under the old names
        with warnings.catch_warnings():  # one process is the intent: no "torch.distributed is disabled" warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(request, storage_reader=reader, planner=SafeLoadPlanner(directory),
                     no_dist=not (dist.is_available() and dist.is_initialized()))
        if request is not state_dict:  # non-tensor items (param_groups) were replaced: bring them back renamed
            state_dict.clear()
            state_dict.update(_renamed(request, current_name))
    except CheckpointException as e:
        failures = [exc for exc, _traceback in e.failures.values()]  # (exception, stack summary) per rank
        cause = failures[0] if failures else e
        if isinstance(cause, (UnsafeCheckpointError, ValueError)):
            raise type(cause)(str(cause)) from None
        raise ValueError(f"{directory}: could not load the distributed checkpoint ({type(cause).__name__}: "
                         f"{refusal_reason(cause)})") from None


def _renamed(obj, rename):
    """A copy of nested dicts and lists with every string (dict keys, parameter names in param_groups) renamed;
    tensors and other leaves are the same objects."""
    if isinstance(obj, dict):
        return {rename(k) if isinstance(k, str) else k: _renamed(v, rename) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_renamed(v, rename) for v in obj]
    return rename(obj) if isinstance(obj, str) else obj


def refusal_reason(e: BaseException) -> str:
    """The line of a (weights_only) unpickling error that says what was refused, without torch's advice to load the
    file unsafely."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.removeprefix("WeightsUnpickler error: ").split(". Please use")[0]
    return lines[-1] if lines else type(e).__name__
