"""The shared argparse types: numbers outside a flag's range are parse errors naming the flag and the range."""
from __future__ import annotations

import argparse

import pytest

from pgolf_codec.argtypes import (float_list, float_range, int_list, int_range, nonneg_float, nonneg_int, positive_float,
                                  positive_int)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=True)
    p.add_argument("--n", type=positive_int)
    p.add_argument("--z", type=nonneg_int)
    p.add_argument("--s", type=positive_float)
    p.add_argument("--t", type=nonneg_float)
    p.add_argument("--bits", type=int_list(1, 8), default="4,5")
    p.add_argument("--clips", type=float_list(0.0, lo_open=True), default="8,12.5")
    return p


def test_values_in_range_parse_to_numbers():
    a = parser().parse_args(["--n", "3", "--z", "0", "--s", "0.5", "--t", "0", "--bits", "2, 8"])
    assert (a.n, a.z, a.s, a.t, a.bits, a.clips) == (3, 0, 0.5, 0.0, (2, 8), (8.0, 12.5))  # string defaults parsed too
    assert positive_int("1_000") == 1000 and int_range(-3, 3)("-3") == -3 and float_range(0, 1)("1") == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "argument --n: must be an integer >= 1, got '0'"),
    (["--n", "-10"], "argument --n: must be an integer >= 1, got '-10'"),
    (["--n", "1.5"], "argument --n: expected an integer, got '1.5'"),
    (["--z", "-1"], "argument --z: must be an integer >= 0"),
    (["--s", "0"], "argument --s: must be a number > 0"),
    (["--s", "inf"], "argument --s: must be a finite number, got 'inf'"),
    (["--t", "nan"], "argument --t: must be a finite number, got 'nan'"),
    (["--t", "-0.1"], "argument --t: must be a number >= 0"),
    (["--bits", "4,99"], "argument --bits: must be an integer in [1, 8], got '99' (in the list '4,99')"),
    (["--bits", ","], "argument --bits: expected a comma-separated list of integers"),
    (["--clips", "8,0"], "argument --clips: must be a number > 0, got '0'"),
])
def test_out_of_range_is_a_usage_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
