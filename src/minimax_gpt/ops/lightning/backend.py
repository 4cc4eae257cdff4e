"""Which implementation the lightning layer runs: the PyTorch block form (chunk.py) or the Triton kernels.

    requested_backend(configured)
        the config's lightning_backend, or MINIMAX_GPT_LIGHTNING_BACKEND where the config says "auto"; a conflict
        between them is an error
    lightning_backend(requested, device_type, chunk_size, head_dim)
        "torch" or "triton" for a layer on that device type ("cuda", "cpu"), decided once per distinct arguments and
        logged in one line

"auto" runs the kernels on CUDA when Triton is importable and they take the layer's chunk size and head dim, else the
PyTorch op, and says which and why. "triton" runs the kernels or raises: without Triton, on CPU without
TRITON_INTERPRET=1 (Triton's interpreter, which is how the tests run them), or with a chunk size or head dim they do
not take. "torch" always runs the PyTorch op.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

from minimax_gpt.config import LIGHTNING_BACKENDS
from minimax_gpt.ops.lightning.inputs import triton_unsupported

logger = logging.getLogger(__name__)

ENV_VAR = "MINIMAX_GPT_LIGHTNING_BACKEND"

_decided: dict[tuple[str, str, int, int], str] = {}


def requested_backend(configured: str) -> str:
    """The backend asked for: the config's value, or the environment variable's where the config says "auto"."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env not in LIGHTNING_BACKENDS:
        raise ValueError(f"{ENV_VAR} is {env!r}; allowed: {', '.join(LIGHTNING_BACKENDS)}")
    if configured != "auto" and env not in ("", "auto", configured):
        raise ValueError(f"lightning_backend is {configured!r} in the config but {ENV_VAR} is {env!r}; "
                         f"unset one of them or make them agree")
    return (env or "auto") if configured == "auto" else configured


def triton_ops() -> ModuleType:
    """The Triton ops module (imports Triton)."""
    return importlib.import_module("minimax_gpt.ops.lightning.triton_ops")


def _triton_missing() -> str | None:
    """Why the Triton kernels cannot be imported here, or None."""
    try:
        triton_ops()
    except ImportError as e:
        return f"Triton cannot be imported ({e})"
    return None


def _interpreter_on() -> bool:
    return triton_ops().interpreter_on()


def _decide(requested: str, device_type: str, chunk_size: int, head_dim: int) -> str:
    if requested == "torch":
        logger.info("lightning layers on %s: the PyTorch chunked op (lightning_backend='torch')", device_type)
        return "torch"
    unsupported = triton_unsupported(chunk_size, head_dim)
    if requested == "triton":
        missing = _triton_missing()
        if missing:
            raise RuntimeError(f"lightning_backend='triton' but {missing}; pip install triton, or use 'auto'")
        if device_type != "cuda" and not _interpreter_on():
            raise RuntimeError(f"lightning_backend='triton' needs CUDA tensors (these are on {device_type}), or "
                               "TRITON_INTERPRET=1 to run the kernels through Triton's interpreter on CPU")
        if unsupported:
            raise ValueError(f"lightning_backend='triton': {unsupported}")
        how = "compiled" if device_type == "cuda" else "through Triton's interpreter (slow; for tests)"
        logger.info("lightning layers on %s: the Triton kernels, %s (lightning_backend='triton')", device_type, how)
        return "triton"
    if device_type != "cuda":
        why = "no CUDA device"  # (Triton is not even imported)
    elif unsupported:
        why = unsupported
    else:
        why = _triton_missing()
    if why is None:
        logger.info("lightning layers on cuda: the Triton kernels (lightning_backend='auto', Triton importable)")
        return "triton"
    log = logger.warning if device_type == "cuda" else logger.info
    log("lightning layers on %s: the PyTorch chunked op, not the Triton kernels: %s", device_type, why)
    return "torch"


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing and keeps the answer: no break
def lightning_backend(requested: str, device_type: str, chunk_size: int, head_dim: int) -> str:
    """"torch" or "triton": what runs for `requested` ("auto", "torch" or "triton") on tensors of `device_type`."""
    key = (requested, device_type, chunk_size, head_dim)
    chosen = _decided.get(key)
    if chosen is None:
        chosen = _decided[key] = _decide(requested, device_type, chunk_size, head_dim)
    return chosen
