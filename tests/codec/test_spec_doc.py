"""spec/FORMAT.md and the code agree: the scheme table, coder ids and error names."""
from __future__ import annotations

import re
from pathlib import Path

import pgolf_codec
from pgolf_codec import CODERS, errors
from pgolf_codec.schemes import SCHEMES

SPEC = (Path(__file__).resolve().parents[2] / "spec" / "FORMAT.md").read_text(encoding="utf-8")


def test_scheme_table_matches_code():
    section = SPEC.split("### Scheme table", 1)[1].split("###", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| scheme")]
    table = {r[0]: (r[1], int(r[2]), int(r[3]), float(r[4])) for r in rows}
    assert table == {k: (v.kind, v.bits, v.levels, v.packed_bits) for k, v in SCHEMES.items()}


def test_builtin_coders_documented():
    for cid in range(4):
        assert re.search(rf"^\| {cid} \| {CODERS[cid].name} \|", SPEC, re.M)


def test_every_reader_error_is_documented_and_exported():
    names = [n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.FormatError)
             and c not in (errors.FormatError, errors.SafetensorsError)]
    rules = SPEC.split("## 5. What a reader must reject", 1)[1].split("## 6", 1)[0]
    for n in names:
        assert f"`{n}`" in rules, n
        assert hasattr(pgolf_codec, n)


def test_default_limits_match_the_spec():
    text = SPEC.split("**Default limits**", 1)[1].split("\n\n", 1)[0].replace("\n", " ")
    d = errors.Limits()

    def num(s: str) -> int:
        return 1 << int(s[2:]) if s.startswith("2^") else int(s.replace(",", ""))

    pairs = {"file": r"file ([\d^,]+) bytes", "header": r"decoded header ([\d^,]+) bytes",
             "tensors": r"([\d^,]+) tensors", "per_tensor": r"([\d^,]+) elements per tensor",
             "total": r"([\d^,]+) in all", "stream": r"([\d^,]+) decoded bytes per stream",
             "files": r"([\d^,]+) code files", "code": r"([\d^,]+) code bytes"}
    found = {k: num(re.search(p, text).group(1)) for k, p in pairs.items()}
    assert found == {"file": d.max_file_bytes, "header": d.max_header_bytes, "tensors": d.max_tensors,
                     "per_tensor": d.max_tensor_elements, "total": d.max_total_elements,
                     "stream": d.max_stream_bytes, "files": d.max_code_files, "code": d.max_code_bytes}
    assert f"each ≤ 2^{errors.MAX_DIM.bit_length() - 1}" in SPEC and f"over 2^{errors.MAX_DIM.bit_length() - 1}" in SPEC
