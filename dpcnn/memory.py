"""Keep the memory NumPy frees for the next step, instead of giving it back to the kernel.

A training step makes and drops dozens of temporary arrays of 0.1-30 MB. glibc's
malloc serves an allocation above its mmap threshold (128 KB to start, raised
only as large blocks are freed) with a fresh ``mmap`` and returns it with
``munmap`` when freed, and it trims the heap's free top above 128 KB: so, step
after step, the kernel maps and zero-fills the same pages again (page faults,
system time). Measured on the AVX-512 EPYC of 2026-12-03, one thread, `small`
at batch 64 (`bench/bench_train.py`, 9 windows, a run each way): 5,560 img/s
with glibc's defaults, 7,304 with the thresholds below (LeNet-5 and batch 128
within the noise: glibc's own threshold adapts there, sometimes); the fp16
gradient codec of `dpcnn.buckets`, 206,922 floats: 1.7-2.3 ms a call with the
defaults in one heap state against 0.34-0.43 ms. Either setting alone does not
help (bench/RESULTS.md).

`keep_freed_memory` (called once when `dpcnn` is imported) raises the mmap
threshold to 32 MB (glibc's largest) and the trim threshold to 256 MB, so the
heap keeps its high-water mark and reuses it. The cost is that a process's
resident size stays at its peak instead of shrinking between steps. It is
process-wide (PyTorch in the same process, as in the benchmarks, gets it too).
Set ``DPCNN_MALLOC=default`` (or 0, off, no, false) to keep glibc's defaults.
Other C libraries (or none with ``mallopt``): nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
#: ``DPCNN_MALLOC`` values that leave the C library's settings alone ("default" is the documented one).
_OPT_OUT = ("default", "0", "off", "no", "false")


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); True if both were set."""
    if os.environ.get("DPCNN_MALLOC", "").strip().lower() in _OPT_OUT or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
