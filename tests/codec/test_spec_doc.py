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


def test_reader_rule_constants_match_the_spec():
    from pgolf_codec import rans, schemes

    d = errors.Limits()
    assert d.max_name_bytes == 1024 and SPEC.count("1..1024 UTF-8") == 2  # tensor and code-file names
    assert "below `2^−126`" in SPEC and schemes._SCALE_RANGE["q8"][0] == 2.0 ** -100 and "`2^−100`" in SPEC
    assert "`0 ≤ G ≤ 2^24`" in SPEC and "`2 ≤ N ≤ 256`" in SPEC and "`0 < P ≤ 100`" in SPEC
    assert "m in (" + ", ".join(map(str, rans._SHAPES)) + ")" in SPEC
    assert f"**{rans.MAX_COLUMN_TABLES}**" in SPEC and f"1 ≤ K ≤ {rans._MAX_LANES}" in SPEC
    assert f"{rans._MIN_PROB_BITS} ≤ P ≤ {rans._MAX_PROB_BITS}" in SPEC
    assert "at most 5 bytes for a `len` and 3 for a `freq`" in SPEC


def test_reader_check_order_names_every_error():
    order = SPEC.split("### Reader checks, in order", 1)[1].split("\nA reader never", 1)[0]
    for n in ("LimitExceeded", "BadMagic", "Truncated", "UnsupportedVersion", "BadHeader", "ChecksumMismatch",
              "UnsupportedCoder", "BadPayload"):
        assert f"`{n}`" in order, n
