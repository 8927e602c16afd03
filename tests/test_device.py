"""lm.device: settings of the process that training relies on."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Touches a 64 MB block, frees it and prints the resident memory before and after the free.
FREE_AND_MEASURE = """
import sys, torch
from lm.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
block = torch.ones(16 * 2**20)
before = resident_mb()
del block
print(before, resident_mb())
"""


def resident_drop_mb(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE, mode], capture_output=True, text=True, check=True)
    before, after = map(float, result.stdout.split())
    return before - after


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_keeps_a_freed_block_mapped_for_reuse() -> None:
    assert resident_drop_mb("default") > 50  # glibc hands a large freed block straight back to the kernel
    assert resident_drop_mb("keep") < 5
