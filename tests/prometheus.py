"""A real Prometheus (Debian's `prometheus` package, installed by `make test`) for the tests:
a generated config, a loopback port, temp storage, and its HTTP query API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

needs_prometheus = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="needs prometheus and promtool on PATH (make test installs Debian's prometheus)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Prometheus:
    """`prometheus` running on ``config`` with its TSDB in ``data``, until `stop`."""

    def __init__(self, config: str, data: Path, *extra: str) -> None:
        data.mkdir(parents=True, exist_ok=True)
        self.config_path = data.parent / f"{data.name}.yml"
        self.config_path.write_text(config)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data.parent / f"{data.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={self.config_path}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", *extra],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"prometheus did not start:\n{self.log}")
            time.sleep(0.2)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        """The ``data`` of a successful API answer (an error answer fails the test)."""
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                raise AssertionError(f"{path} {params}: {exc.read().decode()}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The result of an instant query (a vector's samples, or [] for an empty one)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Any]:
        return list(self.api("query_range", query=expr, start=start, end=end,
                             step=step)["result"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
