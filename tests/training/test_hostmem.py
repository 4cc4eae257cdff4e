"""hostmem.tune_malloc: after it, a large CPU tensor comes from the heap (reused after free) instead of a
fresh mmap. Checked in a child process (the setting is process-wide and the test process may already have it)."""

import platform
import subprocess
import sys
import textwrap

import pytest

from minimax_gpt.training.hostmem import tune_malloc

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are a glibc feature")

CHILD = textwrap.dedent("""
    import ctypes, ctypes.util, sys, torch
    from minimax_gpt.training.hostmem import tune_malloc

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = Mallinfo2

    def mapped_while_alive():  # bytes in mmapped blocks while a 64 MiB tensor exists
        t = torch.ones(16 * 2**20)
        return libc.mallinfo2().hblkhd

    before = mapped_while_alive()
    applied = tune_malloc()
    mapped_while_alive()  # the first one after tuning grows the heap
    after = mapped_while_alive()
    print(before >= 64 * 2**20, applied, after < 64 * 2**20)
""")


@glibc
def test_large_tensors_come_from_the_heap_after_tuning():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True"]  # mmapped before, applied, heap after


def test_bad_thresholds_raise():
    for bad in (0, -1, 2**31, 1.5, True):
        with pytest.raises(ValueError, match="mmap_threshold"):
            tune_malloc(mmap_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_malloc(trim_threshold=0)
