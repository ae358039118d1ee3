"""Row order and the rANS row-reference models (issue 24): what reordering rows so that similar
rows are adjacent is worth, in exact bytes of the real coder, on ``.pgolf`` artifacts.

Two mechanisms:

(a) a row order stored in the stream: rANS kind 4 (rowperm, format 1.3), kind 3 over the rows in
    a greedy L1 nearest-neighbour chain, the order's Lehmer digits included in the blob. Measured
    per tensor (codes stream: kind 4 forced against the best blob without it) and as whole
    re-packs of the artifact's exact codes with kinds 0-2, 0-3 and 0-4 available. For ``tok_emb``
    also a 2-opt refinement of the chain (on the exact L1 distance matrix), which an encoder
    could add without a format change.
(b) a function-preserving permutation of the MLP hidden units (``mlp.fc`` rows with ``mlp.proj``
    columns; nothing stored): the chain order of ``fc``'s codes applied to both, each coded
    "auto". Exact for per-row scales and round-to-nearest codes (a permuted weight quantizes to
    the permuted codes); for GPTQ codes a close proxy (act order sorts the same Hessian diagonal).
    Model knowledge, so it is measured here only.

Speeds: ``tok_emb``'s encode ("auto", best of 3) and the decode of its kind-3 and kind-4 blobs
(best and median of 15), one thread.

    python3 benchmarks/entropy_roworder.py --artifact .data/h200art/model.pgolf \\
        --artifact .data/gptq6/model_int6_gptq.pgolf --out benchmarks/results/entropy_bench_roworder.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgolf_codec as pc  # noqa: E402
from pgolf_codec import coders, rans  # noqa: E402
from pgolf_codec.jit import njit  # noqa: E402

from _results import git  # noqa: E402
from entropy_bench import KINDS, tensor_kind  # noqa: E402


@njit(nogil=True)
def _l1_matrix(x):  # pragma: no cover
    rows, cols = x.shape
    d = np.zeros((rows, rows), np.int64)
    for i in range(rows):
        for j in range(i + 1, rows):
            s = np.int64(0)
            for c in range(cols):
                s += abs(np.int64(x[i, c]) - np.int64(x[j, c]))
            d[i, j] = s
            d[j, i] = s
    return d


@njit(nogil=True)
def _two_opt(order, d, passes):  # pragma: no cover
    """2-opt on an open path (first row fixed): reverse ``o[i+1..j]`` while that shortens the
    summed L1 distance of consecutive rows; at most ``passes`` sweeps."""
    o = order.copy()
    n = o.size
    for _ in range(passes):
        moved = 0
        for i in range(n - 1):
            for j in range(i + 2, n):
                a, b, c = o[i], o[i + 1], o[j]
                delta = d[a, c] - d[a, b]
                if j + 1 < n:
                    delta += d[b, o[j + 1]] - d[c, o[j + 1]]
                if delta < 0:
                    lo, hi = i + 1, j
                    while lo < hi:
                        o[lo], o[hi] = o[hi], o[lo]
                        lo += 1
                        hi -= 1
                    moved += 1
        if moved == 0:
            break
    return o


def _nbytes(x: np.ndarray, alphabet: int, model: str = "auto") -> int:
    return len(rans.encode(np.ascontiguousarray(x).ravel(), alphabet, x.shape[0], x.shape[1], model=model))


def _without_rowperm(x: np.ndarray, alphabet: int) -> int:
    saved = rans._ROWPERM_MAX_ROWS
    rans._ROWPERM_MAX_ROWS = 0
    try:
        return _nbytes(x, alphabet)
    finally:
        rans._ROWPERM_MAX_ROWS = saved


def _best_kinds_0_3(x: np.ndarray, alphabet: int) -> int:
    """The smallest of auto without kind 4 and kind 3 forced (auto's screen may skip kind 3)."""
    return min(_without_rowperm(x, alphabet), _nbytes(x, alphabet, "rowref"))


def _order_bytes(rows: int) -> int:
    return (rans._perm_bits(rows) + 7) // 8


def repack(art, knobs: dict) -> tuple[int, dict, float]:
    """Bytes of the artifact re-packed from its exact codes with rans module knobs set."""
    saved = {k: getattr(rans, k) for k in knobs}
    for k, v in knobs.items():
        setattr(rans, k, v)
    coders.clear_cache()
    try:
        t = time.perf_counter()
        data, info = pc.build_artifact(art.quantized, "fp32", metadata=art.metadata, code=art.code)
        secs = time.perf_counter() - t
    finally:
        for k, v in saved.items():
            setattr(rans, k, v)
        coders.clear_cache()
    models = {t["name"]: t.get("rans_model") for t in info.tensors}
    return len(data), models, secs


def tensor_probes(art) -> list[dict]:
    out = []
    blocks = {}
    for name, q in art.quantized.items():
        if len(q.shape) != 2 or not 0 < q.spec.levels <= 256:
            continue
        x = q.codes.numpy()
        al = q.spec.levels
        rows = x.shape[0]
        base = _without_rowperm(x, al)
        order = rans._chain_order(x.astype(np.int16))
        rec = {"name": name, "kind": tensor_kind(name), "shape": list(x.shape), "scheme": str(q.spec),
               "best_without_kind4": base, "kind3": _nbytes(x, al, "rowref"),
               "kind4": _nbytes(x, al, "rowperm"), "order_bytes": _order_bytes(rows),
               "chained_best_without_kind4": _best_kinds_0_3(x[order], al)}
        rec["auto"] = _nbytes(x, al)
        rec["kind4_saves"] = base - rec["kind4"]
        out.append(rec)
        if rec["kind"] in ("mlp.fc", "mlp.proj"):
            blocks.setdefault(name.split(".mlp.")[0], {})[rec["kind"]] = (x, al, rec)
    # (b) the hidden-unit permutation of each block: fc rows and proj columns in fc's chain order
    for blk, parts in blocks.items():
        (fx, fal, frec), (px, pal, prec) = parts["mlp.fc"], parts["mlp.proj"]
        order = rans._chain_order(fx.astype(np.int16))
        frec["hidden_perm_fc_auto"] = _nbytes(fx[order], fal)
        frec["hidden_perm_fc_best"] = _best_kinds_0_3(fx[order], fal)
        prec["hidden_perm_proj_auto"] = _nbytes(np.ascontiguousarray(px[:, order]), pal)
    return out


def tok_emb_extras(art) -> dict:
    q = art.quantized["tok_emb.weight"]
    x = q.codes.numpy()
    al = q.spec.levels
    rows, row_len = x.shape
    t = time.perf_counter()
    chain = rans._chain_order(x.astype(np.int16))
    t_chain = time.perf_counter() - t
    t = time.perf_counter()
    d = _l1_matrix(x.astype(np.int16))
    opt = _two_opt(chain, d, 20)
    t_opt = time.perf_counter() - t
    path = lambda o: int(d[o[:-1], o[1:]].sum())  # noqa: E731
    # a kind-4 blob is the kind-3 blob of the reordered rows with the order bytes inserted
    kind4 = _nbytes(x, al, "rowperm")
    assert kind4 == _nbytes(x[chain], al, "rowref") + _order_bytes(rows)
    rec = {"chain_seconds": round(t_chain, 2), "two_opt_seconds_with_matrix": round(t_opt, 2),
           "l1_path": {"stored_order": path(np.arange(rows)), "chain": path(chain), "chain_2opt": path(opt)},
           "kind4_chain": kind4,
           "kind4_chain_2opt": _nbytes(x[opt], al, "rowref") + _order_bytes(rows),
           "note": "kind4_chain_2opt: the kind-4 blob an encoder that refines the chain by 2-opt would "
                   "write (kind 3 of the reordered rows + the order bytes, exact); no format change"}
    # speeds, one thread (numba kernels are single-threaded)
    flat = np.ascontiguousarray(x.ravel())
    times = []
    for _ in range(3):
        coders.clear_cache()
        t = time.perf_counter()
        rans.encode(flat, al, rows, row_len)
        times.append(time.perf_counter() - t)
    rec["encode_auto_seconds_best_of_3"] = round(min(times), 2)
    for model in ("rowref", "rowperm"):
        blob = rans.encode(flat, al, rows, row_len, model=model)
        ts = []
        for _ in range(15):
            t = time.perf_counter()
            rans.decode(blob, flat.size, al, rows, row_len)
            ts.append(time.perf_counter() - t)
        rec[f"decode_{model}_msym_s"] = {"best": round(flat.size / min(ts) / 1e6, 1),
                                         "median": round(flat.size / statistics.median(ts) / 1e6, 1)}
    return rec


def by_kind(probes: list[dict]) -> dict:
    out = {}
    for kind in KINDS:
        ps = [p for p in probes if p["kind"] == kind]
        if not ps:
            continue
        row = {k: sum(p[k] for p in ps) for k in ("best_without_kind4", "kind3", "kind4", "order_bytes",
                                                  "chained_best_without_kind4", "auto", "kind4_saves")}
        row["tensors"] = len(ps)
        row["tensors_auto_kind4"] = sum(p["auto"] < p["best_without_kind4"] for p in ps)
        row["chain_gain_before_order"] = row["best_without_kind4"] - row["chained_best_without_kind4"]
        if kind == "mlp.fc":
            row["hidden_perm_fc_auto"] = sum(p["hidden_perm_fc_auto"] for p in ps)
            row["hidden_perm_fc_best"] = sum(p["hidden_perm_fc_best"] for p in ps)
            row["hidden_perm_saves"] = row["best_without_kind4"] - row["hidden_perm_fc_best"]
        if kind == "mlp.proj":
            row["hidden_perm_proj_auto"] = sum(p["hidden_perm_proj_auto"] for p in ps)
            row["hidden_perm_saves"] = row["best_without_kind4"] - row["hidden_perm_proj_auto"]
        out[kind] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "entropy_bench_roworder.json")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    recs = {}
    for path in args.artifact:
        art = pc.read_artifact(path)
        rec = {"path": str(path), "bytes": path.stat().st_size, "format_version": art.info.format_version}
        packs = {}
        for label, knobs in (("kinds_0_2", {"_ROWREF_MIN_GAIN": float("inf")}),
                             ("kinds_0_3", {"_ROWPERM_MAX_ROWS": 0}), ("kinds_0_4", {})):
            nbytes, models, secs = repack(art, knobs)
            packs[label] = {"bytes": nbytes, "seconds": round(secs, 1),
                            "tensors_rowref": sorted(n for n, m in models.items() if m == "rowref"),
                            "tensors_rowperm": sorted(n for n, m in models.items() if m == "rowperm")}
            print(f"{path.name} {label}: {nbytes:,} bytes ({secs:.0f} s)", flush=True)
        packs["kind4_saves_vs_kinds_0_3"] = packs["kinds_0_3"]["bytes"] - packs["kinds_0_4"]["bytes"]
        packs["kinds_3_4_save_vs_kinds_0_2"] = packs["kinds_0_2"]["bytes"] - packs["kinds_0_4"]["bytes"]
        rec["repack"] = packs
        probes = tensor_probes(art)
        rec["by_kind"] = by_kind(probes)
        rec["total"] = {k: sum(v[k] for v in rec["by_kind"].values()) for k in
                        ("best_without_kind4", "kind4", "order_bytes", "auto", "chained_best_without_kind4")}
        rec["total"]["hidden_perm_saves"] = sum(v.get("hidden_perm_saves", 0) for v in rec["by_kind"].values())
        rec["tensors"] = probes
        if "tok_emb.weight" in art.quantized:
            rec["tok_emb"] = tok_emb_extras(art)
        for kind, row in rec["by_kind"].items():
            print(f"  {kind:10s} without kind 4 {row['best_without_kind4']:>10,}  kind 4 forced "
                  f"{row['kind4']:>10,} (order {row['order_bytes']:,})  auto {row['auto']:>10,}"
                  + (f"  hidden-unit perm saves {row['hidden_perm_saves']:,}" if "hidden_perm_saves" in row
                     else ""), flush=True)
        recs[path.stem] = rec
    record = {
        "command": " ".join(["entropy_roworder.py"] + (argv if argv is not None else sys.argv[1:])),
        "code_commit": git("rev-parse", "--short", "HEAD"),
        "code_dirty": bool(git("status", "--porcelain", "--", "pgolf_codec", "benchmarks/entropy_roworder.py")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, 1 thread for the coder kernels, "
                  f"{os.cpu_count()} cores shared, load average {os.getloadavg()[0]:.1f} at the end)",
        "keys": {"best_without_kind4": "codes stream, the smallest rANS blob with kinds 0-3 (auto, kind 4 off)",
                 "kind3 / kind4": "codes stream, that kind forced (kind 4: greedy L1 chain, order included)",
                 "order_bytes": "kind 4's stored order: ceil(Σ_{v<rows} bitlen(v) / 8)",
                 "chained_best_without_kind4": "the smaller of auto without kind 4 and kind 3 forced, on the "
                                               "rows in chain order, the order not stored (what a free "
                                               "permutation would give)",
                 "auto": "codes stream, auto with kind 4 available",
                 "hidden_perm_*": "(b): mlp.fc rows and mlp.proj columns in fc's chain order, nothing stored; "
                                  "fc_auto: auto, fc_best: the smaller of that and kind 3 forced; saves: "
                                  "best_without_kind4 minus fc_best (fc) or proj_auto (proj)",
                 "repack": "whole artifact re-packed from its exact codes (pgolf_codec.build_artifact)"},
        "artifacts": recs,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} ({record['elapsed_s']} s)")


if __name__ == "__main__":
    main()
