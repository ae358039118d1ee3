"""QAT: the fake-quantized forward is the codec's dequant of the same weights, and switching it on
really changes the compiled graph (a flag folded by torch.compile would leave QAT silently off)."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from pgolf_codec.schemes import Recipe, dequantize, quantize
from pgolf_train.config import make_config
from pgolf_train.qat import qat_enabled, qat_modules, set_qat
from pgolf_train.trainer import build_model, compile_model

RECIPE = Recipe.parse("tok_emb.weight=int8:percentile=99.99984;*.weight=int4:sdclip=3;*=fp32")


def _model() -> torch.nn.Module:
    cfg = make_config({"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, "vocab_size": 64,
                       "train_seq_len": 16, "train_batch_tokens": 64, "device": "cpu"})
    model = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # zero-init projections would make several weights trivially quantizable
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The eager reference: every hooked weight replaced by dequantize(quantize(w)) with its spec."""
    ref = copy.deepcopy(model)
    set_qat(ref, RECIPE, False)
    with torch.no_grad():
        for name, m in qat_modules(ref):
            m.weight.copy_(dequantize(quantize(m.weight.detach(), RECIPE.spec_for(name))))
    return ref


def test_qat_forward_equals_codec_dequant():
    model = _model()
    x = torch.randint(0, 64, (2, 16))
    plain = model(x)
    done = set_qat(model, RECIPE, True)
    assert qat_enabled(model) and {n for n, _ in done} == {n for n, _ in qat_modules(model)}
    assert dict(done)["tok_emb.weight"] == "int8:percentile=99.99984"
    faked = model(x)
    torch.testing.assert_close(faked, _dequantized_copy(model)(x), rtol=0, atol=1e-5)
    assert (faked - plain).abs().max() > 1e-3
    # straight-through: the gradient reaches the fp32 master weights
    y = torch.randint(0, 64, (2, 16))
    model(x, y).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for _, m in qat_modules(model))
    set_qat(model, RECIPE, False)
    torch.testing.assert_close(model(x), plain)


def test_qat_switch_changes_the_compiled_graph():
    torch._dynamo.reset()
    model = _model()
    compiled = compile_model(model)  # as the trainer compiles
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = compiled(x)
        torch.testing.assert_close(before, model(x), rtol=1e-5, atol=1e-5)
        set_qat(model, RECIPE, True)
        t = time.perf_counter()
        after = compiled(x)
        recompile_s = time.perf_counter() - t
        reference = _dequantized_copy(model)(x)
    print(f"QAT recompile: {recompile_s:.2f}s")
    assert (after - before).abs().max() > 1e-3, "compiled model ignored the QAT switch"
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and back off: the compiled model follows again
        set_qat(model, RECIPE, False)
        torch.testing.assert_close(compiled(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["ternary", "ternary:group=32", "int2", "int3", "int4", "int4:group=64",
                                    "int2:asym:mse", "int3:mse", "int4:mse",
                                    "int6:sdclip=3", "int2:percentile=99.9"])
def test_low_bit_qat_trains_exactly_what_the_artifact_decodes(scheme, tmp_path):
    """The weight each module's QAT forward uses (fake_quant_ste, the training path) equals, bit for
    bit, the tensor the artifact decodes, for the low-bit schemes the design bets on; the gradient
    still reaches the float master weights."""
    from pgolf_codec.container import read_artifact, write_artifact
    from pgolf_train.model import _weight

    model = _model()
    recipe = Recipe.parse(f"*.weight={scheme};*=fp32")
    set_qat(model, recipe, True)
    trained = {name: _weight(m).detach().clone() for name, m in qat_modules(model)}
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    write_artifact(tmp_path / "a.pgolf", state, recipe)
    decoded = read_artifact(tmp_path / "a.pgolf").tensors
    for name, w in trained.items():
        assert torch.equal(decoded[name], w), name
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model(x, y).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for _, m in qat_modules(model))
