"""`make demo`: the headline story runs end to end and says what a user should see."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_demo_crashes_a_training_and_brings_it_back(tmp_path: Path) -> None:
    # A `torch` ahead of any real one on the path, in the demo and everything it starts
    # (the simulated training included): importing it leaves a mark and fails.
    fake = tmp_path / "no-torch"
    fake.mkdir()
    mark = tmp_path / "torch-imported"
    (fake / "torch.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(mark)!r}).write_text('imported')\n"
        "raise ImportError('the demo must not need torch')\n")
    path = os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "asyncsync.demo"], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": path})
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert seconds < 60, f"the demo took {seconds:.1f}s"
    assert not mark.exists(), "something in the demo imported torch"
    assert "(the training exited with 1;" in out
    runs_table = out[out.index("$ asyncsync runs"):out.index("$ asyncsync pull")]
    assert "detect/train" in runs_table and "crashed" in runs_table and "3/5" in runs_table
    assert "4 downloaded, 0 unchanged, 0 failed" in out
    assert "restored/ holds the run byte for byte" in out
    assert "0 uploaded, 4 unchanged, 0 failed; 0 B sent" in out
