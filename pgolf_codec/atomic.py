"""Atomic file writes: a temp file in the target's directory, fsync, umask mode, rename.

Readers of `path` see either the old file or the complete new one, never a partial write.
The file gets the mode an ordinary `open(path, "w")` would give it (0o666 minus the umask):
`tempfile.mkstemp` creates 0o600, and that mode would otherwise survive the rename.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Union

Content = Union[bytes, bytearray, memoryview, Iterable[bytes], Callable[[BinaryIO], object]]


def current_umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux ≥ 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the portable way briefly sets it; restore at once
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, content: Content, *, overwrite: bool = False) -> None:
    """Write `content` to `path` atomically.

    content: bytes, an iterable of byte chunks, or a callable given the open binary file
    (e.g. ``lambda f: torch.save(state, f)``).  Without `overwrite` an existing `path` is
    never replaced (`FileExistsError`), also when it appears while writing.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            if callable(content):
                content(f)
            elif isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                for chunk in content:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path appeared meanwhile: no silent clobber
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
