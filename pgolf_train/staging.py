"""Replace an output directory only when its replacement is complete.

A command that rebuilds a directory (``pgolf data prepare --force``, ``pgolf run --force``) must
not delete the old contents before the new ones exist: a bad input line or a signal halfway
would leave nothing. Two patterns:

* ``staged_directory(final)``: build in a fresh hidden sibling of ``final`` (marked unfinished);
  on success the old ``final`` is renamed aside, the new one renamed in, the old one removed.
  On failure the sibling is removed and ``final`` is untouched. A sibling that a hard kill left
  (its process gone, still marked unfinished) is removed by the next build; an aside is only named.
* ``set_aside(path)``: for outputs whose paths are recorded while they are written (a training
  run): the old ``path`` is renamed aside, the new one is built in place; on failure the partial
  new one is removed and the old one renamed back.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from .shards import INCOMPLETE_MARKER


def _umask_mode(mode: int = 0o777) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _sibling(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def leftovers(final: Path) -> tuple[list[Path], list[Path]]:
    """``(staging, aside)``: siblings of ``final`` that a killed command left (its process is gone).
    Staging directories still hold the unfinished marker; asides hold what ``final`` held before."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(new|old)-(\d+)-[0-9a-f]{{6}}")
    staging, aside = [], []
    if not final.parent.is_dir():
        return staging, aside
    for p in sorted(final.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(2))) or not p.is_dir() or p.is_symlink():
            continue
        if m.group(1) == "new" and (p / INCOMPLETE_MARKER).exists():
            staging.append(p)
        elif m.group(1) == "old":
            aside.append(p)
    return staging, aside


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, deepest last (to undo with rmdir)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_created(created: list[Path]) -> None:
    """Remove the directories ``make_dirs`` created, deepest first, if they are still empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, *, carry: Callable[[str], bool] = lambda name: True,
                     marker: bool = True) -> Iterator[Path]:
    """Yield an empty directory beside ``final``; when the block succeeds it becomes ``final``.

    Entries of an old ``final`` that the new directory lacks are moved into it when ``carry(name)``
    says so (files a user keeps there); the rest of the old directory is removed. With ``marker``
    the staging directory holds ``INCOMPLETE_MARKER`` until the swap, so loaders refuse it if a
    kill leaves it behind. A symlinked ``final`` is followed (the link stays).
    """
    final = Path(final).resolve()  # "." has no name to make a sibling of; a symlink's target is replaced
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a directory")
    staging, aside = leftovers(final)
    for p in staging:  # a killed build of this directory: unfinished by its own marker, its process gone
        shutil.rmtree(p, ignore_errors=True)
    for p in aside:  # never removed: it may hold the only copy of what final held
        print(f"note: {p} was left by an interrupted command and holds the earlier contents of {final}; "
              f"remove it or move it back yourself", file=sys.stderr)
    created = make_dirs(final.parent)
    new = _sibling(final, "new")
    new.mkdir(mode=_umask_mode())
    try:
        if marker:
            (new / INCOMPLETE_MARKER).write_bytes(b"")
        yield new
        if marker:
            (new / INCOMPLETE_MARKER).unlink()
        _swap_in(new, final, carry)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        remove_created(created)
        raise


def _swap_in(new: Path, final: Path, carry: Callable[[str], bool]) -> None:
    if not final.exists():
        os.rename(new, final)
        return
    aside = _sibling(final, "old")
    os.rename(final, aside)
    moved: list[str] = []
    try:
        for entry in sorted(aside.iterdir()):
            if not os.path.lexists(new / entry.name) and carry(entry.name):
                os.rename(entry, new / entry.name)
                moved.append(entry.name)
        os.rename(new, final)
    except BaseException:
        for name in moved:
            os.rename(new / name, aside / name)
        if not os.path.lexists(final):
            os.rename(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def set_aside(path: str | os.PathLike) -> Iterator[Path]:
    """Move an existing ``path`` aside for the block, which rebuilds ``path`` in place.

    On success the old one is removed; on failure the partial new one is removed and the old one
    put back, so a failed rebuild leaves what was there before.
    """
    path = Path(path)
    aside = None
    if os.path.lexists(path):
        aside = _sibling(path, "old")
        os.rename(path, aside)
    try:
        yield path
    except BaseException:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()
        if aside is not None:
            os.rename(aside, path)
        raise
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()
