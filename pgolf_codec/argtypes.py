"""Argument types for the command lines of every package: numbers checked when the flag is parsed.

``type=positive_int`` makes argparse reject ``--max-tokens -10`` up front, with the flag and the
rule in the message (``argument --max-tokens: must be an integer >= 1, got '-10'``), before any
data is read or model built. Floats must also be finite: ``inf`` and ``nan`` are never a setting.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

__all__ = ["int_range", "float_range", "int_list", "float_list", "positive_int", "nonneg_int",
           "positive_float", "nonneg_float"]


def _int(text: str) -> int:
    try:
        return int(str(text).strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(str(text).strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _rule(kind: str, lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"must be {kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"must be {kind} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"must be {kind} <= {hi:g}"
    return f"must be {kind}"


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either end open when None)."""
    def parse(text: str) -> int:
        value = _int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{_rule('an integer', lo, hi)}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    def parse(text: str) -> float:
        value = _float(text)
        if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{_rule('a number', lo, hi, lo_open)}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def _list_of(one: Callable[[str], Any], what: str, name: str) -> Callable[[str], tuple]:
    """An argparse type: a non-empty comma-separated list, each item parsed by ``one``."""
    def parse(text: str) -> tuple:
        items = [t for t in str(text).split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return tuple(one(t) for t in items)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in the list {text!r})") from None

    parse.__name__ = name
    return parse


def int_list(lo: int | None = None, hi: int | None = None) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: a non-empty comma-separated list of integers in ``[lo, hi]``."""
    return _list_of(int_range(lo, hi), "integers", "int list")


def float_list(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
               ) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: a non-empty comma-separated list of finite numbers in the range."""
    return _list_of(float_range(lo, hi, lo_open=lo_open), "numbers", "float list")


positive_int = int_range(1)
nonneg_int = int_range(0)
positive_float = float_range(0.0, lo_open=True)
nonneg_float = float_range(0.0)
