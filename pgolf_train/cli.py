"""`pgolf data ...`, `pgolf train`, `pgolf quantize`: each module below adds its own subcommand."""
from __future__ import annotations

import importlib

# module -> it defines `add_parser(subparsers)`
_MODULES = ("pgolf_train.prepare", "pgolf_train.trainer", "pgolf_train.quantize")


def register(sub) -> None:
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parser(sub)
