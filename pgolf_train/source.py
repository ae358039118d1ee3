"""The model file's source text, from wherever the module was loaded: the installed file, or the
table of a generated ``train_gpt.py`` (whose loader serves sources). The artifact embeds it."""
from __future__ import annotations

import importlib


def module_source(name: str) -> str:
    """The source of the imported module ``name`` as its loader gives it (a file's text as read)."""
    module = importlib.import_module(name)
    source = module.__spec__.loader.get_source(name)
    if source is None:
        raise ValueError(f"module {name} was loaded without its source; the artifact needs the model's source")
    return source


def model_source() -> str:
    """``pgolf_train/model.py`` as text: the code section's ``model.py``."""
    return module_source("pgolf_train.model")
