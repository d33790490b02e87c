"""What the repo ships speaks to its users: no temporary paths of the machine that made a file, no names
of the machines we borrowed, no references to our issue tracker.

Every tracked file under the shipped folders is read (binary files too: an adapter's safetensors header
could carry a path) and searched, case-insensitively, for:
- ``/tmp/``: a temporary path, meaningless on the user's machine (an adapter's recorded base model, a
  benchmark's recorded command);
- ``/root/out``: the output folder of the machine a benchmark ran on;
- ``nvidia-h1`` / ``nvidia-h2``: machine-kind names (a GPU is named by its model, "NVIDIA H100 80GB HBM3");
- ``issue <digit>``: a pointer into our tracker, which users do not see.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("adapters", "benchmarks", "configs", "scripts", "apb", "kernels", "train", "data", "README.md")
FORBIDDEN = re.compile(rb"/tmp/|/root/out|nvidia-h[12]|\bissue [0-9]", re.IGNORECASE)


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (no .git or no git): the shipped files are what `git ls-files` lists")
    done = subprocess.run(
        ["git", "ls-files", "-z", "--", *SHIPPED], cwd=ROOT, capture_output=True, timeout=60
    )
    if done.returncode != 0:
        pytest.skip(f"git ls-files failed, so the tracked files are unknown: {done.stderr.decode()[-300:]}")
    return [ROOT / name.decode() for name in done.stdout.split(b"\0") if name]


def test_shipped_files_hold_no_machine_paths_machine_kinds_or_issue_numbers():
    files = _tracked_files()
    assert any(f.name == "adapter_config.json" for f in files), "the shipped adapter is not tracked?"
    hits = []
    for path in files:
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if match := FORBIDDEN.search(line):
                excerpt = line[max(0, match.start() - 60) : match.end() + 60].decode(errors="replace")
                hits.append(f"{path.relative_to(ROOT)}:{number}: ...{excerpt}...")
    assert not hits, "workbench traces in shipped files:\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_is_for():
    for text in (
        b"--out /tmp/x.json",
        b"device nvidia-h100-x1",
        b"NVIDIA-H200-X4",
        b"see Issue 7",
        b"/root/out/a",
    ):
        assert FORBIDDEN.search(text), text
    for text in (b"NVIDIA H100 80GB HBM3", b"runs/tmpdir/x", b"the issue of memory", b"tissue 3"):
        assert not FORBIDDEN.search(text), text
