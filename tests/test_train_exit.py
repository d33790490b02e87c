"""Clean exit of gloo ranks: `close_distributed` must run before the interpreter finalises.

Cause of DeepSpeed CPU runs aborting at exit with "terminate called without an active exception":
gloo work still pending when Python shuts down (ZeRO overlaps its reductions as async work); the
process group is then torn down during finalisation, where freeing that work's tensors aborts.
Without `close_distributed` this script aborted in 12 of 15 two-rank runs here; with it, 0 of 15.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import clean_env, free_port, kill_group

pytestmark = pytest.mark.slow

RANK_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from apb.train.process_group import close_distributed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
works = [dist.all_reduce(torch.randn(4096), async_op=True) for _ in range(50)]
for work in works[:-5]:  # the last reductions are left pending, as overlapped ZeRO reductions can be
    work.wait()
close_distributed()
"""

TIMEOUT_S = 120  # two ranks start, reduce and exit in a few seconds; a hang is a failure, not a wait


def _wait_all(ranks: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, stderr) of every rank; past TIMEOUT_S all ranks are killed and the test fails."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    if any(p.poll() is None for p in ranks):
        for p in ranks:
            if p.poll() is None:
                kill_group(p)
        errors = "\n".join(p.communicate()[1][-1500:] for p in ranks)
        pytest.fail(f"the ranks did not exit within {TIMEOUT_S} s (a hang at exit?):\n{errors}")
    return [(p.returncode, p.communicate()[1]) for p in ranks]


def test_ranks_exit_zero_with_pending_gloo_work():
    for _ in range(3):  # unfixed, 4 in 5 runs abort: 3 clean runs in a row would be a 1% fluke
        port = str(free_port())
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(r), port],
                stderr=subprocess.PIPE,
                text=True,
                env=clean_env(),
                start_new_session=True,
            )
            for r in range(2)
        ]
        results = _wait_all(ranks)
        for code, err in results:
            assert code == 0 and "terminate called" not in err, err[-2000:]
