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
