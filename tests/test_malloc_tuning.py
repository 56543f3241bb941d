"""reasonrl/malloc_tuning.py: when the glibc knobs are set, and that a tuned process keeps freed tensor memory."""

import platform
import subprocess
import sys

import pytest

from reasonrl.malloc_tuning import glibc_tunables, should_tune

# Ten 8 MiB tensors alive at once, then freed: prints how many MiB the process gave back to the kernel.
FREED_MEMORY_PROBE = """
import os, sys, torch
from reasonrl.malloc_tuning import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
live = [torch.ones(2 << 20) for _ in range(10)]
held = rss_mib()
del live
print(held - rss_mib())
"""


def test_should_tune_only_with_glibc_no_preloaded_allocator_and_not_switched_off():
    assert should_tune({}, libc_name="glibc")
    assert not should_tune({}, libc_name="")  # musl, macOS
    assert not should_tune({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, libc_name="glibc")
    for off in ("0", "false", "off"):
        assert not should_tune({"REASONRL_MALLOC_TUNING": off}, libc_name="glibc")
    assert should_tune({"REASONRL_MALLOC_TUNING": "1"}, libc_name="glibc")


def test_the_server_gets_the_same_settings_as_glibc_tunables():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert glibc_tunables({}) == {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:"
                                  "glibc.malloc.trim_threshold=1073741824:glibc.malloc.top_pad=67108864"}
    assert glibc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}  # the user's own are kept
    assert glibc_tunables({"REASONRL_MALLOC_TUNING": "0"}) == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"), reason="glibc only")
def test_a_tuned_process_keeps_freed_tensor_memory_for_the_next_step():
    def freed_mib(mode: str) -> float:
        env = {"REASONRL_MALLOC_TUNING": "1", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, mode], capture_output=True, text=True,
                              env=env, check=True)
        return float(done.stdout.strip().splitlines()[-1])

    assert freed_mib("default") > 40  # glibc maps each 8 MiB block on its own and unmaps it on free
    assert freed_mib("tuned") < 8  # kept in the heap: the next step's tensors reuse those pages
