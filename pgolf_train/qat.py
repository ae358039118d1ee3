"""Quantization-aware training: fake-quantize weights in the forward pass with the export spec.

The model exposes a per-module attribute ``qat`` (``None`` = off) on every module whose 2-D
``.weight`` the export quantizes (``CastedLinear`` and the token embedding). Turning QAT on sets it
to the export recipe's :class:`~pgolf_codec.schemes.QuantSpec` for that weight; the forward then
uses ``fake_quant_ste(weight, spec)`` — the codec's exact
``dequantize(quantize(w))`` in the forward, the identity in the backward (straight-through).

Why an attribute that changes from ``None`` to an object, rather than a boolean flag: a flag read
from a global or a class attribute can be specialized away by ``torch.compile`` so the compiled
graph silently keeps the old behaviour. A per-instance attribute that the forward reads is guarded
by Dynamo; changing it invalidates the guard and forces a recompile into a graph that contains the
fake-quant ops. ``tests/train/test_qat.py`` checks that the compiled output really changes.
"""
from __future__ import annotations

from torch import nn

from pgolf_codec.schemes import QuantSpec, Recipe

# fp32 storage loses nothing, so there is nothing to simulate (fp16/bf16 rounding is simulated).
_NO_OP_KINDS = ("fp32",)


def spec_for(recipe: Recipe, name: str) -> QuantSpec | None:
    """The recipe's spec for tensor ``name`` (first matching rule), or None when no rule matches."""
    try:
        return recipe.spec_for(name)
    except ValueError:
        return None


def qat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(weight name, module) for every module that exposes the ``qat`` hook."""
    return [(f"{name}.weight" if name else "weight", m) for name, m in model.named_modules() if hasattr(m, "qat")]


def set_qat(model: nn.Module, recipe: Recipe, enabled: bool) -> list[tuple[str, str]]:
    """Turn fake-quant on (with each weight's export spec) or off; returns [(weight name, spec)] set.

    Weights whose spec is fp32 (or that no rule matches) are left unquantized.
    """
    done: list[tuple[str, str]] = []
    for wname, m in qat_modules(model):
        if not enabled:
            m.qat = None
            continue
        spec = spec_for(recipe, wname)
        if spec is None or spec.kind in _NO_OP_KINDS:
            m.qat = None
            continue
        m.qat = spec
        done.append((wname, str(spec)))
    return done


def qat_enabled(model: nn.Module) -> bool:
    """True when any module currently fake-quantizes its weight."""
    return any(m.qat is not None for _, m in qat_modules(model))
