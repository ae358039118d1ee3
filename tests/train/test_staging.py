"""Replacing an output directory only when the replacement is complete (pgolf_train.staging)."""
from __future__ import annotations

import os

import pytest

from pgolf_train import staging
from pgolf_train.shards import INCOMPLETE_MARKER
from pgolf_train.staging import set_aside, staged_directory


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _old(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "a.bin").write_bytes(b"old a")
    (final / "keep.txt").write_bytes(b"user notes")
    return final


def test_success_swaps_in_and_carries_what_the_caller_keeps(tmp_path):
    final = _old(tmp_path)
    with staged_directory(final, carry=lambda name: name != "a.bin") as new:
        assert new.parent == tmp_path and new != final and (new / INCOMPLETE_MARKER).exists()
        (new / "b.bin").write_bytes(b"new b")
    assert _tree(final) == {"b.bin": b"new b", "keep.txt": b"user notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # nothing aside or staged is left


def test_failure_leaves_the_old_directory_and_removes_the_staging_one(tmp_path):
    final = _old(tmp_path)
    before = _tree(final)
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(final) as new:
            (new / "a.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert _tree(final) == before and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_failure_removes_the_directories_it_made(tmp_path):
    with pytest.raises(ValueError):
        with staged_directory(tmp_path / "x" / "y" / "final"):
            raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_swap_puts_everything_back(tmp_path, monkeypatch):
    final = _old(tmp_path)
    before = _tree(final)
    real = os.rename

    def rename(src, dst):
        if ".final.new-" in str(src) and str(dst) == str(final):  # the last step of the swap
            raise OSError("rename refused")
        return real(src, dst)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        with staged_directory(final) as new:
            (new / "b.bin").write_bytes(b"new")
    assert _tree(final) == before  # keep.txt was carried into the new directory, then back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_staging_directory_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_directory(tmp_path / "final") as new:
            assert new.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o750


def test_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "final").write_bytes(b"a file")
    with pytest.raises(NotADirectoryError):
        with staged_directory(tmp_path / "final"):
            pass


def test_set_aside_restores_on_failure_and_drops_the_old_on_success(tmp_path):
    run = tmp_path / "train"
    run.mkdir()
    (run / "model.pgolf").write_bytes(b"earlier")
    with pytest.raises(RuntimeError):
        with set_aside(run):
            assert not run.exists()
            run.mkdir()
            (run / "train.log").write_text("half a run")
            raise RuntimeError("training failed")
    assert _tree(run) == {"model.pgolf": b"earlier"}
    with set_aside(run):
        run.mkdir()
        (run / "model.pgolf").write_bytes(b"new")
    assert _tree(run) == {"model.pgolf": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_a_relative_or_symlinked_final_is_replaced_where_it_points(tmp_path, monkeypatch):
    final = _old(tmp_path)
    (tmp_path / "link").symlink_to(final)
    with staged_directory(tmp_path / "link") as new:
        assert new.parent == tmp_path and ".final.new-" in new.name
        (new / "b.bin").write_bytes(b"new b")
    assert (tmp_path / "link").is_symlink() and _tree(final)["b.bin"] == b"new b"
    monkeypatch.chdir(tmp_path)
    with staged_directory("final") as new:
        (new / "c.bin").write_bytes(b"c")
    assert set(_tree(final)) == {"a.bin", "b.bin", "c.bin", "keep.txt"}


def test_a_build_removes_what_a_killed_build_left_and_names_asides(tmp_path, capsys):
    """A hard kill (SIGKILL, power loss) skips every cleanup: the next build of the same directory
    removes the dead process's unfinished staging directory; an aside (the old contents) is only named;
    a live process's staging and an unmarked directory are left alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    final = tmp_path / "data"
    killed = tmp_path / f".data.new-{pid}-abc123"
    killed.mkdir()
    (killed / INCOMPLETE_MARKER).write_bytes(b"")
    (killed / "fineweb_train_000000.bin").write_bytes(b"half")
    live = tmp_path / f".data.new-{os.getpid()}-def456"
    live.mkdir()
    (live / INCOMPLETE_MARKER).write_bytes(b"")
    unmarked = tmp_path / f".data.new-{pid}-0a0b0c"
    unmarked.mkdir()
    aside = tmp_path / f".data.old-{pid}-123abc"
    aside.mkdir()
    (aside / "keep.txt").write_text("the earlier contents")
    with staged_directory(final) as work:
        (work / "x").write_text("new")
    assert not killed.exists() and live.exists() and unmarked.exists()
    assert (aside / "keep.txt").read_text() == "the earlier contents"
    assert str(aside) in capsys.readouterr().err and (final / "x").read_text() == "new"
