"""What a run needs from the evaluator, handed in by the layer above: pgolf_train sits below
pgolf_eval and never imports it. :class:`pgolf_eval.scorer.Scorer` is the implementation that
`pgolf train`, `pgolf run`, `pgolf quantize` and the generated train_gpt.py pass in."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class Scorer(Protocol):
    def load_val(self, data_dir: Path, tokenizer: Path, vocab_size: int,
                 max_tokens: int | None) -> tuple[np.ndarray, Any]:
        """The val stream (uint16 tokens, the ``fineweb_val_*`` split, a prefix of ``max_tokens``) and
        its byte source (the per-token sidecar when the data has one, else the tokenizer's tables)."""

    def score(self, model: torch.nn.Module, tokens: np.ndarray, byte_source: Any, *, seq_len: int,
              batch_tokens: int | None = None, device: torch.device = torch.device("cpu")) -> Any:
        """Exact bpb of ``model`` on the stream, split across ranks; an object with ``val_loss``,
        ``val_bpb``, ``tokens``, ``bytes``, ``seconds``, ``docs`` and ``per_doc``."""

    def load_artifact(self, path: Path, device: torch.device) -> torch.nn.Module:
        """The model an artifact describes, its weights decoded from it."""
