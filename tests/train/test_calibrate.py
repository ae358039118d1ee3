"""Calibration Hessians (shards and self-generated, time limit) and the `pgolf quantize` command."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf_train.calibrate import calibrate, collect_hessians, generate_batches
from pgolf_train.model import GPT, GPTConfig, CastedLinear
from pgolf_train.shards import BOS_ID, write_shard

from .train_fixtures import fit_on_shard

pytestmark = pytest.mark.usefixtures("one_thread")


CFG = dict(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, seq_len=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sp1024: Path, fineweb_docs: Path) -> Path:
    """Real FineWeb documents tokenized with sp1024 into a train and a val shard."""
    sp = spm.SentencePieceProcessor(model_file=str(sp1024))
    docs = [json.loads(line)["text"] for line in fineweb_docs.read_text().splitlines()[:120]]
    toks = [np.array([BOS_ID] + sp.encode(d), dtype=np.uint16) for d in docs]
    d = tmp_path_factory.mktemp("shards")
    write_shard(d / "fineweb_val_000000.bin", np.concatenate(toks[:20])[:8192])
    write_shard(d / "fineweb_train_000000.bin", np.concatenate(toks[20:]))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir: Path) -> Path:
    """A tiny model trained for a few seconds, saved as a .pt state dict with its config next to it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    fit_on_shard(model, data_dir, steps=25)
    d = tmp_path_factory.mktemp("ckpt")
    torch.save(model.state_dict(), d / "model.pt")
    (d / "train_summary.json").write_text(json.dumps({"config": {**CFG, "lr": 0.1}}))
    return d / "model.pt"


def test_hessians_from_shards(data_dir: Path) -> None:
    model = GPT(GPTConfig(**CFG))
    res = calibrate(model, source="shards", data_dir=data_dir, tokens=2048, seq_len=64, batch_size=8)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    assert set(res.hessians) == set(linears) | {"tok_emb.weight"}
    for name, H in res.hessians.items():
        cols = model.tok_emb.weight.shape[1] if name == "tok_emb.weight" else linears[name].in_features
        assert H.shape == (cols, cols) and H.dtype == torch.float32
        assert torch.allclose(H, H.T, atol=1e-5) and torch.linalg.eigvalsh(H.double()).min() > -1e-5
    assert res.tokens == 2048 and not res.stopped_early
    # The hooks are gone afterwards.
    assert all(not m._forward_hooks for m in linears.values())


def test_hessian_is_mean_gram_of_inputs() -> None:
    model = GPT(GPTConfig(**CFG)).eval()
    idx = torch.randint(0, 1024, (3, 16))
    seen = []
    h = model.blocks[1].mlp.proj.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    res = collect_hessians(model, [idx])
    h.remove()
    x = seen[0]
    assert torch.allclose(res.hessians["blocks.1.mlp.proj.weight"], x.T @ x / len(x), rtol=1e-4, atol=1e-6)


def test_self_generated_calibration_and_time_limit() -> None:
    model = GPT(GPTConfig(**CFG))
    batches = generate_batches(model, seq_len=12, batch_size=4, temperature=0.9, seed=1)
    b = next(batches)
    assert b.shape == (4, 12) and torch.all(b[:, 0] == BOS_ID) and int(b.max()) < 1024
    res = calibrate(model, source="self", tokens=1000, seq_len=16, batch_size=4, seconds=60)
    assert res.tokens >= 1000 and len(res.hessians) == 13 and not res.stopped_early
    t = time.perf_counter()
    res = calibrate(model, source="self", tokens=10**9, seq_len=64, batch_size=4, seconds=0.5)
    elapsed = time.perf_counter() - t
    assert res.stopped_early and 0 < res.tokens < 10**9
    assert elapsed < 5.0  # stops at the limit (plus at most one forward), not after 10^9 tokens


def _cli(args: list[str]) -> int:
    from pgolf.cli import main
    return main(args)


def test_quantize_cli_writes_within_budget(trained: Path, data_dir: Path, sp1024: Path, tmp_path: Path, capsys) -> None:
    from pgolf_codec.container import read_artifact
    out = tmp_path / "m.pgolf"
    budget = 150_000
    rc = _cli(["quantize", str(trained), "--budget", str(budget), "--data", str(data_dir), "--tokenizer", str(sp1024),
               "--bits", "3,8", "--clips", "6,12", "--gptq", "on", "--calib-tokens", "2048", "--calib-seq-len", "64",
               "--lowrank", "2", "--tolerance", "1.0", "--device", "cpu", "-o", str(out)])
    assert rc == 0
    art = read_artifact(out)
    assert out.stat().st_size == art.info.total_bytes <= budget
    text = capsys.readouterr().out
    assert "frontier" in text and "val_bpb unquantized" in text
    # An artifact reads back as a checkpoint: its decoded weights (low-rank folded in), its config.
    from pgolf_codec.gptq import apply_lowrank
    from pgolf_train.quantize import load_checkpoint_weights
    state, cfg = load_checkpoint_weights(out)
    assert cfg == load_checkpoint_weights(trained)[1]
    decoded = apply_lowrank(art.tensors)
    assert state.keys() == decoded.keys() and all(torch.equal(state[k], decoded[k].float()) for k in state)


