"""The daemon's allocator tuning (sevmigd.daemon.malloc): best effort, never raises, and on glibc it
really stops MiB-sized buffers from being page-faulted in again on every allocation."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys

import pytest

from sevmigd.daemon.malloc import tune_malloc

_PROBE = r"""
import resource, sys
from sevmigd.daemon.malloc import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    bytearray(1 << 20)
f = faults()
for _ in range(50):
    bufs = [bytearray(1 << 20) for _ in range(4)]   # a batch's buffers: output, scratch, frame, read
    del bufs
print((faults() - f) / 50)
"""


def test_tune_malloc_never_raises():
    assert tune_malloc() in (True, False)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_tuned_process_reuses_big_buffers_instead_of_faulting_them_in():
    def faults_per_alloc(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    # Four 1 MiB buffers per round: untuned glibc either mmaps each one or, once its dynamic threshold
    # has grown, trims the freed heap top (more than 2x the threshold) and faults it in again next round;
    # tuned, the heap chunks are reused and no new page is touched.
    assert faults_per_alloc("plain") > 500
    assert faults_per_alloc("tuned") < 50


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_heap_returns_freed_buffers_to_the_kernel():
    probe = r"""
import sys
from sevmigd.daemon.malloc import tune_malloc, release_free_heap
tune_malloc()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
bufs = [bytearray(1 << 20) for _ in range(12)]   # touched heap memory (below the mmap threshold)
del bufs
kept = rss()
release_free_heap()
print(kept - rss())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 6        # most of the 12 MiB kept by the trim threshold went back
