"""`pgolf data ...`: data preparation adds its own subcommand. (`pgolf train` and `pgolf quantize`
are registered by pgolf.training, which hands them the evaluator.)"""
from __future__ import annotations

import importlib

# module -> it defines `add_parser(subparsers)`
_MODULES = ("pgolf_train.prepare",)


def register(sub) -> None:
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parser(sub)
