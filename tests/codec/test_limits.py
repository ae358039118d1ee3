"""Decompression bombs and declared sizes: tiny files that ask for huge decodes are refused
before anything is allocated, and `inspect` reads headers only.

A bomb is a valid artifact: one int8 tensor whose codes stream is a zstd frame of RLE
blocks (4 bytes per 128 KiB of zeros), so 2^30 elements cost ~32 KB.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zstandard

import pgolf_codec as pc
from pgolf_codec.errors import MAX_DIM, check_shape

REPO = Path(__file__).resolve().parents[2]
_RLE_BLOCK = 1 << 17


def zstd_rle_frame(n: int, byte: int = 0, declared: int | None = None) -> bytes:
    """A zstd frame of `n` copies of `byte` (RLE blocks, 2^17 window) that declares
    `declared` (default n) bytes of content."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out += bytes([0xC0, 7 << 3]) + struct.pack("<Q", n if declared is None else declared)  # 8-byte size, window 2^17
    left = n
    while True:
        k = min(left, _RLE_BLOCK)
        left -= k
        out += (int(left == 0) | 1 << 1 | k << 3).to_bytes(3, "little") + bytes([byte])
        if left == 0:
            return bytes(out)


def artifact(entries: list[dict], payload: bytes) -> bytes:
    """A well-formed container (plain header, all CRCs right) around hand-made entries."""
    header = {"tensors": entries, "metadata": {},
              "code": {"files": [], "coder": 0, "offset": len(payload), "length": 0, "crc": 0}}
    raw = msgpack.packb(header, use_bin_type=True)
    body = struct.pack("<4sBBBBII", b"PGLF", 1, 1, 0, 0, len(raw), len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def bomb(rows: int, row_len: int) -> bytes:
    """One int8 tensor (rows, row_len) of zero values: codes 127 (zstd RLE), fp16 scales 1.0."""
    codes = zstd_rle_frame(rows * row_len, 127)
    scales = zstandard.ZstdCompressor(write_content_size=True).compress(np.ones(rows, "<f2").tobytes())
    payload = codes + scales
    e = {"name": "w", "shape": [rows, row_len], "dtype": "float32", "scheme": "int8", "offset": 0,
         "codes": [0, 1, len(codes)], "scales": [0, 1, len(scales)], "crc": zlib.crc32(payload)}
    return artifact([e], payload)


_PEAK = """
import json, sys
from pgolf.cli import build_parser, main
build_parser()  # every import done: what follows is the commands' own memory
def rss(key):
    return int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]) * 1024
out = []
for argv in json.loads(sys.argv[1]):
    base = rss('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
    rc = main(argv)
    out.append((rss('VmHWM') - base, rc))
print('PEAKS', json.dumps(out))
"""


def _run_peaks(*commands: list[str]) -> tuple[list[tuple[int, int]], str]:
    """([(peak RSS growth in bytes, exit code)] of each `pgolf` command, stderr), all run in
    one fresh interpreter (one import of torch)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(commands)], capture_output=True, text=True,
                       env=env, timeout=120)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PEAKS ")]
    assert lines, r.stderr
    return [tuple(x) for x in json.loads(lines[-1][6:])], r.stderr


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("bombs")
    out = {}
    for log2, (r, c) in {28: (1 << 14, 1 << 14), 30: (1 << 15, 1 << 15)}.items():
        out[log2] = d / f"bomb{log2}.pgolf"
        out[log2].write_bytes(bomb(r, c))
    return out


def test_bombs_are_small_valid_files_that_declare_huge_tensors(bombs):
    assert bombs[28].stat().st_size < 10_000 and bombs[30].stat().st_size < 40_000
    for log2, path in bombs.items():
        h = pc.read_header(path)
        assert h.info.params == 1 << log2 and "elements" in h.over_limits
        with pytest.raises(pc.LimitExceeded):
            pc.read_artifact(path)
    # under raised limits a (small) bomb of the same construction decodes: the file is valid
    small = bomb(64, 1 << 12)
    art = pc.read_artifact_bytes(small, pc.Limits.for_elements(1 << 18))
    assert torch.count_nonzero(art.tensors["w"]) == 0
    with pytest.raises(pc.LimitExceeded):
        pc.read_artifact_bytes(small, pc.Limits.for_elements(1 << 17))


def test_inspect_and_verify_of_a_bomb_stay_small(bombs):
    limit = 64 << 20  # the reader allocates nothing sized by the declared 2^28..2^30 elements
    cmds = [[cmd, str(bombs[log2])] for log2 in (28, 30) for cmd in ("verify", "inspect")]
    results, err = _run_peaks(*cmds)
    assert "Traceback" not in err and err.count("LimitExceeded") == 2, err
    for cmd, (peak, rc) in zip(cmds, results):
        assert rc == (2 if cmd[0] == "verify" else 0), (cmd, err)
        assert peak < limit, f"{cmd}: RSS grew by {peak >> 20} MiB"


def test_inspect_reports_the_declared_sizes_and_the_refusal(bombs, capsys):
    from pgolf.cli import main

    assert main(["inspect", "--json", str(bombs[30])]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 1 << 30 and d["tensors"][0]["shape"] == [1 << 15, 1 << 15]
    assert "elements" in d["over_limits"]
    assert main(["inspect", str(bombs[28])]) == 0
    assert "would be refused" in capsys.readouterr().out
    assert main(["inspect", "--json", "--max-elements", str(1 << 28), str(bombs[28])]) == 0
    assert json.loads(capsys.readouterr().out)["over_limits"] is None


def test_zstd_frame_longer_than_declared_is_refused_without_decoding_it_all():
    n = 1 << 12
    for declared, actual in ((n, 1 << 24), (n, n + 1), (n, n - 1)):
        codes = zstd_rle_frame(actual, 127, declared=declared)
        scales = zstandard.ZstdCompressor(write_content_size=True).compress(np.ones(1, "<f2").tobytes())
        e = {"name": "w", "shape": [1, n], "dtype": "float32", "scheme": "int8", "offset": 0,
             "codes": [0, 1, len(codes)], "scales": [0, 1, len(scales)], "crc": zlib.crc32(codes + scales)}
        with pytest.raises(pc.BadPayload):
            pc.read_artifact_bytes(artifact([e], codes + scales))
    # and a frame that declares more than the header does is refused before decoding
    codes = zstd_rle_frame(1 << 24, 127)
    scales = zstandard.ZstdCompressor(write_content_size=True).compress(np.ones(1, "<f2").tobytes())
    e = {"name": "w", "shape": [1, n], "dtype": "float32", "scheme": "int8", "offset": 0,
         "codes": [0, 1, len(codes)], "scales": [0, 1, len(scales)], "crc": zlib.crc32(codes + scales)}
    with pytest.raises(pc.BadPayload, match="declares"):
        pc.read_artifact_bytes(artifact([e], codes + scales))


@pytest.mark.parametrize("shape", [[0, (1 << 62) - 1, (1 << 62) - 1], [MAX_DIM + 1], [1] * 9, [-1, 2]])
def test_every_dim_is_bounded_on_its_own(shape, tmp_path):
    e = {"name": "w", "shape": shape, "dtype": "float32", "scheme": "int8", "offset": 0,
         "codes": [0, 0, 0], "scales": [0, 0, 0], "crc": 0}
    data = artifact([e], b"")
    (tmp_path / "a.pgolf").write_bytes(data)
    for read in (pc.read_artifact_bytes, pc.read_header_bytes):
        with pytest.raises(pc.BadHeader, match="bad shape"):
            read(data)
    for read in (pc.read_artifact, pc.read_header, pc.load):
        with pytest.raises(pc.BadHeader, match="bad shape"):
            read(tmp_path / "a.pgolf")


def test_empty_tensor_cannot_declare_rows_no_integer_holds(tmp_path):
    e = {"name": "w", "shape": [0, MAX_DIM, MAX_DIM, MAX_DIM], "dtype": "float32", "scheme": "int8",
         "offset": 0, "codes": [0, 0, 0], "scales": [0, 0, 0], "crc": 0}
    with pytest.raises(pc.LimitExceeded):
        pc.read_artifact_bytes(artifact([e], b""))
    (tmp_path / "e.pgolf").write_bytes(artifact([e], b""))
    with pytest.raises(pc.LimitExceeded):
        pc.load(tmp_path / "e.pgolf")
    # a genuinely empty tensor is fine
    e["shape"] = [0, 5]
    assert pc.read_artifact_bytes(artifact([e], b"")).tensors["w"].shape == (0, 5)


def test_writer_refuses_what_readers_refuse():
    with pytest.raises(ValueError, match="bad shape"):
        pc.build_artifact({"w": torch.zeros([1] * 9)}, "int8")
    with pytest.raises(ValueError, match="elements"):
        pc.build_artifact({"w": torch.zeros(0, 1 << 14, 1 << 14)}, "int8", limits=pc.Limits(max_tensor_elements=1 << 27))
    with pytest.raises(ValueError, match="in all"):
        pc.build_artifact({"a": torch.zeros(8), "b": torch.zeros(8)}, "int8",
                          limits=pc.Limits(max_tensor_elements=10, max_total_elements=10))
    assert check_shape([2, 3]) == (2, 3)


def test_cli_pack_of_a_9d_tensor_is_a_one_line_error(tmp_path, capsys):
    from pgolf.cli import main

    torch.save({"w": torch.zeros([1] * 9)}, tmp_path / "ck.pt")
    assert main(["pack", str(tmp_path / "ck.pt"), "-o", str(tmp_path / "m.pgolf")]) == 2
    err = capsys.readouterr().err
    assert "bad shape" in err and "at most 8" in err and err.count("\n") == 1
    assert not (tmp_path / "m.pgolf").exists()
