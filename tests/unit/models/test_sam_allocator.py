"""The SAM pools' allocator setting (sam.cpu_allocator): glibc keeps freed memory in the worker.

Each case runs in a fresh Python process, since the setting changes the whole process."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import os, sys
    import numpy as np

    def rss_mb():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    {setup}
    base = rss_mb()
    block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MiB, touched
    block = None
    print(round(rss_mb() - base))  # what freeing it left resident
""")


def _kept_after_free(setup: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def test_keep_freed_memory_keeps_a_freed_block_in_the_process():
    assert _kept_after_free("") < 50  # glibc's default: a block this big is unmapped when freed
    assert _kept_after_free("from pipeline.models.sam import keep_freed_memory; assert keep_freed_memory()") > 150


def test_a_sam_engine_on_the_cpu_applies_the_spec_setting():
    build = ("import torch; from pipeline.config import SamSpec; from pipeline.stages.foreground import sam_engine; "
             "from pipeline.config import RetrySpec; sam_engine(SamSpec(model='tiny', cpu_allocator='{}'), "
             "torch.device('cpu'), None, None, RetrySpec())")
    assert _kept_after_free(build.format("keep_freed")) > 150
    assert _kept_after_free(build.format("default")) < 50
