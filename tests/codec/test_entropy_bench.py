"""benchmarks/entropy_bench.py, issue 24: the context-model estimators against naive references,
and one end-to-end run on a small artifact."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf_codec import rans

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def eb():
    spec = importlib.util.spec_from_file_location("entropy_bench", REPO_ROOT / "benchmarks" / "entropy_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sequential_bits(ctx, sym, prob):
    """Naive sequential coder: ``prob(counts_of_ctx, total_of_ctx, global_counts, e, s)``."""
    counts, totals, g, bits = {}, {}, {}, 0.0
    for e, (k, s) in enumerate(zip(ctx.tolist(), sym.tolist())):
        c = counts.setdefault(k, {})
        bits -= math.log2(prob(c.get(s, 0), totals.get(k, 0), g.get(s, 0), e))
        c[s] = c.get(s, 0) + 1
        totals[k] = totals.get(k, 0) + 1
        g[s] = g.get(s, 0) + 1
    return bits


def test_dirichlet_closed_form_is_the_sequential_kt_coder(eb):
    rng = np.random.default_rng(0)
    alphabet, lo, hi = 16, 3, 12
    sym = rng.integers(lo, hi + 1, 3000)
    ctx = rng.integers(0, 5, 3000)
    joint = np.bincount(ctx * alphabet + sym, minlength=5 * alphabet)
    alpha = np.zeros(alphabet)
    alpha[lo:hi + 1] = 0.5
    half_a = 0.5 * (hi - lo + 1)
    ref = _sequential_bits(ctx, sym, lambda n_ks, n_k, g, e: (n_ks + 0.5) / (n_k + half_a))
    assert eb.dirichlet_bits(joint, alphabet, alpha) == pytest.approx(ref, rel=1e-9)
    # the order of the symbols does not matter
    p = rng.permutation(3000)
    assert _sequential_bits(ctx[p], sym[p], lambda n_ks, n_k, g, e: (n_ks + 0.5) / (n_k + half_a)) == \
        pytest.approx(ref, rel=1e-9)


def test_backoff_kernel_is_the_sequential_blend(eb):
    rng = np.random.default_rng(1)
    lo, hi = 2, 9
    sym = np.clip(np.rint(rng.normal(5, 2, 2000)), lo, hi).astype(np.int64)
    ctx = rng.integers(0, 3, 2000)
    betas = np.array([2.0, 64.0])
    got = eb._backoff_kernel(ctx, sym, 3, lo, hi, betas)
    half_a = 0.5 * (hi - lo + 1)
    for b, value in zip(betas, got):
        ref = _sequential_bits(ctx, sym, lambda n_ks, n_k, g, e, b=b:
                               (n_ks + b * (g + 0.5) / (e + half_a)) / (n_k + b))
        assert value == pytest.approx(ref, rel=1e-9)


def test_row_fit_matches_the_codec_and_rank1_wins_on_rank1_data(eb):
    rng = np.random.default_rng(2)
    rows, cols, alphabet = 256, 256, 128
    r = np.exp(rng.uniform(0, np.log(3), rows))[:, None]
    c = np.exp(rng.uniform(0, np.log(3), cols))[None, :]
    codes = np.clip(np.rint(rng.standard_normal((rows, cols)) * 5 * r * c) + 63, 0, 126).astype(np.uint8)
    center2 = rans.default_center2(alphabet)
    ctx = eb.neighbour_contexts(codes, alphabet, center2)
    order = rans._chain_order(codes.astype(np.int16))
    got = eb.parametric_models(codes, alphabet, center2, ctx, order)
    blob = len(rans.encode(codes.ravel(), alphabet, rows, cols, model="parametric"))
    assert got["row"]["bytes"] == pytest.approx(blob, rel=0.005)     # the estimate is the codec's cost
    rank1 = got["row_x_column"]["bytes"]
    assert rank1 < 0.99 * min(got["row"]["bytes"], got["column_centered"]["bytes"])
    assert set(got) == set(eb.PARAM_MODELS)


def test_greedy_chain_follows_neighbours(eb):
    rng = np.random.default_rng(3)
    levels = rng.permutation(20)
    levels[[0, np.flatnonzero(levels == 0)[0]]] = levels[[np.flatnonzero(levels == 0)[0], 0]]
    x = np.repeat(levels[:, None], 8, axis=1).astype(np.int16)    # row i is levels[i] everywhere
    order = rans._chain_order(x)
    assert sorted(order.tolist()) == list(range(20)) and levels[order].tolist() == list(range(20))


def test_kinds_and_log_factorial(eb):
    assert eb.tensor_kind("blocks.3.attn.c_q.weight") == "c_q"
    assert eb.tensor_kind("blocks.0.attn.proj.weight") == "attn.proj"
    assert eb.tensor_kind("blocks.8.mlp.proj.weight") == "mlp.proj"
    assert eb.tensor_kind("tok_emb.weight") == "tok_emb" and eb.tensor_kind("skip_weights") is None
    assert eb.log2_factorial(10) == pytest.approx(math.log2(math.factorial(10)))


def test_missing_peer_tool_is_a_note(eb, tmp_path, monkeypatch):
    monkeypatch.setattr(eb, "EXTERNAL", {"nope": ("a tool that is not installed",
                                                  ["pgolf-no-such-tool", "{inp}", "{out}"], ["x"])})
    sizes, secs, notes = eb.peer_sizes(bytes(range(256)) * 64, tmp_path)
    assert "nope" not in sizes and notes["nope"].startswith("skipped") and sizes["zstd22"] > 0


@pytest.mark.slow
def test_runs_on_an_artifact(eb, tmp_path):
    import pgolf_codec as pc

    g = torch.Generator().manual_seed(0)
    tensors = {"blocks.0.attn.c_q.weight": torch.randn(256, 256, generator=g),
               "blocks.0.mlp.fc.weight": torch.randn(256, 256, generator=g) * torch.rand(256, 1, generator=g),
               "tok_emb.weight": torch.randn(512, 128, generator=g)}
    art = tmp_path / "m.pgolf"
    pc.write_artifact(art, tensors, "int7")
    out = tmp_path / "e.json"
    eb.main(["--checkpoint", str(art), "--no-synthetic", "--out", str(out)])
    d = json.loads(out.read_text())
    k = d["kinds"]
    assert k["kinds"] == ["c_q", "mlp.fc", "tok_emb"] and d["tool_versions"]["numpy"] == np.__version__
    stored = sum(t["stream_bytes"]["codes"] for t in pc.read_header(art).info.tensors
                 if t["name"] in tensors)
    assert k["total"]["rans_stored"] == stored
    for kind, row in k["by_kind"].items():
        assert row["zstd22"] > row["rans_stored"] and "order0" in row
        for tool in ("lrzip_z", "zpaq_m5"):
            assert (tool in row) or (tool in k["peer_notes"])
    c = k["context"]
    assert c["total"]["order0"] == pytest.approx(k["total"]["order0"])
    assert c["verdict"]["best"]["bytes"] <= c["verdict"]["codec_auto"]["bytes"]
    assert all("context" in r for r in d["results"])
