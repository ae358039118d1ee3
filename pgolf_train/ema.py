"""Exponential moving average of the model weights, with a warm-up-scheduled decay.

A fixed decay such as 0.997 started at step 0 of a ~700-step run keeps ~12% of the random init in
the average at the end (0.997^700) and the exported model collapses. The decay used at update
``t`` (0-based, counted from the EMA's start) is therefore ``min(decay, (1 + t) / (10 + t))``: the
average follows the weights closely at first and settles to ``decay`` after ~``10 / (1 - decay)``
updates.

The update is one ``torch._foreach_lerp_`` over flat lists of fp32 shadows (one fused kernel
launch group per dtype, no Python loop over tensors on the hot path).
"""
from __future__ import annotations

import torch
from torch import nn


def warmup_decay(decay: float, t: int) -> float:
    """The decay applied at EMA update ``t`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + t) / (10.0 + t))


class EMA:
    """fp32 shadow copies of a model's parameters, keyed by parameter name."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]
        # Parameters already in fp32 lerp in place in one foreach call; others (e.g. a bf16
        # embedding) are upcast first, which only allocates for those few tensors.
        self._fp32 = [i for i, p in enumerate(self.params) if p.dtype == torch.float32]
        self._other = [i for i, p in enumerate(self.params) if p.dtype != torch.float32]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> float:
        """Blend the current weights into the shadows; returns the decay that was used."""
        d = warmup_decay(self.decay, self.updates)
        weight = 1.0 - d
        if self._fp32:
            torch._foreach_lerp_([self.shadow[i] for i in self._fp32], [self.params[i] for i in self._fp32], weight)
        if self._other:
            torch._foreach_lerp_([self.shadow[i] for i in self._other],
                                 [self.params[i].float() for i in self._other], weight)
        self.updates += 1
        return d

    def state_dict(self) -> dict:
        """Tensors and plain containers only (loadable with ``torch.load(weights_only=True)``)."""
        return {"decay": self.decay, "updates": self.updates, "names": list(self.names),
                "shadow": [s.detach().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("EMA checkpoint does not match the model's parameters")
        with torch.no_grad():
            for s, v in zip(self.shadow, state["shadow"], strict=True):
                s.copy_(v)
        self.updates = int(state["updates"])

    def weights(self) -> dict[str, torch.Tensor]:
        """Name → fp32 EMA tensor (the model's parameter names)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (same architecture), cast to each parameter's dtype."""
        by_name = dict(model.named_parameters())
        for name, s in zip(self.names, self.shadow):
            by_name[name].copy_(s)
