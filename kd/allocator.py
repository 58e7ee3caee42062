"""Keep memory that training frees inside the process for its next allocation (glibc's malloc, on Linux).

glibc's malloc gives large requests (from 128 KiB, a threshold it raises towards 32 MiB as such blocks are
freed) their own mmap and returns them to the system when they are freed, and trims free memory off the top
of its heap. Training allocates and frees the same large tensors every step (EfficientNet's [128, 96, 28, 28]
activations are 38.5 MB), so the kernel faults in and zeroes their pages again each time: an element-wise
operation on such a tensor took 13-18 ms instead of 3-5 on 2 cores, and a task B EfficientNet epoch ran
several times longer (docs/training.md, "Freed memory kept"). With mmap off and the heap never trimmed, freed
blocks are reused the way PyTorch's CUDA allocator reuses GPU memory, and the process keeps its peak memory
until it exits. Other platforms and allocators are left as they are, and so is glibc where the user set its
malloc options (MALLOC_*_ variables or GLIBC_TUNABLES) or KD_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable, Mapping

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: trim only when 2 GiB lie free at the top
OPT_OUT = "KD_KEEP_FREED_MEMORY"
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def left_to_glibc(environ: Mapping[str, str]) -> bool:
    """Whether the environment opts out (KD_KEEP_FREED_MEMORY=0) or sets glibc's malloc options itself."""
    return (environ.get(OPT_OUT, "1") == "0" or any(name in environ for name in USER_SETTINGS)
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, where this process runs on glibc; None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn off glibc's mmap of large blocks and the trimming of its heap; returns whether it did (False off
    glibc, or where the environment leaves malloc to glibc: `left_to_glibc`)."""
    mallopt = glibc_mallopt()
    if mallopt is None or left_to_glibc(environ):
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