def test_quantize_cli_refuses_degradation(trained: Path, data_dir: Path, sp1024: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bad.pgolf"
    args = ["quantize", str(trained), "--budget", "60000", "--data", str(data_dir), "--tokenizer", str(sp1024),
            "--bits", "2", "--clips", "2", "--gptq", "off", "--sensitivity", "hessian", "--calib-tokens", "1024",
            "--calib-seq-len", "64", "--tolerance", "0.001", "--device", "cpu", "-o", str(out)]
    assert _cli(args) == 3
    assert "refusing" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())  # no artifact, no temp file left
    assert _cli(args + ["--allow-degradation"]) == 0 and out.exists()
    # A budget below the smallest model is a clear error, not a crash.
    assert _cli(args[:3] + ["1000"] + args[4:-1] + [str(tmp_path / "x.pgolf")]) == 2


def test_measured_sensitivity_is_even_in_the_perturbation(trained: Path, data_dir: Path) -> None:
    # The probe measures the curvature term (L(w+δ) + L(w−δ))/2 − L(w): a candidate and its
    # mirror image 2w − ŵ get the same nats, so the batch gradient's g·δ, which flips sign,
    # cannot rank tensors. The scale is also the same for every candidate of a tensor.
    from pgolf_codec.allocate import Candidate
    from pgolf_codec.schemes import QuantSpec, dequantize, quantize
    from pgolf_train.calibrate import shard_batches
    from pgolf_train.quantize import _scale_by_sensitivity, load_checkpoint_weights

    state, cfg = load_checkpoint_weights(trained)
    model = GPT(cfg).eval()
    model.load_state_dict(state)
    probe = next(shard_batches(data_dir, seq_len=65, batch_size=4, vocab_size=cfg.vocab_size))
    name = "blocks.0.mlp.fc.weight"
    w = state[name]
    q = quantize(w, QuantSpec.parse("int3:sdclip=4"))
    mirror = quantize(2 * w - dequantize(q), QuantSpec.parse("fp32"))  # exact: it is off the int grid

    def scaled(quant, dist: float) -> list[float]:
        cands = {name: [Candidate(100, dist, "a", {"q": quant, "lowrank": None}),
                        Candidate(50, 2 * dist, "b", {"q": quant, "lowrank": None}),
                        Candidate(10, 3 * dist, "c", {"q": quant, "lowrank": None})]}
        _scale_by_sensitivity(model, probe, cands)
        return [c.distortion for c in cands[name]]

    plus, minus = scaled(q, 1.0), scaled(mirror, 1.0)
    assert plus[1] > 0 and plus[1] == pytest.approx(minus[1], rel=1e-3)
    assert plus[0] * 2 == pytest.approx(plus[1]) and plus[0] * 3 == pytest.approx(plus[2])
    assert torch.equal(model.state_dict()[name], w)  # the probe restores the weights



def test_candidate_sizes_coded_in_the_pool_are_the_inline_sizes(trained: Path, data_dir: Path) -> None:
    # build_candidates codes the candidates' sizes in the codec's thread pool while it makes the
    # next tensors' candidates; every size is the one encoded_size gives inline, in the same order.
    from pgolf_codec.container import encoded_size
    from pgolf_codec.schemes import dequantize
    from pgolf_train.calibrate import shard_batches
    from pgolf_train.quantize import QuantizeOptions, build_candidates, load_checkpoint_weights

    state, cfg = load_checkpoint_weights(trained)
    model = GPT(cfg).eval()
    model.load_state_dict(state)
    hessians = collect_hessians(model, shard_batches(data_dir, seq_len=64, batch_size=4), max_tokens=512).hessians
    opts = QuantizeOptions(bits=(3, 6), clips=(4.0, 12.0), sensitivity="hessian")
    cands = build_candidates(model, hessians, opts)
    assert sorted(cands) == sorted(hessians)
    for name, cs in cands.items():
        assert [c.label for c in cs] == [f"{s}{m}" for s in ("int3:sdclip=4", "int3:sdclip=12", "int6:sdclip=4",
                                                              "int6:sdclip=12") for m in ("", " rtn")]
        assert [c.nbytes for c in cs] == [encoded_size(c.payload["q"]) for c in cs]
        assert all(c.distortion > 0 and dequantize(c.payload["q"]).shape == state[name].shape for c in cs)
