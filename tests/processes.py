"""A speechxfer command run in this process and under torchrun with two CPU processes, for the tests that compare
what the two write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from speechxfer.cli import main


def one_and_two_processes(argv: list[str], out: Path) -> tuple[dict[str, bytes], dict[str, bytes], str]:
    """Run `speechxfer ARGV --output-dir OUT/one` here, on 1 thread as torchrun's processes run (OMP_NUM_THREADS=1:
    the same sums in the same order), and the same under `torchrun --nproc_per_node 2` into OUT/two with this tree's
    speechxfer. Asserts both succeed; returns each folder's files (name -> bytes) and the two processes' stderr."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--output-dir", str(out / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "speechxfer", *argv, "--output-dir", str(out / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return ({p.name: p.read_bytes() for p in (out / "one").iterdir()},
            {p.name: p.read_bytes() for p in (out / "two").iterdir()}, done.stderr)
