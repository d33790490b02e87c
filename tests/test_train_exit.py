"""Clean exit of gloo ranks: `close_distributed` must run before the interpreter finalises.

Cause of DeepSpeed CPU runs aborting at exit with "terminate called without an active exception":
gloo work still pending when Python shuts down (ZeRO overlaps its reductions as async work); the
process group is then torn down during finalisation, where freeing that work's tensors aborts.
Without `close_distributed` this script aborted in 12 of 15 two-rank runs here; with it, 0 of 15.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_exit_zero_with_pending_gloo_work():
    for _ in range(3):  # unfixed, 4 in 5 runs abort: 3 clean runs in a row would be a 1% fluke
        port = str(_free_port())
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(r), port], stderr=subprocess.PIPE, text=True
            )
            for r in range(2)
        ]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in ranks]
        for code, err in results:
            assert code == 0 and "terminate called" not in err, err[-2000:]
