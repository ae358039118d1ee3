"""Numba bit packing == the numpy reference, for every width and ternary, any length."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pgolf_codec import BadPayload, _reference as ref, bitpack


@settings(max_examples=80)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_pack_matches_reference_and_roundtrips(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.size == (n * bits + 7) // 8
    assert np.array_equal(packed, ref.pack(codes, bits))
    assert np.array_equal(bitpack.unpack(packed, bits, n), codes)
    assert np.array_equal(ref.unpack(packed, bits, n), codes)


@settings(max_examples=60)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_trits_match_reference_and_roundtrip(n, seed):
    codes = np.random.default_rng(seed).integers(0, 3, n).astype(np.uint8)
    packed = bitpack.pack_trits(codes)
    assert packed.size == (n + 4) // 5 and (packed < 243).all()
    assert np.array_equal(packed, ref.pack_trits(codes))
    assert np.array_equal(bitpack.unpack_trits(packed, n), codes)
    assert np.array_equal(ref.unpack_trits(packed, n), codes)


def test_lsb_first_layout():
    assert bitpack.pack(np.array([1, 2, 3], np.uint8), 2).tolist() == [0b00111001]
    assert bitpack.pack(np.array([5, 1], np.uint8), 3).tolist() == [0b00001101]
    assert bitpack.pack_trits(np.array([2, 1, 0, 0, 1], np.uint8)).tolist() == [2 + 3 + 81]


def test_unpack_rejects_bad_input():
    with pytest.raises(BadPayload, match="padding"):
        bitpack.unpack(np.array([0xFF], np.uint8), 3, 2)
    with pytest.raises(BadPayload, match="bytes"):
        bitpack.unpack(np.zeros(3, np.uint8), 5, 2)
    with pytest.raises(BadPayload):
        bitpack.unpack_trits(np.array([243], np.uint8), 5)
    with pytest.raises(BadPayload):
        bitpack.unpack_trits(np.array([81], np.uint8), 4)  # trit 4 is padding and must be 0
    with pytest.raises(ValueError):
        bitpack.pack(np.array([8], np.uint8), 3)
    with pytest.raises(ValueError):
        bitpack.pack_trits(np.array([3], np.uint8))


def test_works_where_numba_has_no_writable_cache(tmp_path):
    """No writable HOME, no NUMBA_CACHE_DIR, no writable __pycache__: numba's cache=True fails
    at decoration time; the codec must still import and run (compiled without the cache)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "pgolf_codec"
    pkg = tmp_path / "pgolf_codec"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "__pycache__").write_text("")  # a file: no cache directory can be made here, even by root
    home = tmp_path / "home"
    home.write_text("")  # HOME is not a directory, so ~/.cache cannot exist
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    code = ("import numpy as np, pgolf_codec as pc\n"
            "from pgolf_codec import bitpack, rans\n"
            "assert pc.__file__.startswith(%r)\n"
            "c = np.arange(10, dtype=np.uint8) %% 4\n"
            "assert (bitpack.unpack(bitpack.pack(c, 2), 2, 10) == c).all()\n"
            "assert (bitpack.unpack_trits(bitpack.pack_trits(c %% 3), 10) == c %% 3).all()\n"
            "ctx = pc.CoderContext(n=10, alphabet=4, rows=1, row_len=10)\n"
            "r = rans.RansCoder()\n"
            "assert (r.decode(r.encode(c, ctx), ctx) == c).all()\n"
            "print('ok')\n") % str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
