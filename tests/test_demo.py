"""`make demo`: the headline story runs end to end and says what a user should see."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_demo_crashes_a_training_and_brings_it_back() -> None:
    done = subprocess.run([sys.executable, "-m", "asyncsync.demo"], capture_output=True,
                          text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "(the training exited with 1;" in out
    runs_table = out[out.index("$ asyncsync runs"):out.index("$ asyncsync pull")]
    assert "detect/train" in runs_table and "crashed" in runs_table and "3/5" in runs_table
    assert "4 downloaded, 0 unchanged, 0 failed" in out
    assert "restored/ holds the run byte for byte" in out
    assert "0 uploaded, 4 unchanged, 0 failed; 0 B sent" in out
