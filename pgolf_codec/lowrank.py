"""Low-rank corrections stored beside a quantized tensor (``NAME.lr_a``, ``NAME.lr_b``), folded back
into ``NAME`` on load; :mod:`pgolf_codec.gptq` makes them, every reader of an artifact applies them."""
from __future__ import annotations

import torch

LOWRANK_A = ".lr_a"  # state-dict suffix of the left factor  (rows × r)
LOWRANK_B = ".lr_b"  # state-dict suffix of the right factor (r × cols)


def apply_lowrank(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold stored low-rank corrections back: ``W ← W + A·B`` for every ``NAME.lr_a``/``NAME.lr_b``
    pair, dropping the factor entries. Returns a new dict; tensors without factors pass through.
    Raises ``ValueError`` on an unpaired factor, an unknown base tensor or mismatched shapes."""
    out = {k: v for k, v in state_dict.items() if not k.endswith((LOWRANK_A, LOWRANK_B))}
    for key, a in state_dict.items():
        if not key.endswith(LOWRANK_A):
            continue
        name = key[: -len(LOWRANK_A)]
        b = state_dict.get(name + LOWRANK_B)
        if b is None:
            raise ValueError(f"low-rank factor {key} has no matching {name + LOWRANK_B}")
        if name not in out:
            raise ValueError(f"low-rank factors for {name}, which is not in the state dict")
        base = out[name]
        rows = base.shape[0]
        cols = base.numel() // rows if rows else 0
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rows or b.shape[1] != cols or a.shape[1] != b.shape[0]:
            raise ValueError(f"low-rank factors of {name}: {tuple(a.shape)} @ {tuple(b.shape)} "
                             f"do not match {tuple(base.shape)}")
        delta = (a.float() @ b.float()).reshape(base.shape)
        out[name] = (base.float() + delta.to(base.device)).to(base.dtype)
    for key in state_dict:
        if key.endswith(LOWRANK_B) and key[: -len(LOWRANK_B)] + LOWRANK_A not in state_dict:
            raise ValueError(f"low-rank factor {key} has no matching {key[: -len(LOWRANK_B)] + LOWRANK_A}")
    return out
