"""An int6 GPTQ artifact from a trained ``.pgolf`` artifact, on the CPU, for the codec's
entropy measurements (issue 24 item 3).

The artifact's weights are decoded to float32 (already once quantized: int7 blocks, int8
``tok_emb`` for the h200 run), the model is rebuilt from its recorded config, input Hessians of
every block matrix are collected from a few sequences of the data folder's *train* shards
(``pgolf_train.calibrate``), and each block matrix is re-quantized at int6 with GPTQ
(``pgolf_codec.gptq``, act order, per-row scales): the k·σ clip is chosen per tensor among
``--clips`` by the smallest Hessian-weighted error (one stacked sweep tries them all).
``tok_emb`` keeps the artifact's exact int8 codes and scales, the small float tensors stay as
stored. The new artifact is written to ``--out`` (an ignored path: artifacts are not committed),
with a JSON sidecar ``<out>.json``: calibration tokens, clip picks, Hessian errors of GPTQ against
round-to-nearest at the same spec, and, as a sanity check that nothing collapsed, the mean loss
of the source and the int6 model on the first ``--check-seqs`` sequences of the val shard.

    python3 benchmarks/entropy_gptq_artifact.py --artifact .data/h200art/model.pgolf \\
        --data .data/h200art/sp4096 --out .data/gptq6/model_int6_gptq.pgolf
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pgolf_codec.container import build_artifact, read_artifact  # noqa: E402
from pgolf_codec.gptq import gptq_quantize_many, hessian_error  # noqa: E402
from pgolf_codec.schemes import QuantSpec, dequantize, quantize  # noqa: E402

from _results import git  # noqa: E402


@torch.no_grad()
def _mean_loss(model, tokens: np.ndarray, seq_len: int, seqs: int) -> float:
    n = min(seqs, (tokens.size - 1) // seq_len)
    losses = []
    for i in range(n):
        x = torch.from_numpy(tokens[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64))[None]
        losses.append(float(model(x[:, :-1], x[:, 1:])))
    return float(np.mean(losses))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path(".data/h200art/model.pgolf"))
    ap.add_argument("--data", type=Path, default=Path(".data/h200art/sp4096"),
                    help="data folder: calibration from its train shards, the loss check on its val shard")
    ap.add_argument("--out", type=Path, default=Path(".data/gptq6/model_int6_gptq.pgolf"))
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--clips", default="2.5,3,3.5,4,5,6,8,12.5", help="k of the k·σ clips tried per tensor")
    ap.add_argument("--calib-tokens", type=int, default=131072)
    ap.add_argument("--calib-seq-len", type=int, default=1024)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--check-seqs", type=int, default=16, help="val sequences of the loss check (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from pgolf_train.calibrate import calibrate
    from pgolf_train.model import GPT, GPTConfig
    from pgolf_train.shards import list_shards, read_shard

    art = read_artifact(args.artifact)
    cfg = GPTConfig.from_dict(art.metadata["model_config"])
    state = {k: v.float() for k, v in art.tensors.items()}
    model = GPT(cfg)
    model.load_state_dict(state)
    cal = calibrate(model, source="shards", data_dir=args.data, tokens=args.calib_tokens,
                    seq_len=args.calib_seq_len, batch_size=args.calib_batch)
    clips = [float(c) for c in args.clips.split(",")]
    specs = [QuantSpec.parse(f"int{args.bits}:sdclip={c:g}") for c in clips]

    tensors, per_tensor = {}, {}
    t_q = time.perf_counter()
    for name in sorted(state):
        q_old = art.quantized.get(name)
        if name.startswith("blocks.") and name.endswith(".weight") and state[name].dim() == 2:
            w, H = state[name], cal.hessians[name]
            sols = gptq_quantize_many(w, H, specs)
            errs = [hessian_error(w, dequantize(q), H) for q in sols]
            k = int(np.argmin(errs))
            rtn = hessian_error(w, dequantize(quantize(w, specs[k])), H)
            tensors[name] = sols[k]
            per_tensor[name] = {"spec": str(specs[k]), "hessian_error_gptq": errs[k],
                                "hessian_error_rtn_same_spec": rtn,
                                "hessian_error_by_clip": dict(zip(map(str, clips), errs))}
        elif q_old is not None:
            tensors[name] = q_old          # tok_emb: the stored int8 codes and scales, unchanged
        else:
            tensors[name] = art.tensors[name]   # small float tensors (their stored values)
    secs_q = time.perf_counter() - t_q
    recipe = "fp32"     # only the float tensors consult it: they are kept at full precision, as stored
    data, info = build_artifact(tensors, recipe, metadata={**art.metadata, "requantized": {
        "source": str(args.artifact), "bits": args.bits, "gptq": True, "clips": clips,
        "calib_tokens": cal.tokens, "calib_split": "train"}}, code=art.code)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)

    check = {}
    if args.check_seqs:
        val = np.asarray(read_shard(list_shards(args.data, "val")[0], vocab_size=cfg.vocab_size))
        model.eval()
        check["source_loss"] = _mean_loss(model, val, cfg.seq_len, args.check_seqs)
        new = read_artifact(args.out)
        model.load_state_dict({k: v.float() for k, v in new.tensors.items()})
        check["int6_gptq_loss"] = _mean_loss(model, val, cfg.seq_len, args.check_seqs)
        check["tokens"] = args.check_seqs * cfg.seq_len
        check["note"] = "mean next-token loss (nats) on the first val sequences: a sanity check, not a score"
    err_g = sum(v["hessian_error_gptq"] for v in per_tensor.values())
    err_r = sum(v["hessian_error_rtn_same_spec"] for v in per_tensor.values())
    record = {
        "command": " ".join(["entropy_gptq_artifact.py"] + (argv if argv is not None else sys.argv[1:])),
        "code_commit": git("rev-parse", "--short", "HEAD"),
        "code_dirty": bool(git("status", "--porcelain", "--", "benchmarks/entropy_gptq_artifact.py",
                                "pgolf_codec")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.machine()}, {args.threads} threads, {os.cpu_count()} cores)",
        "source_artifact": {"path": str(args.artifact), "bytes": args.artifact.stat().st_size},
        "out": {"path": str(args.out), "bytes": len(data), "model_bytes": info.model_bytes,
                "code_bytes": info.code_bytes},
        "calibration": {"tokens": cal.tokens, "seconds": round(cal.seconds, 1), "split": "train",
                        "seq_len": args.calib_seq_len, "batch": args.calib_batch},
        "gptq_seconds": round(secs_q, 1),
        "clip_picks": {c: sum(v["spec"] == str(s) for v in per_tensor.values()) for c, s in
                       zip(map(str, clips), specs)},
        "hessian_error_total": {"gptq": err_g, "rtn_same_spec": err_r, "gptq_over_rtn": err_g / err_r},
        "loss_check": check,
        "tensors": per_tensor,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    side = args.out.with_name(args.out.name + ".json")
    side.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "tensors"}, indent=1))
    print(f"wrote {args.out} ({len(data):,} bytes) and {side}")


if __name__ == "__main__":
    main()
