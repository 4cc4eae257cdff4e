"""Host memory: let glibc's malloc reuse freed memory for large CPU tensors instead of mapping fresh pages each time.

glibc serves a request above its mmap threshold (adjusted at run time, but never above 32 MiB on 64-bit) with a fresh
`mmap` and unmaps it on free. A training step that allocates such tensors (activations at a large batch, an MoE
layer's expert buffers, a long sequence's gradients) then pays a page fault and the kernel's zeroing for every 4 KiB
page of each one, every step. Measured on a 2-core AMD EPYC (torch 2.13, fp32):

- filling a fresh 50 MiB tensor: 33-42 ms, against 4 ms for memory used before;
- an MoE layer at 16k tokens (C 256, I 512, top-2 of 8, 2 threads), forward+backward: 931 -> 694 ms
  (benchmarks/bench_moe.py; transformers' per-expert loop, whose tensors mostly stay under the threshold, 718 -> 667);
- the lightning op at T = 8192, forward+backward: 237 -> 188 ms (1 thread), 178 -> 152 ms (2 threads).

`tune_malloc` sets the mmap threshold to 1 GiB and the trim threshold to 2 GiB - 1 (`mallopt`): freed blocks stay in the
heap and the next step reuses them, as a caching allocator does. The cost: the process keeps its peak heap after
tensors are freed (its resident size does not shrink back). `minimax-gpt train` calls it for CPU runs unless
`train.tune_malloc = false`; the benchmarks take `--tune-malloc`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when applied, False where there is no glibc
    `mallopt` that accepts them (macOS, Windows, musl, whose mallopt does nothing and returns 0)."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise ValueError(f"{name} must be an int in (0, 2**31), got {value!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
