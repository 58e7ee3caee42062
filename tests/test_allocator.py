"""kd.allocator: memory a step frees is kept for the next step's allocations, unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest

from kd.allocator import OPT_OUT, glibc_mallopt, keep_freed_memory, left_to_glibc

needs_glibc = pytest.mark.skipif(glibc_mallopt() is None, reason="glibc's malloc only")

# Page faults of allocating and filling 64 MiB tensors four more times after others like them were freed, in a
# new process that imports the package's networks (and so keeps freed memory, unless its environment opts out).
REALLOCATION_FAULTS = """
import resource
import torch
import kd.models
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
[faults() for _ in range(4)]  # the heap settles: it grows until a block's alignment padding fits
print(sum(faults() for _ in range(4)))
"""


def reallocation_faults(**environ: str) -> int:
    clean = {name: value for name, value in os.environ.items() if name != OPT_OUT}
    done = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS], env={**clean, **environ},
                          capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@needs_glibc
def test_a_large_tensor_allocated_again_reuses_the_memory_freed_before():
    glibc, kept = reallocation_faults(**{OPT_OUT: "0"}), reallocation_faults()
    assert glibc >= 4 * 32  # glibc maps 64 MiB afresh: a fault a page, of 2 MiB where pages are huge
    assert kept < glibc / 4


@pytest.mark.parametrize("environ", [{OPT_OUT: "0"}, {"MALLOC_MMAP_MAX_": "65536"},
                                     {"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}])
def test_an_opt_out_or_the_users_own_malloc_settings_are_left_to_glibc(environ):
    assert left_to_glibc(environ)
    assert keep_freed_memory(environ) is False


def test_other_variables_leave_it_on():
    assert not left_to_glibc({OPT_OUT: "1", "GLIBC_TUNABLES": "glibc.pthread.rseq=0", "MALLOC_ARENA_MAX": "2"})


@needs_glibc
def test_it_applies_on_glibc():
    assert keep_freed_memory({}) is True
