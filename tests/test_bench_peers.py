"""The benchmark harness's obstore and CRT peers and its noop1m corpus, without a server.

benchmarks/run.py and the drivers' shared module (benchmarks/peers/_tree.py) are imported
from the main virtualenv: neither needs obstore nor awscrt to be imported.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH / "peers"))
sys.path.insert(0, str(BENCH))

import _tree  # noqa: E402

import corpus  # noqa: E402
import run  # noqa: E402


def test_keys_are_prefix_and_posix_relative_path(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.bin").write_bytes(b"12345")
    (tmp_path / "top.txt").write_text("hi\n")
    (tmp_path / "link").symlink_to(tmp_path / "top.txt")  # not a regular file: skipped
    got = [(u.key, u.size) for u in _tree.walk(tmp_path, "bench/r0/obstore")]
    assert got == [("bench/r0/obstore/top.txt", 3), ("bench/r0/obstore/a/b/x.bin", 5)]
    assert [u.key for u in _tree.walk(tmp_path, "")] == ["top.txt", "a/b/x.bin"]


def test_split_url() -> None:
    assert _tree.split_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert _tree.split_url("s3://bucket") == ("bucket", "")
    with pytest.raises(SystemExit):
        _tree.split_url("http://bucket/x")


def test_parts_in_flight() -> None:
    part = _tree.PART_SIZE
    assert _tree.parts_in_flight(0, part, 8) == 1
    assert _tree.parts_in_flight(part, part, 8) == 1
    assert _tree.parts_in_flight(part + 1, part, 8) == 2
    assert _tree.parts_in_flight(1 << 30, part, 8) == 8


def test_request_budget_never_exceeds_its_limit() -> None:
    async def scenario() -> tuple[int, int]:
        budget = _tree.RequestBudget(4)
        in_flight = peak = 0

        async def job(slots: int) -> None:
            nonlocal in_flight, peak
            in_flight += min(slots, 4)
            peak = max(peak, in_flight)
            await asyncio.sleep(0.001)
            in_flight -= min(slots, 4)
            await budget.release(slots)

        tasks = []
        for slots in (1, 3, 2, 8, 1, 1, 4, 2):  # 8: more than the budget, takes all of it
            await budget.acquire(slots)
            tasks.append(asyncio.create_task(job(slots)))
        await asyncio.gather(*tasks)
        return peak, budget.free

    peak, free = asyncio.run(scenario())
    assert peak <= 4
    assert free == 4


def make_bench(tmp_path: Path) -> run.Bench:
    server = SimpleNamespace(endpoint="http://127.0.0.1:1")
    return run.Bench(server=server, client=None, env={}, envs={},  # type: ignore[arg-type]
                     frozen=run.FrozenSource(tmp_path, "0" * 12), work=tmp_path, workers=32,
                     binaries={p: f"/bin/{p}" for p in run.TOOLS} | {
                         "obstore": "/peers/python", "crt": "/peers/python"})


def test_driver_argv_and_no_sync(tmp_path: Path) -> None:
    bench = make_bench(tmp_path)
    argv = bench.argv("obstore", "cold", tmp_path / "src", "small/r0/obstore", tmp_path)
    assert argv == ["/peers/python", str(BENCH / "peers" / "obstore_upload.py"),
                    str(tmp_path / "src"), f"s3://{run.BUCKET}/small/r0/obstore",
                    "--workers", "32"]
    assert bench.argv("crt", "setup", tmp_path, "noop/setup/crt", tmp_path)[1] == str(
        BENCH / "peers" / "crt_upload.py")
    with pytest.raises(ValueError, match="no sync"):
        bench.argv("crt", "noop", tmp_path, "p", tmp_path)
    assert [t for t in run.TOOLS if not run.has_sync(t)] == ["obstore", "crt"]
    for driver in run.DRIVERS.values():
        assert driver.is_file()


def test_noop1m_is_opt_in_and_run_by_asyncsync_only(tmp_path: Path) -> None:
    assert "noop1m" not in run.parse_args([]).corpora
    assert run.parse_args(["--corpora", "noop1m"]).corpora == ["noop1m"]
    bench = make_bench(tmp_path)
    assert bench.corpus_tools("noop1m") == ("asyncsync",)
    assert bench.corpus_tools("small") == run.TOOLS
    assert run.runs_corpus("asyncsync@abc1234", "noop1m")  # a baseline runs asyncsync's code


def test_noop1m_generator_is_seeded(tmp_path: Path) -> None:
    first = corpus.ensure("noop1m", 0.001, tmp_path / "a")  # 1,000 files, one per directory
    second = corpus.ensure("noop1m", 0.001, tmp_path / "b")
    assert (first.files, first.bytes) == (second.files, second.bytes)
    assert first.files == corpus.NOOP1M_DIRS
    assert len(list(first.path.iterdir())) == corpus.NOOP1M_DIRS
    name = "d999/f0000.txt"
    assert (first.path / name).read_bytes() == (second.path / name).read_bytes()
    assert (first.path / name).read_text().startswith("d999/f0000 step=")


def test_driver_summary_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tree.summary(3, 12)
    out = tmp_path / "x.out"
    out.write_text("noise\n" + capsys.readouterr().out + "\n\n")
    assert json.loads(run.last_line(out)) == {"type": "summary", "uploaded": 3, "bytes": 12}
    (tmp_path / "empty.out").write_text("")
    assert run.last_line(tmp_path / "empty.out") == ""


def row(corpus_name: str, case: str, tool: str, wall: float, rss: float = 50.0) -> dict[str, Any]:
    return {"corpus": corpus_name, "case": case, "tool": tool, "rounds": 3, "files": 10,
            "bytes": 100, "wall_s": wall, "cpu_s": wall / 2, "peak_rss_mb": rss,
            "files_per_s": 10 / wall, "mb_per_s": 1.0, "wall_min_s": wall,
            "wall_max_s": wall}


def test_best_peer_is_over_five_and_noop1m_targets() -> None:
    rows = [row("small", "cold", "asyncsync", 7.0), row("small", "cold", "s5cmd", 7.5),
            row("small", "cold", "aws", 40.0), row("small", "cold", "rclone", 11.0),
            row("small", "cold", "obstore", 6.2), row("small", "cold", "crt", 9.8),
            row("noop1m", "setup", "asyncsync", 900.0),
            row("noop1m", "noop", "asyncsync", 7.0, rss=120.0),
            row("noop1m", "floor", "find", 3.2),
            row("noop1m", "noop", "s5cmd", 150.0)]  # were it run: still no s5cmd target
    by = {(t["corpus"], t["target"]): t for t in run.targets(rows)}
    best = by[("small", "cold upload: wall ≤ the best peer's")]
    assert best["reference"].startswith("obstore") and not best["met"]
    find = by[("noop1m", "no-op re-sync of 10 files: wall ≤ 2.5× the find walk")]
    assert find["met"]
    assert not by[("noop1m", "no-op re-sync of 10 files: peak RSS ≤ 100 MB")]["met"]
    assert not any("s5cmd sync" in t["target"] for t in run.targets(rows))
    ratios = {(q["corpus"], q["case"]): q for q in run.ratios(rows)}
    assert ratios[("small", "cold")]["best_peer"] == "obstore"


def test_readme_says_what_is_not_measured() -> None:
    rows = [row("small", "cold", t, 7.0) for t in run.TOOLS]
    rows += [row("small", "noop", t, 1.0) for t in run.TOOLS if run.has_sync(t)]
    rows += [row("small", "floor", "find", 0.1), row("noop1m", "noop", "asyncsync", 7.0),
             row("noop1m", "floor", "find", 3.0)]
    machine = {"date": "2026-12-07T00:00:00+00:00", "nproc": 2, "cpu": "x", "memory_gib": 24,
               "os": "Linux", "python": "3.11", "asyncsync": "0", "seaweedfs": "4",
               "obstore": "obstore 0.12.1", "crt": "awscrt 0.38.0 (s3transfer 0.19.3)"}
    results = {"machine": machine,
               "config": {"rounds": 3, "workers": 32, "scale": 1.0, "corpora": ["small"]},
               "corpora": [{"name": "small", "files": 10, "bytes": 100},
                           {"name": "noop1m", "files": 10, "bytes": 100}],
               "medians": rows, "ratios": run.ratios(rows), "targets": run.targets(rows)}
    text = run.render_readme(results, "throughput.png")
    assert "against five peers" in text
    assert "obstore 0.12.1; awscrt 0.38.0" in text
    assert "Not measured, by design: no no-op re-sync for obstore and the CRT" in text
    assert "`noop1m` is run by asyncsync only (and a baseline), with find" in text
    assert "--corpora noop1m" in text
    assert "| CRT (peers/crt_upload.py) |" in text
