"""Input checks and the compute dtype shared by every lightning op (naive, chunked, recurrent, Triton)."""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States (and all internal arithmetic) are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Validate shapes and return (B, H, T, D, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got rank {t.dim()} {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in (B, H, T), got v {tuple(v.shape)} and q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape (H,) = ({H},), got {tuple(slopes.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, D, Dv):
        raise ValueError(
            f"initial_state must have shape (B, H, D, Dv) = {(B, H, D, Dv)}, got {tuple(initial_state.shape)}"
        )
    return B, H, T, D, Dv


def check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


# The Triton kernels' tile of C x C scores: a power of two >= 16 (tl.dot's minimum) and <= 64, where the dk/dv
# backward kernel fits a GPU's shared memory at D = 128 (160 KiB on sm_90 at 64; 256 KiB at 128, over the 227 KiB
# limit: benchmarks/triton_aot.py).
TRITON_CHUNK_SIZES = (16, 32, 64)
TRITON_MAX_HEAD_DIM = 128  # q/k head dim, one tile: D = 128 is what was compiled and tested (the value dim is tiled)


def check_triton_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or chunk_size not in TRITON_CHUNK_SIZES:
        raise ValueError(f"chunk_size of the Triton lightning kernels must be one of {TRITON_CHUNK_SIZES}, "
                         f"got {chunk_size!r}")


def triton_unsupported(chunk_size: int, head_dim: int) -> str | None:
    """Why the Triton kernels cannot run a layer of this chunk size and q/k head dim (naming the config fields), or
    None."""
    if chunk_size not in TRITON_CHUNK_SIZES:
        return f"lightning_chunk_size {chunk_size} is not one of the kernels' {TRITON_CHUNK_SIZES}"
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"head_dim {head_dim} is over the kernels' {TRITON_MAX_HEAD_DIM}"
    return None
