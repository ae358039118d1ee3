"""Artifact → runnable model, and the checks that tie an artifact to its tokenizer.

The artifact alone defines the model: weights from its tensors, the config from metadata
``model_config``. Its embedded model source is *executed only with trust_code*; by default the
installed ``pgolf_train.model`` builds the model and the embedded source is merely compared with
it (sha256), with a warning when they differ.
"""
from __future__ import annotations

import hashlib
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from pgolf_codec.errors import FormatError
from pgolf_codec.lowrank import apply_lowrank


class EvalWarning(UserWarning):
    """Something about the artifact or tokenizer is suspicious but evaluation can proceed."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _embedded_source(art: Any, path: str | os.PathLike) -> tuple[str | None, str | None]:
    """``(filename, source)`` of the artifact's model code, or ``(None, None)`` if it has none."""
    name = art.metadata.get("model_code")
    if name is None:
        return None, None
    if not isinstance(name, str) or name not in art.code:
        raise FormatError(f"{path}: metadata model_code={name!r} names no file of the code section "
                          f"(it holds {sorted(art.code)})")
    return name, art.code[name]


def _exec_module(source: str, label: str) -> types.ModuleType:
    """Run ``source`` in a fresh module (registered in sys.modules, which dataclasses need)."""
    mod_name = f"pgolf_artifact_model_{_sha256(source)[:16]}"
    module = types.ModuleType(mod_name)
    module.__file__ = label
    sys.modules[mod_name] = module
    try:
        exec(compile(source, label, "exec"), module.__dict__)
    except Exception as e:
        del sys.modules[mod_name]
        raise ValueError(f"{label}: the embedded model source failed to run: {type(e).__name__}: {e}") from e
    for attr in ("GPT", "GPTConfig"):
        if not hasattr(module, attr):
            raise ValueError(f"{label}: the embedded model source defines no {attr}")
    return module


def model_module(art: Any, path: str | os.PathLike, trust_code: bool = False) -> types.ModuleType:
    """The module whose ``GPT``/``GPTConfig`` build the model (see the module docstring)."""
    name, source = _embedded_source(art, path)
    if trust_code:
        if source is None:
            raise ValueError(f"{path}: --trust-code given but the artifact embeds no model source")
        return _exec_module(source, f"<artifact {Path(path).name}:{name}>")
    from pgolf_train import model as installed
    from pgolf_train.source import model_source

    if source is None:
        warnings.warn(f"{path}: the artifact embeds no model source; using the installed pgolf_train.model",
                      EvalWarning, stacklevel=3)
    else:
        mine = _sha256(model_source())
        if mine != _sha256(source):
            warnings.warn(f"{path}: embedded model source {name} (sha256 {_sha256(source)[:12]}) differs from the "
                          f"installed pgolf_train/model.py (sha256 {mine[:12]}); evaluating with the installed "
                          "code (pass --trust-code to run the embedded source instead)", EvalWarning, stacklevel=3)
    return installed


def model_from_artifact(path: str | os.PathLike, device: str | torch.device = "cpu",
                        trust_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """Build the model an artifact describes and load its weights; returns ``(model, artifact)``.

    Raises ``FormatError`` for a corrupt file or missing metadata, ``ValueError`` for a config or
    tensors that do not fit the model (every problem named in the message).
    """
    from pgolf_codec.container import read_artifact

    try:
        art = read_artifact(path)
    except FormatError as e:  # same error class, with the file named
        raise type(e)(f"{path}: {e}") from None
    cfg_dict = art.metadata.get("model_config")
    if not isinstance(cfg_dict, dict):
        raise FormatError(f"{path}: metadata has no model_config dict (got {type(cfg_dict).__name__}); repack it "
                          "with the config: `pgolf pack` of a `pgolf train` run's final_model.safetensors or "
                          "checkpoint.pt carries it, any other checkpoint needs `--config MODEL_CONFIG.json`")
    module = model_module(art, path, trust_code)
    cfg = module.GPTConfig.from_dict(dict(cfg_dict))
    model = module.GPT(cfg)
    expected = model.state_dict()
    tensors = apply_lowrank(art.tensors)  # fold stored low-rank corrections (NAME.lr_a/lr_b) into NAME
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(v.shape)}")
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    for p in model.parameters():  # evaluation needs no gradients; TTT turns on what it adapts
        p.requires_grad_(False)
    return model, art


def check_tokenizer(metadata: dict, tokenizer: str | os.PathLike, *, model_vocab: int) -> int:
    """Check ``tokenizer`` against the artifact's metadata ``tokenizer`` and the model's vocabulary.

    A vocabulary mismatch is a ``ValueError``; a sha256 mismatch (same size, other pieces) or a
    missing record a warning. Returns the vocabulary every val token must fall below (the model's).
    """
    from pgolf_train.tokenizer import tokenizer_info

    info = tokenizer_info(tokenizer)
    rec = metadata.get("tokenizer")
    if isinstance(rec, dict) and "vocab_size" in rec:
        if int(rec["vocab_size"]) != info["vocab_size"]:
            raise ValueError(f"tokenizer {tokenizer} has vocab {info['vocab_size']}, the artifact was trained with "
                             f"{rec.get('name', '?')} of vocab {rec['vocab_size']}")
        if rec.get("sha256") and rec["sha256"] != info["sha256"]:
            warnings.warn(f"tokenizer {tokenizer} sha256 {info['sha256'][:12]} differs from the artifact's "
                          f"{rec.get('name', '?')} ({str(rec['sha256'])[:12]}): same vocab size, maybe other pieces",
                          EvalWarning, stacklevel=2)
    else:
        warnings.warn("the artifact records no tokenizer; cannot check the one given", EvalWarning, stacklevel=2)
    if info["vocab_size"] > model_vocab:
        raise ValueError(f"tokenizer {tokenizer} has vocab {info['vocab_size']} > the model's {model_vocab}")
    return model_vocab


def apply_rope_scaling(model: torch.nn.Module, kind: str, factor: float | None, seq_len: int | None) -> float:
    """Switch the model's RoPE to ``kind`` (``ntk``/``yarn``/``none``) for longer contexts.

    ``factor`` None means eval seq_len / training seq_len (at least 1). Returns the factor used.
    """
    if not hasattr(model, "set_rope_scaling"):
        raise ValueError(f"{type(model).__name__} has no set_rope_scaling: this model cannot rescale RoPE")
    if factor is None:
        train_len = int(getattr(model.cfg, "seq_len", 0) or 0)
        factor = max(1.0, (seq_len or train_len) / train_len) if train_len else 1.0
    model.set_rope_scaling(kind, float(factor))
    return float(factor)
