"""The conformance matrix's other S3 servers: moto server and s3rver, each a real process on
loopback, started once per test session beside SeaweedFS.

They are there for what they do not do: moto stores a body whatever its Content-MD5 says and
echoes no part checksum; s3rver has no ListParts, no AbortMultipartUpload and no
ListMultipartUploads, and completes a multipart object under a plain MD5 ETag. `make test`
installs both into the virtualenv (`.venv/moto`, `.venv/s3rver`); the suite fails, rather than
skips, where one is missing, so CI cannot pass without running them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(sys.prefix)
MOTO_SERVER = Path(os.environ.get("ASYNCSYNC_MOTO_SERVER", VENV / "moto" / "bin" / "moto_server"))
S3RVER = Path(os.environ.get("ASYNCSYNC_S3RVER",
                             VENV / "s3rver" / "node_modules" / ".bin" / "s3rver"))
INSTALL_HINT = "run `make test` once: it installs moto server and s3rver into .venv"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One S3 server process on a loopback port, ready once it accepts connections."""

    name = ""
    access_key = ""
    secret_key = ""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log = data_dir / f"{self.name}.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> ServerProcess:
        program = Path(self.command()[0])
        if not program.exists():
            raise RuntimeError(f"{self.name}: {program} is missing; {INSTALL_HINT}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self._log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout:g}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class MotoServer(ServerProcess):
    name = "moto"
    # moto accepts any keys; these only have to be well formed.
    access_key = "moto-access-key"
    secret_key = "moto-secret-key"

    def command(self) -> list[str]:
        return [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)]


class S3rver(ServerProcess):
    name = "s3rver"
    access_key = "S3RVER"  # s3rver's only account
    secret_key = "S3RVER"

    def command(self) -> list[str]:
        return [str(S3RVER), "--address", "127.0.0.1", "--port", str(self.port),
                "--directory", str(self.data_dir / "data"),
                "--no-vhost-buckets"]

    def start(self, timeout: float = 60.0) -> ServerProcess:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        return super().start(timeout)
