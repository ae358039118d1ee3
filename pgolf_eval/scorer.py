"""The evaluator as the trainer's :class:`pgolf_train.scoring.Scorer`: the val stream, exact
plain-window bpb, and the model an artifact describes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import EvalResult, evaluate_tokens, load_val_stream
from .loader import model_from_artifact


class Scorer:
    def load_val(self, data_dir: Path, tokenizer: Path, vocab_size: int,
                 max_tokens: int | None) -> tuple[np.ndarray, Any]:
        return load_val_stream(data_dir, tokenizer, vocab_size, max_tokens)

    def score(self, model: torch.nn.Module, tokens: np.ndarray, byte_source: Any, *, seq_len: int,
              batch_tokens: int | None = None, device: torch.device = torch.device("cpu")) -> EvalResult:
        return evaluate_tokens(model, tokens, byte_source, seq_len=seq_len, batch_tokens=batch_tokens,
                               device=device, log=None)

    def load_artifact(self, path: Path, device: torch.device) -> torch.nn.Module:
        return model_from_artifact(path, device=str(device))[0]
