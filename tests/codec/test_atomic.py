"""Atomic writes: files follow the umask (not mkstemp's 0600), never clobber unless asked,
and leave no temp file behind on failure."""
from __future__ import annotations

import os
import stat

import pytest
import torch

import pgolf_codec as pc
from pgolf_codec.atomic import atomic_write, current_umask
from pgolf_codec.safetensors_io import write_safetensors


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    pc.write_artifact(tmp_path / "m.pgolf", {"w": torch.randn(4, 4)}, "int8")
    write_safetensors(tmp_path / "t.safetensors", {"w": torch.randn(3)})
    atomic_write(tmp_path / "chunks.bin", [b"a", b"b"])
    atomic_write(tmp_path / "cb.bin", lambda f: torch.save({"x": 1}, f))
    for name in ("m.pgolf", "t.safetensors", "chunks.bin", "cb.bin"):
        assert _mode(tmp_path / name) == mode, name
    assert (tmp_path / "chunks.bin").read_bytes() == b"ab"
    assert torch.load(tmp_path / "cb.bin", weights_only=True) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cb.bin", "chunks.bin", "m.pgolf", "t.safetensors"]


def test_cli_unpack_output_follows_the_umask(tmp_path, umask):
    from pgolf.cli import main

    umask(0o022)
    pc.write_artifact(tmp_path / "m.pgolf", {"w": torch.randn(4, 4)}, "int8")
    assert main(["unpack", str(tmp_path / "m.pgolf"), "-o", str(tmp_path / "u.safetensors")]) == 0
    assert _mode(tmp_path / "u.safetensors") == 0o644


def test_no_clobber_and_no_leftovers(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, b"1")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write(p, b"2")
    atomic_write(p, b"3", overwrite=True)
    assert p.read_bytes() == b"3"

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom, overwrite=True)
    assert p.read_bytes() == b"3" and [q.name for q in tmp_path.iterdir()] == ["f"]
