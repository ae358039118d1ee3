"""Post-quantization bpb at fixed total bytes: hand recipes vs GPTQ vs the rate–distortion allocator.

CPU (default): trains a small model for ``--train-seconds`` on real FineWeb text (sp1024), then
for each regime (matrices at B bits, embedding at B+2) compares the hand recipes round-to-nearest
(max clip), percentile clip, k·σ clip and GPTQ (k·σ) with the GPTQ rate–distortion allocator at
equal bytes: for every hand recipe an ``alloc@<recipe>`` row gets exactly that recipe's total
artifact bytes as its budget (candidates are built once per regime); with ``--lowrank R`` an
``alloc+lrR@<recipe>`` row more, where the allocator may also add rank-R corrections (int8
factors) to the highest-error matrices, at the same budget. ``frontier`` in the JSON
holds the allocator's convex frontier (total payload bytes → predicted Δloss in nats). GPU: pass
``--checkpoint`` (and ``--model-config``) of a trained model and ``--data`` with real shards.

    python benchmarks/quant_bench.py [--train-seconds 60] [--checkpoint model.pt --data DIR] [--lowrank 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pgolf_codec.container import build_artifact  # noqa: E402
from pgolf_codec.gptq import gptq_quantize  # noqa: E402
from pgolf_codec.schemes import QuantSpec, quantize  # noqa: E402
from pgolf_eval.evaluate import evaluate_tokens, load_val_tokens  # noqa: E402
from pgolf_train.calibrate import calibrate, shard_batches  # noqa: E402
from pgolf_train.model import GPT, GPTConfig  # noqa: E402
from pgolf_train.quantize import (QuantizeOptions, build_candidates, load_checkpoint_weights,  # noqa: E402
                                  model_from_artifact_bytes, quantize_model)
from pgolf_train.shards import BOS_ID, read_shard, write_shard  # noqa: E402
from pgolf_train.source import model_source  # noqa: E402
from pgolf_train.tokenizer import byte_tables  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported, not run
from _results import write_json  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SMALL = dict(vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, seq_len=128)


def make_shards(out: Path, sp_model: Path) -> None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    docs = [json.loads(line)["text"] for line in (DATA / "fineweb" / "parameter_golf_verify_docs_200.jsonl").read_text().splitlines()]
    toks = [np.array([BOS_ID] + sp.encode(d), dtype=np.uint16) for d in docs]
    write_shard(out / "fineweb_val_000000.bin", np.concatenate(toks[:40]))
    write_shard(out / "fineweb_train_000000.bin", np.concatenate(toks[40:]))


def train_small(data: Path, seconds: float, device: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).to(device)
    toks = torch.from_numpy(read_shard(data / "fineweb_train_000000.bin").astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        i = torch.randint(0, len(toks) - SMALL["seq_len"] - 1, (16,))
        b = torch.stack([toks[j:j + SMALL["seq_len"] + 1] for j in i]).to(device)
        loss = model(b[:, :-1], b[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"train step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return model.eval()


def evaluate_bytes(data: bytes, cfg: GPTConfig, tokens, tables, device: str) -> float:
    m = model_from_artifact_bytes(data, cfg, device)
    return evaluate_tokens(m, tokens, tables, seq_len=cfg.seq_len, device=device, log=None).val_bpb


def hand_recipe(state, hessians, bits: int, method: str, meta, code) -> bytes:
    """Matrices at `bits` (tied embedding at bits+2), other tensors fp16, by one fixed rule."""
    tensors = {}
    for name, w in state.items():
        if name not in hessians:
            tensors[name] = quantize(w, QuantSpec.parse("fp16"))
            continue
        b = min(8, bits + 2) if name == "tok_emb.weight" else bits
        clip = {"rtn-max": "", "percentile": ":percentile=99.99", "sdclip": ":sdclip=12.5", "gptq": ":sdclip=12.5"}[method]
        spec = QuantSpec.parse(f"int{b}{clip}")
        tensors[name] = gptq_quantize(w, hessians[name], spec) if method == "gptq" else quantize(w, spec)
    data, _ = build_artifact(tensors, "fp32", metadata=meta, code=code)
    return data


def write_result(args, cfg: GPTConfig, base: float, tokens, rows: list, frontiers: dict) -> None:
    write_json(args.out, {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                          "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
                          "host": platform.node(), "checkpoint": args.checkpoint, "model_config": cfg.to_dict(),
                          "unquantized_bpb": base, "val_tokens": len(tokens), "rows": rows, "frontier": frontiers})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--model-config")
    ap.add_argument("--data", help="shard directory (default: built from the shared FineWeb docs)")
    ap.add_argument("--tokenizer", default=str(DATA / "tokenizers" / "fineweb_1024_bpe.model"))
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--bits", default="4,6", help="hand-recipe regimes (matrix bit widths)")
    ap.add_argument("--calib-tokens", type=int, default=32_768)
    ap.add_argument("--val-tokens", type=int, default=60_000)
    ap.add_argument("--lowrank", type=int, default=0, help="also allocate with rank-R low-rank corrections (0 = off)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quant_bench.json"))
    args = ap.parse_args()
    if args.device == "cpu" and not args.checkpoint:
        torch.set_num_threads(1)  # the small model's matrices: thread hand-offs cost more than the math

    tmp = tempfile.TemporaryDirectory()
    data = Path(args.data) if args.data else Path(tmp.name)
    if not args.data:
        make_shards(data, Path(args.tokenizer))
    if args.checkpoint:
        state, cfg = load_checkpoint_weights(args.checkpoint, args.model_config)
        model = GPT(cfg).to(args.device)
        model.load_state_dict({k: v.to(args.device) for k, v in state.items()})
    else:
        model = train_small(data, args.train_seconds, args.device)
        cfg = model.cfg
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    model.eval()
    tokens = load_val_tokens(data, cfg.vocab_size)[:args.val_tokens]
    tables = byte_tables(args.tokenizer, cfg.vocab_size)
    base = evaluate_tokens(model, tokens, tables, seq_len=cfg.seq_len, device=args.device, log=None).val_bpb
    calib = calibrate(model, source="shards", data_dir=data, tokens=args.calib_tokens, seq_len=cfg.seq_len, batch_size=8)
    hessians = {k: v.cpu() for k, v in calib.hessians.items()}
    probe = next(shard_batches(data, seq_len=cfg.seq_len + 1, batch_size=8, vocab_size=cfg.vocab_size))
    meta = {"model_config": cfg.to_dict(), "model_code": "model.py"}
    code = {"model.py": model_source()}

    rows, frontiers = [], {}
    for bits in (int(b) for b in args.bits.split(",")):
        hand = {m: hand_recipe(state, hessians, bits, m, meta, code) for m in ("rtn-max", "percentile", "sdclip", "gptq")}
        opts = QuantizeOptions(bits=tuple(range(max(2, bits - 2), min(8, bits + 2) + 1)), clips=(6, 8, 10, 12.5, 16),
                               gptq="on")
        opts_lr = dataclasses.replace(opts, lowrank=args.lowrank)
        t0 = time.perf_counter()
        # One build: with --lowrank it also holds the corrected variants of the worst matrices; the
        # plain allocator sees the same candidates without them (same sensitivity probes).
        cands_lr = build_candidates(model, {k: v.to(args.device) for k, v in hessians.items()}, opts_lr,
                                    probe=probe.to(args.device))
        cands = {n: [c for c in cs if c.payload["lowrank"] is None] for n, cs in cands_lr.items()}
        dt = time.perf_counter() - t0
        print(f"regime {bits}: candidates for {len(cands)} tensors in {dt:.1f}s ({dt / len(cands):.2f}s/tensor, "
              f"{len(next(iter(cands.values())))} each)", file=sys.stderr)
        if not args.lowrank:
            cands_lr = None
        alloc = None
        for m, d in hand.items():
            bpb = evaluate_bytes(d, cfg, tokens, tables, args.device)
            rows.append({"regime_bits": bits, "method": m, "bytes": len(d), "budget": len(d), "val_bpb": bpb,
                         "delta_bpb": bpb - base})
            # The allocator gets exactly the hand recipe's total artifact bytes (code included).
            a_data, _, alloc, _ = quantize_model(state, cfg, hessians, len(d), opts, metadata=meta, probe=probe,
                                                 device=args.device, candidates=cands)
            a_bpb = evaluate_bytes(a_data, cfg, tokens, tables, args.device)
            rows.append({"regime_bits": bits, "method": f"alloc@{m}", "bytes": len(a_data), "budget": len(d),
                         "val_bpb": a_bpb, "delta_bpb": a_bpb - base, "predicted_nats": alloc.total_distortion,
                         "beats_hand": a_bpb < bpb})
            if cands_lr is not None:  # the same budget, the allocator also offered low-rank corrections
                l_data, _, l_alloc, labels = quantize_model(state, cfg, hessians, len(d), opts_lr, metadata=meta,
                                                            probe=probe, device=args.device, candidates=cands_lr)
                l_bpb = evaluate_bytes(l_data, cfg, tokens, tables, args.device)
                rows.append({"regime_bits": bits, "method": f"alloc+lr{args.lowrank}@{m}", "bytes": len(l_data),
                             "budget": len(d), "val_bpb": l_bpb, "delta_bpb": l_bpb - base,
                             "predicted_nats": l_alloc.total_distortion, "beats_hand": l_bpb < bpb,
                             "lowrank_tensors": sorted(n for n, lab in labels.items() if "+lr" in lab)})
        frontiers[bits] = [(b, dist) for b, dist, _ in alloc.hull]
        write_result(args, cfg, base, tokens, rows, frontiers)  # after each regime: a cut-off run keeps it
        if alloc.hull:
            print(f"regime {bits} frontier (payload bytes -> predicted Δloss nats):", file=sys.stderr)
            for b, dist in frontiers[bits][::max(1, len(frontiers[bits]) // 8)]:
                print(f"  {b:>10,}  {dist:.5f}", file=sys.stderr)

    print(f"\nunquantized val_bpb {base:.5f}  ({len(tokens):,} val tokens)")
    print(f"{'regime':>6} {'method':22s} {'bytes':>10} {'val_bpb':>9} {'Δbpb':>9}")
    for r in rows:
        verdict = "" if "beats_hand" not in r else ("  beats the hand recipe" if r["beats_hand"] else "  LOSES to the hand recipe")
        print(f"{r['regime_bits']:>6} {r['method']:22s} {r['bytes']:>10,} {r['val_bpb']:>9.5f} {r['delta_bpb']:>+9.5f}{verdict}")
    write_result(args, cfg, base, tokens, rows, frontiers)


if __name__ == "__main__":
    main()
