"""Document attention as flash varlen (pgolf_train/doc_attn.py, fusion "varlen"), on the CPU: the
segment offsets, the op's torch path (forward and backward) against SDPA with the model's boolean
document mask, and whole models, eager and compiled (fullgraph), against ``doc_attention``'s reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_train import doc_attn, fused
from pgolf_train.config import ConfigError, load_config
from pgolf_train.model import GPTConfig, doc_mask

from .arch_helpers import assert_same_loss_and_grads, loss_and_grads, randomized

BOS = 1


def _batch(B: int, T: int, bos_at: list[tuple[int, int]], vocab: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, vocab, (B, T), generator=g)
    for b, t in bos_at:
        idx[b % B, t % T] = BOS
    return idx


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 39)), max_size=12))
def test_segments_start_at_every_row_and_every_bos(B, T, bos_at):
    idx = _batch(B, T, bos_at)
    cu = doc_attn.segments(idx, BOS)
    flat = idx.reshape(-1).tolist()
    want = [i for i in range(B * T) if i % T == 0 or flat[i] == BOS] + [B * T]
    assert cu.dtype == torch.int32 and cu.tolist() == want


def _mask_reference(q, k, v, idx, scale):
    """The model's computation: SDPA over [B, H, T, D] with doc_mask, float64."""
    B, T = idx.shape
    qb, kb, vb = (t.double().view(B, T, -1, t.size(-1)).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=doc_mask(idx, BOS), scale=scale, enable_gqa=True)
    return y.transpose(1, 2).reshape(q.shape)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 24), st.sampled_from([(4, 4), (4, 2), (6, 1)]), st.sampled_from([4, 8]),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 23)), max_size=8), st.integers(0, 999))
def test_op_matches_sdpa_with_the_document_mask(B, T, heads, D, bos_at, seed):
    """Forward and every gradient, grouped-query included, float64 (so the two agree to rounding)."""
    H, KV = heads
    idx = _batch(B, T, bos_at, seed=seed)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B * T, n, D, generator=g, dtype=torch.float64).requires_grad_() for n in (H, KV, KV))
    do = torch.randn(B * T, H, D, generator=g, dtype=torch.float64)
    got = doc_attn.varlen_attention(q, k, v, doc_attn.segments(idx, BOS), T, None)
    ref = _mask_reference(q, k, v, idx, D ** -0.5)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_op_returns_the_segment_logsumexp():
    """lse [H, N]: what the CUDA backward reads; the torch path makes it the same way."""
    idx = _batch(2, 10, [(0, 4), (1, 0), (1, 7)])
    cu = doc_attn.segments(idx, BOS)
    q, k = torch.randn(20, 2, 4, dtype=torch.float64), torch.randn(20, 2, 4, dtype=torch.float64)
    _, lse = doc_attn._varlen_op(q, k, k, cu, 10, 0.5)
    s = torch.einsum("nhd,mhd->hnm", q, k) * 0.5
    seg = torch.searchsorted(cu[1:-1].long(), torch.arange(20), right=True)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril()
    torch.testing.assert_close(lse.double(), torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1))


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(6, 3, 4), k=torch.zeros(6, 2, 4)), "multiple of KV"),
    (dict(k=torch.zeros(5, 2, 4)), r"k and v \[N, KV, D\]"),
    (dict(cu=torch.tensor([0, 6])), "int32"),
    (dict(cu=torch.tensor([6], dtype=torch.int32)), r"\[S \+ 1\]"),
])
def test_op_refuses_bad_shapes_by_name(bad, match):
    args = dict(q=torch.zeros(6, 4, 4), k=torch.zeros(6, 2, 4), v=torch.zeros(6, 2, 4),
                cu=torch.tensor([0, 6], dtype=torch.int32))
    args.update(bad)
    if "k" in bad and "q" not in bad:
        args["v"] = args["k"] if bad["k"].size(0) == 6 else torch.zeros(6, 2, 4)
    with pytest.raises(ValueError, match=match):
        doc_attn.varlen_attention(args["q"], args["k"], args["v"], args["cu"], 6, None)


CFG = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, doc_attention=True)


@pytest.mark.parametrize("fusions, extra", [("varlen", {}), ("qk,xsa,varlen", {"xsa_layers": "all"}),
                                            ("varlen", {"attn_out_gate": True, "smear_gate": True})])
def test_model_with_varlen_matches_the_document_mask(fusions, extra):
    cfg = GPTConfig(**CFG, **extra)
    ref = randomized(cfg)
    x, y = _batch(3, 16, [(0, 5), (0, 6), (1, 0), (2, 15), (1, 9)]), torch.randint(0, 64, (3, 16))
    want = loss_and_grads(ref, x, y)
    m = copy.deepcopy(ref)
    fused.apply_fusions(m, fusions)
    assert_same_loss_and_grads(loss_and_grads(m, x, y), want)
    fused.apply_fusions(m, "")  # undone: the model file's path again
    assert m.doc_segments is None
    assert_same_loss_and_grads(loss_and_grads(m, x, y), want)


def test_compiled_fullgraph_traces_a_varying_segment_count_once():
    """One graph for every batch, however many documents it holds (the count is a traced size)."""
    from torch._dynamo.utils import counters

    cfg = GPTConfig(**CFG)
    ref = randomized(cfg)
    m = copy.deepcopy(ref)
    fused.apply_fusions(m, "varlen")
    torch._dynamo.reset()
    counters.clear()
    with fused.dynamo_context("varlen"):
        compiled = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")
        for bos_at in ([(0, 3)], [], [(0, 2), (1, 5), (1, 6), (2, 9), (0, 11)]):
            x, y = _batch(3, 12, bos_at), torch.randint(0, 64, (3, 12))
            got = loss_and_grads(compiled, x, y)
            got = got[0], {n.removeprefix("_orig_mod."): g for n, g in got[1].items()}
            assert_same_loss_and_grads(got, loss_and_grads(ref, x, y))
    assert counters["stats"]["unique_graphs"] == 1


def test_config_refuses_varlen_without_doc_attention():
    with pytest.raises(ConfigError, match="doc_attention"):
        load_config("baseline", ["fused=varlen"])
    assert "varlen" in load_config("baseline", ["fused=varlen", "doc_attention=true"]).fused
