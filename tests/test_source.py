"""Unit tests for asyncsync.pipeline.source: a read never leaves the tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asyncsync.errors import SourceChanged, SourceNotRegular, SourceVanished
from asyncsync.pipeline.digest import hash_file, read_small
from asyncsync.pipeline.source import SourcePath, SourceRoot, open_parent, open_source, stat_source

SECRET = b"the node's service-account token"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """SRC with train/weights/last.pt and train/args.yaml, and a secret outside SRC."""
    src = tmp_path / "src"
    (src / "train" / "weights").mkdir(parents=True)
    (src / "train" / "weights" / "last.pt").write_bytes(b"weights")
    (src / "train" / "args.yaml").write_bytes(b"epochs: 3\n")
    outside = tmp_path / "outside"
    (outside / "weights").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "weights" / "last.pt").write_bytes(SECRET)
    return src, outside


def scanned(path: Path, src: Path, *, follow: bool = False) -> SourcePath:
    """The file as a scan records it (a followed link: its target's identity)."""
    st = os.stat(path, follow_symlinks=follow)
    return SourcePath(str(path), SourceRoot(str(src), follow), st.st_dev, st.st_ino)


def swap_for_symlink(path: Path, target: Path) -> None:
    """What a hostile writer in SRC does: an atomic rename of a symlink over the name."""
    temp = path.parent / ".swap"
    os.symlink(target, temp)
    os.rename(temp, path)


def test_an_honest_file_is_read(tree: tuple[Path, Path]) -> None:
    src, _ = tree
    source = scanned(src / "train" / "weights" / "last.pt", src)
    with open_source(source) as opened:
        assert os.read(opened.fd, 100) == b"weights"
        assert opened.name == "last.pt"
    assert read_small(source, 1000, False).body == b"weights"


def test_a_file_swapped_for_a_symlink_is_not_read(tree: tuple[Path, Path]) -> None:
    src, outside = tree
    path = src / "train" / "args.yaml"
    source = scanned(path, src)
    swap_for_symlink(path, outside / "secret.txt")
    with pytest.raises(SourceNotRegular, match="replaced by a symlink"):
        open_source(source)
    with pytest.raises(SourceNotRegular):
        read_small(source, 1000, False)
    with pytest.raises(SourceNotRegular):
        hash_file(source)
    with pytest.raises(SourceNotRegular):
        stat_source(str(path), source.root)


def test_a_directory_swapped_for_a_symlink_is_not_walked_through(
    tree: tuple[Path, Path],
) -> None:
    src, outside = tree
    path = src / "train" / "weights" / "last.pt"
    source = scanned(path, src)
    os.rename(src / "train" / "weights", src / "train" / "weights.old")
    os.symlink(outside / "weights", src / "train" / "weights")
    with pytest.raises(SourceNotRegular, match="directory 'weights' on its path"):
        open_source(source)
    with pytest.raises(SourceNotRegular):
        open_parent(str(path), str(src))


def test_another_regular_file_is_a_change_not_a_read(tree: tuple[Path, Path]) -> None:
    src, _ = tree
    path = src / "train" / "args.yaml"
    source = scanned(path, src)
    replacement = src / "train" / ".args.yaml.tmp"
    replacement.write_bytes(b"epochs: 4\n")
    os.rename(replacement, path)  # an atomic save: a new inode under the same name
    with pytest.raises(SourceChanged, match="replaced since the scan"):
        open_source(source)
    # Stat'ed afresh (as the uploader does before reading again), it is read.
    again = stat_source(str(path), source.root)
    fresh = SourcePath(str(path), source.root, again.st_dev, again.st_ino)
    assert read_small(fresh, 1000, False).body == b"epochs: 4\n"


def test_a_fifo_swapped_in_neither_hangs_nor_is_read(tree: tuple[Path, Path]) -> None:
    src, _ = tree
    path = src / "train" / "args.yaml"
    source = scanned(path, src)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(SourceNotRegular, match="a FIFO"):
        open_source(source)


def test_vanished_and_paths_outside_the_root(tree: tuple[Path, Path]) -> None:
    src, outside = tree
    path = src / "train" / "args.yaml"
    source = scanned(path, src)
    path.unlink()
    with pytest.raises(SourceVanished):
        open_source(source)
    stranger = scanned(outside / "secret.txt", outside)
    with pytest.raises(SourceNotRegular, match="not inside the source"):
        open_source(SourcePath(stranger.path, SourceRoot(str(src)), 0, 0))
    dotted = SourcePath(f"{src}/train/../../outside/secret.txt", SourceRoot(str(src)), 0, 0)
    with pytest.raises(SourceNotRegular, match="not a plain path"):
        open_source(dotted)


def test_follow_symlinks_reads_targets_inside_and_refuses_outside(
    tree: tuple[Path, Path],
) -> None:
    src, outside = tree
    inside_link = src / "train" / "best.pt"
    os.symlink("weights/last.pt", inside_link)
    with open_source(scanned(inside_link, src, follow=True)) as opened:
        assert os.read(opened.fd, 100) == b"weights"
    outside_link = src / "train" / "leak.txt"
    os.symlink(outside / "secret.txt", outside_link)
    with pytest.raises(SourceNotRegular, match="outside the source"):
        open_source(scanned(outside_link, src, follow=True))
    # Scanned while it pointed inside, swapped to point outside before the read.
    source = scanned(inside_link, src, follow=True)
    swap_for_symlink(inside_link, outside / "secret.txt")
    with pytest.raises(SourceNotRegular, match="outside the source"):
        open_source(source)


def test_follow_symlinks_through_a_directory_link_inside(tree: tuple[Path, Path]) -> None:
    src, outside = tree
    os.symlink("train", src / "latest")
    path = src / "latest" / "weights" / "last.pt"
    with open_source(scanned(path, src, follow=True)) as opened:
        assert os.read(opened.fd, 100) == b"weights"
    source = scanned(path, src, follow=True)
    swap_for_symlink(src / "latest", outside)
    with pytest.raises(SourceNotRegular):
        open_source(source)


def test_the_run_record_reads_no_results_csv_through_a_symlink(
    tree: tuple[Path, Path],
) -> None:
    from asyncsync.commands.record import training_progress

    src, outside = tree
    (src / "train" / "results.csv").write_bytes(b"epoch,loss\n1,0.5\n2,0.4\n")
    (outside / "results.csv").write_bytes(b"token,value\n" + SECRET + b",x\n")
    (src / "leak").mkdir()
    os.symlink(outside / "results.csv", src / "leak" / "results.csv")
    progress = {run["path"]: run for run in training_progress(src)}
    assert progress["train"]["epochs"] == 2
    assert progress["train"]["metrics"] == {"epoch": "2", "loss": "0.4"}
    assert progress["leak"] == {"path": "leak", "epochs": 0, "metrics": {}}
    assert SECRET.decode() not in repr(progress)
