"""`asyncsync serve`: the run browser, in a real Chromium, over runs that real `asyncsync run`
trainings wrote to SeaweedFS (finished, crashed, still running) and one pushed under a hostile
name. One served bucket and one browser for the module; the pure parts (auth, key checks,
ranges, escaping) are unit-tested without either.

``ASYNCSYNC_SERVE_PNG=docs`` also saves the screenshots README shows (docs/serve-runs.png,
docs/serve-run.png).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asyncsync.errors import ConfigError
from asyncsync.service.web.app import content_type_of, parse_range, safe_key
from asyncsync.service.web.auth import Credentials, hash_password, read_auth_file
from asyncsync.service.web.markup import Html, json_script, render

from .browser import launch
from .conftest import ASYNCSYNC, S3Server, new_bucket, read_object, run_cli, wait_for

XSS = "<img src=x onerror=alert(1)>"

# A training shaped like ultralytics': args.yaml first, then per epoch a results.csv row of
# its usual columns, weights rewritten, and plots (small real PNGs).
TRAIN = r"""
import os, struct, sys, time, zlib
out, epochs, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3]
run = os.path.join(out, "exp")
os.makedirs(os.path.join(run, "weights"), exist_ok=True)
def png(path, width, height, shade):
    raw = b"".join(b"\0" + b"".join(bytes((x * 255 // width, y * 255 // height, shade))
                                     for x in range(width)) for y in range(height))
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
with open(os.path.join(run, "args.yaml"), "w") as f:
    f.write(f"task: detect\nmodel: yolov8n.yaml\nepochs: {epochs}\nimgsz: 64\n")
columns = ["epoch", "time", "train/box_loss", "train/cls_loss", "train/dfl_loss",
           "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)",
           "metrics/mAP50-95(B)", "val/box_loss", "val/cls_loss", "val/dfl_loss", "lr/pg0"]
with open(os.path.join(run, "results.csv"), "w") as f:
    f.write(",".join(columns) + "\n")
for epoch in range(1, epochs + 1):
    time.sleep(0.3)
    with open(os.path.join(run, "weights", "last.pt"), "wb") as f:
        f.write(os.urandom(200_000))
    m = 1 - 1 / (epoch + 1)
    values = [epoch, epoch * 0.3, 1.5 / epoch, 2 / epoch, 1.2 / epoch, 0.5 * m, 0.4 * m,
              0.6 * m, 0.4 * m, 1.6 / epoch, 2.1 / epoch, 1.3 / epoch, 0.01 / epoch]
    with open(os.path.join(run, "results.csv"), "a") as f:
        f.write(",".join(f"{v:.5g}" for v in values) + "\n")
    if epoch == 2 and crash == "exit":
        os._exit(3)
    if epoch == 3 and crash == "wait":
        break
with open(os.path.join(run, "weights", "best.pt"), "wb") as f:
    f.write(os.urandom(200_000))
for name, shade in (("results.png", 40), ("confusion_matrix.png", 120), ("PR_curve.png", 200),
                    ("train_batch0.png", 90)):
    png(os.path.join(run, name), 96, 64, shade)
if crash == "wait":
    time.sleep(3600)
"""
FAST = ["--settle", "0.3", "--interval", "0.5", "--checkpoint-interval", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- pure parts --------------------------------------------------------------------------------


def test_auth_file_lines_and_basic_auth(tmp_path: Path) -> None:
    line = f"alice:{hash_password('correct horse')}"
    (tmp_path / "users").write_text(f"# the browser's users\n\n{line}\n")
    users = read_auth_file(tmp_path / "users")
    assert list(users) == ["alice"] and "correct horse" not in users["alice"]
    credentials = Credentials(users)

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert credentials.check(basic("alice", "correct horse")) == "alice"
    assert credentials.check(basic("alice", "wrong")) is None
    assert credentials.check(basic("bob", "correct horse")) is None
    assert credentials.check(None) is None
    token = Credentials({}, token="t" * 32)
    assert token.check("Bearer " + "t" * 32) == "token"
    assert token.check(basic("anyone", "t" * 32)) == "anyone"
    assert token.check("Bearer " + "x" * 32) is None
    (tmp_path / "bad").write_text("alice:plaintext\n")
    with pytest.raises(ConfigError, match="line 1: expected USER:scrypt"):
        read_auth_file(tmp_path / "bad")


def test_object_keys_stay_under_the_prefix() -> None:
    assert safe_key("exp/results.csv") and safe_key("exp/_asyncsync/run.json")
    for key in ("", "../other/x", "exp/../../x", "exp/./x", "exp//x", "/etc/passwd",
                "_asyncsync/shards/0-4.json", "exp/_asyncsync/history/a", "a\\..\\b"):
        assert not safe_key(key), key


def test_ranges_and_served_types() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=0-999", 100) == (0, 100)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several: the whole object
    assert parse_range(None, 100) is None
    with pytest.raises(Exception, match="Range Not Satisfiable"):
        parse_range("bytes=100-", 100)
    assert content_type_of("exp/results.png") == ("image/png", True)
    assert content_type_of("exp/results.csv") == ("text/plain; charset=utf-8", True)
    assert content_type_of("exp/page.html") == ("application/octet-stream", False)
    assert content_type_of("exp/plot.svg") == ("application/octet-stream", False)


def test_markup_escapes_whatever_comes_from_the_bucket() -> None:
    page = render("<td>{name}</td>", name=XSS)
    assert page == "<td>&lt;img src=x onerror=alert(1)&gt;</td>"
    assert render("<p>{x}</p>", x=Html("<b>ok</b>")) == "<p><b>ok</b></p>"
    assert "\u202e" not in render("{x}", x="a\u202eb")  # a bidi override is shown, not used
    data = json_script("d", {"label": "</script><script>alert(1)</script>"})
    assert data.count("</script>") == 1 and "<script>alert" not in data


# -- against SeaweedFS, in Chromium ------------------------------------------------------------


@dataclass
class Served:
    server: S3Server
    bucket: str
    url: str
    tmp: Path
    running: subprocess.Popen[str]


@pytest.fixture(scope="module")
def served(seaweedfs_server: S3Server, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    """Three runs under `asyncsync run` (finished, crashed at epoch 2, running), one pushed
    run named like an XSS payload with a column named so too, and `asyncsync serve`."""
    server = seaweedfs_server
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "train.py").write_text(TRAIN)
    with new_bucket(server) as bucket:
        team = f"s3://{bucket}/team"
        trainings = {}
        for name, epochs, crash in (("finished", 5, "none"), ("crashed", 5, "exit"),
                                    ("running", 6, "wait")):
            where = tmp / name
            where.mkdir()
            trainings[name] = subprocess.Popen(
                [ASYNCSYNC, "run", str(where / "runs"), f"{team}/{name}", "--state-dir",
                 str(where / "state"), *FAST, "--", sys.executable, str(tmp / "train.py"),
                 str(where / "runs"), str(epochs), crash],
                env=server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        hostile = tmp / "pushed" / XSS
        hostile.mkdir(parents=True)
        (hostile / "results.csv").write_text(f"epoch,{XSS}\n1,0.5\n2,0.6\n")
        done = run_cli("push", hostile, f"{team}/{XSS}", "--state-dir", tmp / "push-state",
                       env=server.env())
        assert done.returncode == 0, done.stderr
        for name in ("finished", "crashed"):
            _, stderr = trainings[name].communicate(timeout=120)
            assert trainings[name].returncode in (0, 3), stderr
        client = server.client()
        wait_for(lambda: b"train_batch0" in b"".join(
            obj["Key"].encode() for obj in client.list_objects_v2(
                Bucket=bucket, Prefix="team/running/").get("Contents", [])), 60,
            "the running training's plots in the bucket")
        port = free_port()
        log = open(tmp / "serve.log", "w")
        serving = subprocess.Popen([ASYNCSYNC, "serve", team, "--addr", f"127.0.0.1:{port}"],
                                   env=server.env(), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _get(url, "/healthz")[0] == 200, 30, "the browser's server")
            yield Served(server, bucket, url, tmp, trainings["running"])
        finally:
            serving.send_signal(signal.SIGTERM)
            serving.wait(timeout=30)
            log.close()
            trainings["running"].send_signal(signal.SIGTERM)
            trainings["running"].communicate(timeout=60)


def _get(base: str, path: str, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    """A raw GET of ``path`` exactly as written (no client normalises its dots)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    except OSError:
        return 0, {}, b""
    finally:
        connection.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.dialogs, page.errors = dialogs, errors
    yield page
    context.close()
    assert dialogs == [] and errors == []


def _rows(page: Any) -> dict[str, str]:
    return dict(page.eval_on_selector_all(
        "#runs tbody tr", "rows => rows.map(r => [r.dataset.run, r.dataset.status])"))


@pytest.mark.s3
def test_runs_page_lists_each_run_with_its_status(served: Served, page: Any) -> None:
    page.goto(served.url + "/")
    assert _rows(page) == {"crashed/exp": "crashed", "finished/exp": "finished",
                           "running/exp": "running", XSS: "pushed"}
    finished = page.locator('tr[data-run="finished/exp"]')
    assert finished.locator("td").nth(7).inner_text() == "5/5"
    assert page.locator('tr[data-run="crashed/exp"] td').nth(7).inner_text() == "2/5"
    # Filtering and sorting happen in the page.
    page.fill("#filter", "crash")
    assert page.locator("#runs tbody tr:not([hidden])").count() == 1
    page.fill("#filter", "")
    page.select_option("#status-filter", "running")
    assert page.locator("#runs tbody tr:not([hidden])").count() == 1
    page.select_option("#status-filter", "")
    page.click("th:has-text('best mAP50-95')")
    page.click("th:has-text('best mAP50-95')")  # descending: the best run first
    assert page.locator("#runs tbody tr").first.get_attribute("data-run") == "finished/exp"
    if os.environ.get("ASYNCSYNC_SERVE_PNG"):
        page.screenshot(path=str(Path(os.environ["ASYNCSYNC_SERVE_PNG"]) / "serve-runs.png"))


@pytest.mark.s3
def test_run_page_curves_plots_and_pull_command(served: Served, page: Any) -> None:
    page.goto(served.url + "/run/finished/exp")
    rows = read_object(served.server.client(), served.bucket,
                       "team/finished/exp/results.csv").decode().strip().splitlines()[1:]
    page.wait_for_function("window.asyncsyncCharts && window.asyncsyncCharts.mAP")
    points = page.evaluate("window.asyncsyncCharts.mAP.data[0].length")
    assert points == len(rows) == 5
    series = page.evaluate("window.asyncsyncCharts.mAP.series.map(s => s.label)")
    assert series == ["epoch", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]
    assert set(page.evaluate("Object.keys(window.asyncsyncCharts)")) >= {
        "Losses (train)", "Losses (val)", "Precision / recall", "Learning rate"}
    images = page.locator(".plots img")
    assert images.count() == 4
    page.wait_for_function("[...document.querySelectorAll('.plots img')].every(i => i.complete)")
    widths = page.eval_on_selector_all(".plots img", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths == [96] * 4
    assert page.locator(".plots figcaption").first.inner_text() == "results.png"
    pull = f"asyncsync pull s3://{served.bucket}/team/finished/exp ./exp"
    assert page.inner_text("#pull") == pull
    assert "epochs: 5" in page.inner_text("#args")
    assert '"status": "finished"' in page.inner_text("#record")
    downloads = page.eval_on_selector_all(".downloads a", "a => a.map(x => x.textContent)")
    assert sorted(downloads) == ["weights/best.pt", "weights/last.pt"]
    body = page.request.get(served.url + "/obj/finished/exp/weights/best.pt").body()
    assert body == read_object(served.server.client(), served.bucket,
                               "team/finished/exp/weights/best.pt")
    html = page.content()
    assert served.server.endpoint not in html and served.server.secret_key not in html
    assert served.server.access_key not in html
    if os.environ.get("ASYNCSYNC_SERVE_PNG"):
        page.screenshot(path=str(Path(os.environ["ASYNCSYNC_SERVE_PNG"]) / "serve-run.png"),
                        full_page=True)


@pytest.mark.s3
def test_compare_overlays_the_runs_picked(served: Served, page: Any) -> None:
    page.goto(served.url + "/")
    page.check('tr[data-run="finished/exp"] input[type=checkbox]')
    page.check('tr[data-run="crashed/exp"] input[type=checkbox]')
    page.click("text=Compare selected")
    page.wait_for_url("**/compare?*")
    page.wait_for_function("Object.keys(window.asyncsyncCharts || {}).length == 1")
    chart = "window.asyncsyncCharts['metrics/mAP50-95(B)']"
    labels = page.evaluate(f"{chart}.series.map(s => s.label)")
    assert labels == ["epoch", "crashed/exp", "finished/exp"]
    assert page.evaluate(f"{chart}.data[0]") == [1, 2, 3, 4, 5]
    assert page.evaluate(f"{chart}.data[1].filter(v => v !== null).length") == 2
    page.select_option("#metric", "metrics/precision(B)")
    page.click("text=show")
    page.wait_for_function("window.asyncsyncCharts['metrics/precision(B)']")


@pytest.mark.s3
def test_hostile_names_stay_text(served: Served, page: Any) -> None:
    page.goto(served.url + "/")
    assert page.locator(f'tr[data-run="{XSS}"] a').inner_text() == XSS
    assert page.locator("#runs img").count() == 0
    page.click(f'tr[data-run="{XSS}"] a')
    page.wait_for_function("window.asyncsyncCharts && window.asyncsyncCharts.Other")
    assert page.inner_text("h1").startswith(XSS)
    legend = page.eval_on_selector_all(".u-legend .u-label", "l => l.map(x => x.textContent)")
    assert XSS in legend
    assert page.locator("main img").count() == 0  # nothing parsed as an element
    assert page.evaluate("window.asyncsyncCharts.Other.data[0].length") == 2


@pytest.mark.s3
def test_object_route_serves_keys_under_the_prefix_only_with_ranges(served: Served) -> None:
    for path in ("/obj/../other/x", "/obj/finished/../../x", "/obj/%2e%2e/other/x",
                 "/obj/_asyncsync/shards/x", "/obj/finished/exp/nothing-here"):
        assert _get(served.url, path)[0] == 404, path
    whole = read_object(served.server.client(), served.bucket, "team/finished/exp/results.csv")
    status, headers, body = _get(served.url, "/obj/finished/exp/results.csv",
                                 {"Range": "bytes=10-29"})
    assert status == 206 and body == whole[10:30]
    assert headers["Content-Range"] == f"bytes 10-29/{len(whole)}"
    status, _, body = _get(served.url, "/obj/finished/exp/results.csv", {"Range": "bytes=-7"})
    assert status == 206 and body == whole[-7:]
    assert _get(served.url, "/obj/finished/exp/results.csv",
                {"Range": f"bytes={len(whole)}-"})[0] == 416
    status, headers, _ = _get(served.url, "/obj/finished/exp/weights/last.pt")
    assert status == 200 and headers["Content-Disposition"].startswith("attachment")
    # Read-only: nothing but GET and HEAD.
    host, port = served.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("DELETE", "/obj/finished/exp/results.csv")
    assert connection.getresponse().status == 405
    connection.close()
    # A page asked for under another Host name (DNS rebinding) is refused.
    assert _get(served.url, "/", {"Host": "attacker.example:80"})[0] == 421


@pytest.mark.s3
def test_basic_auth_presign_and_no_public_address_without_auth(served: Served) -> None:
    users = served.tmp / "users"
    entry = subprocess.run([sys.executable, "-m", "asyncsync.service.web.auth", "alice"],
                           input="correct horse\n", capture_output=True, text=True, check=True)
    users.write_text(entry.stdout)
    team = f"s3://{served.bucket}/team"
    refused = run_cli("serve", team, "--addr", f"0.0.0.0:{free_port()}",
                      env=served.server.env(), timeout=30)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "--auth-file" in refused.stderr
    port = free_port()
    serving = subprocess.Popen(
        [ASYNCSYNC, "serve", team, "--addr", f"0.0.0.0:{port}", "--auth-file", str(users),
         "--presign", "--presign-expiry", "120"], env=served.server.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(url, "/healthz")[0] == 200, 30, "the browser's server")
        status, headers, _ = _get(url, "/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        good = "Basic " + base64.b64encode(b"alice:correct horse").decode()
        bad = "Basic " + base64.b64encode(b"alice:wrong horse").decode()
        assert _get(url, "/", {"Authorization": bad})[0] == 401
        status, _, body = _get(url, "/", {"Authorization": good})
        assert status == 200 and b"finished/exp" in body
        status, headers, _ = _get(url, "/obj/finished/exp/results.csv",
                                  {"Authorization": good})
        assert status == 302 and headers["Location"].startswith(served.server.endpoint)
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(headers["Location"]).query)
        if "X-Amz-Expires" in query:  # SigV4
            assert query["X-Amz-Expires"] == ["120"]
        else:  # SigV2 query signing: an absolute expiry
            assert 100 < int(query["Expires"][0]) - time.time() <= 121
        import urllib.request

        with urllib.request.urlopen(headers["Location"], timeout=30) as answer:
            assert answer.read() == read_object(served.server.client(), served.bucket,
                                                "team/finished/exp/results.csv")
        assert _get(url, "/obj/finished/exp/results.csv")[0] == 401
    finally:
        serving.send_signal(signal.SIGTERM)
        _, stderr = serving.communicate(timeout=30)
    assert served.server.secret_key not in stderr


@pytest.mark.s3
def test_watch_serve_shows_the_daemon_s_live_sync_state(served: Served) -> None:
    source = served.tmp / "live-src" / "exp"
    source.mkdir(parents=True)
    (source / "results.csv").write_text("epoch,metrics/mAP50(B)\n1,0.1\n")
    port = free_port()
    watching = subprocess.Popen(
        [ASYNCSYNC, "watch", str(source.parent), f"s3://{served.bucket}/live", "--state-dir",
         str(served.tmp / "live-state"), *FAST, "--serve", f"127.0.0.1:{port}"],
        env=served.server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def synced() -> Any:
            status, _, body = _get(url, "/api/runs")
            runs = json.loads(body) if status == 200 else []
            return runs and runs[0]["live"] and runs[0]["live"]["last_upload"] and runs[0]

        run = wait_for(synced, 60, "the run in sync")
        assert run["run"] == "exp" and run["live"]["pending"] == 0
        assert b"in sync" in _get(url, "/")[2]
    finally:
        watching.send_signal(signal.SIGTERM)
        _, stderr = watching.communicate(timeout=60)
    assert watching.returncode == 0, stderr
