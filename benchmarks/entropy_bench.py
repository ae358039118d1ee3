"""Bits per quantized weight: rANS (coder 4) against general byte compressors.

One run quantizes the same tensors with the codec's own ``pgolf_codec.schemes.quantize``
(int5..int8, sdclip k = 2.5, 4, 8, 12.5, 16, one scale per row; sdclip clips at
min(k·σ, max|w|), so for Gaussian rows k ≥ ~4 is the max clip) and codes the exact uint8 codes
the artifact stores with: the empirical order-0 entropy (the static-model limit),
rANS-static (table included), rANS-parametric (row widths included), rANS-column (column
widths and centers included), rANS-rowref (kind 3, centers predicted from the row above),
rANS-rowperm (kind 4, the same over the rows in a stored nearest-neighbour order, the order
included), zstd-22, lzma-9e and brotli-11 (one code per byte; byte shuffling is the identity for
1-byte symbols). Speeds are single-thread rANS encode (the "auto" choice: all models it fits,
best of 3), the column model's encode alone, and the decode of the smallest blob, of the column,
rowref and rowperm blobs (best of 15: decode takes milliseconds, so the best run filters out
other load).

Tensors: Gaussian weights whose per-row sigma varies x4 across rows, coded with per-row
scales (row code widths then nearly equal) and with one scale for the whole tensor (row
code widths differ x4: the case the parametric model is for); plus every 2-D weight of a
real checkpoint with ``--checkpoint`` (``.pt`` state dict loaded with ``weights_only``, or
``.safetensors``, quantized here at int6 and int8), or the exact stored codes of a ``.pgolf``
artifact's quantized matrices.

For a ``.pgolf`` artifact also, by tensor kind (c_q, c_k, c_v, attn.proj, mlp.fc, mlp.proj,
tok_emb; issue 24): the field's peers on the concatenated codes of each kind (zstd-22, xz -9e,
brotli-11, ``lrzip -T -z`` and ``zpaq -m5`` when installed, else a note) against the bytes the
artifact stores and the order-0 entropy; and what a context model would target: empirical
conditional entropies given the code above / to the left / both (bucketed) / above with the rows
in a nearest-neighbour chain, each next to an honest cost that includes its tables (adaptive KT
and back-off counts; the codec's parametric family with rank-1 row x column widths, a width shift
per context, a per-row prediction from the row above, side bytes estimated as the codec does).

    python3 benchmarks/entropy_bench.py [--rows 512 --cols 1024] [--checkpoint PATH]
                                        [--no-peers] [--no-context]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from pgolf_codec import rans
from pgolf_codec.jit import njit
from pgolf_codec.schemes import QuantSpec, quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported, not run
from _results import best_time, git  # noqa: E402

try:
    import brotli
except ImportError:  # brotli is a benchmark-only dependency
    brotli = None


def measure(codes: np.ndarray, alphabet: int) -> dict:
    """Bits per symbol for every coder on ``codes`` (uint8, shape (rows, row_len))."""
    rows, row_len = codes.shape
    n = codes.size
    flat = np.ascontiguousarray(codes.ravel())
    raw = flat.tobytes()
    bps = lambda nbytes: 8.0 * nbytes / n  # noqa: E731
    blobs = {m: rans.encode(flat, alphabet, rows, row_len, model=m)
             for m in ("static", "parametric", "column", "rowref", "rowperm")}
    for b in blobs.values():
        assert np.array_equal(rans.decode(b, n, alphabet, rows, row_len), flat)
    blob = min(blobs.values(), key=len)     # what "auto" keeps (ties → lowest kind)
    t_enc = best_time(lambda: rans.encode(flat, alphabet, rows, row_len))
    t_col = best_time(lambda: rans.encode(flat, alphabet, rows, row_len, model="column"))
    t_dec = best_time(lambda: rans.decode(blob, n, alphabet, rows, row_len), repeat=15)
    t_dec_col = best_time(lambda: rans.decode(blobs["column"], n, alphabet, rows, row_len), repeat=15)
    t_dec_ref = best_time(lambda: rans.decode(blobs["rowref"], n, alphabet, rows, row_len), repeat=15)
    t_dec_perm = best_time(lambda: rans.decode(blobs["rowperm"], n, alphabet, rows, row_len), repeat=15)
    out = {
        "n": n, "rows": rows, "row_len": row_len,
        "order0_entropy": rans.entropy_bits(flat) / n,
        "rans_static": bps(len(blobs["static"])),
        "rans_parametric": bps(len(blobs["parametric"])),
        "rans_column": bps(len(blobs["column"])),
        "rans_rowref": bps(len(blobs["rowref"])),
        "rans_rowperm": bps(len(blobs["rowperm"])),
        "auto_kind": blob[0],
        "zstd22": bps(len(zstandard.ZstdCompressor(level=22).compress(raw))),
        "lzma9e": bps(len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))),
        "enc_msym_s": n / t_enc / 1e6,
        "enc_column_msym_s": n / t_col / 1e6,
        "dec_msym_s": n / t_dec / 1e6,
        "dec_column_msym_s": n / t_dec_col / 1e6,
        "dec_rowref_msym_s": n / t_dec_ref / 1e6,
        "dec_rowperm_msym_s": n / t_dec_perm / 1e6,
    }
    if brotli is not None:
        out["brotli11"] = bps(len(brotli.compress(raw, quality=11, lgwin=24)))
    return out


def _codes(w: torch.Tensor, spec: QuantSpec) -> np.ndarray:
    q = quantize(w, spec)
    return q.codes.numpy()


def synthetic_cases(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.rand(rows, 1, generator=g) * np.log(4.0)) * 0.02  # x4 across rows
    w = torch.randn(rows, cols, generator=g) * sigma
    for bits in (5, 6, 7, 8):
        for k in (2.5, 4.0, 8.0, 12.5, 16.0):   # sdclip clips at min(k·σ, max|w|)
            spec = QuantSpec.parse(f"int{bits}:sdclip={k:g}")
            yield f"gauss int{bits} k={k:g} row-scale", _codes(w, spec), 1 << bits
    for bits in (5, 8):
        spec = QuantSpec.parse(f"int{bits}:sdclip=12.5")
        # A 1-D view is one row: one scale for the tensor; then back to the tensor's rows.
        codes = _codes(w.reshape(-1), spec).reshape(rows, cols)
        yield f"gauss int{bits} k=12.5 tensor-scale", codes, 1 << bits


def artifact_tensors(path: Path, min_params: int = 65536) -> list[dict]:
    """Every quantized 2-D tensor of an artifact: its exact stored codes (no re-quantization),
    its kind, and the payload bytes the artifact spends on its codes stream (and on all streams)."""
    from pgolf_codec.container import read_artifact
    art = read_artifact(path)
    info = {t["name"]: t for t in art.info.tensors}
    out = []
    for name, q in art.quantized.items():
        alphabet = q.spec.levels
        if 0 < alphabet <= 256 and len(q.shape) == 2 and q.codes.numel() >= min_params:
            t = info[name]
            out.append({"name": name, "case": f"{name} {q.spec}", "codes": q.codes.numpy(),
                        "alphabet": alphabet, "kind": tensor_kind(name), "coder": t["coder"],
                        "rans_model": t.get("rans_model"), "stored_codes_bytes": t["stream_bytes"]["codes"],
                        "stored_bytes": t["bytes"]})
    return out


def artifact_cases(path: Path, min_params: int = 65536):
    """The exact codes an artifact stores for each quantized 2-D tensor (no re-quantization)."""
    for t in artifact_tensors(path, min_params):
        yield t["case"], t["codes"], t["alphabet"]


def checkpoint_cases(path: Path, min_params: int = 65536):
    if path.suffix == ".pgolf":
        yield from artifact_cases(path, min_params)
        return
    if path.suffix == ".safetensors":
        from pgolf_codec.safetensors_io import read_safetensors
        sd, _ = read_safetensors(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    for name, w in sd.items():
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.numel() < min_params:
            continue
        for bits in (6, 8):
            spec = QuantSpec.parse(f"int{bits}:sdclip=12.5")
            yield f"{name} int{bits} k=12.5", _codes(w.float(), spec), 1 << bits

# ----------------------------------------------------------------------------- issue 24
# Per tensor kind: the field's peers (lrzip -z, zpaq -m5, xz, zstd-22, brotli-11) on the codes
# of all tensors of a kind, and the conditional entropies a context model would target, with
# what their tables or adaptation cost.

KINDS = ("c_q", "c_k", "c_v", "attn.proj", "mlp.fc", "mlp.proj", "tok_emb")
_KIND_KEYS = (("attn.c_q", "c_q"), ("attn.c_k", "c_k"), ("attn.c_v", "c_v"), ("attn.proj", "attn.proj"),
              ("mlp.fc", "mlp.fc"), ("mlp.proj", "mlp.proj"), ("tok_emb", "tok_emb"))
N_BUCKETS = 12          # |code - zero point| buckets of the quantized (above, left) context
_HEADER_BYTES = 5 + 3 + 4 + 4 * 8   # kind..hi, center2 + m, two varint lengths, 8 lane states


def tensor_kind(name: str) -> str | None:
    """The kind of a weight matrix by its name (``blocks.3.attn.c_q.weight`` → ``c_q``)."""
    for key, kind in _KIND_KEYS:
        if key in name:
            return kind
    return None


def _tool_version(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (p.stdout + p.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


# name -> (what it runs, command line template: {inp} input file, {out} output file, version command)
EXTERNAL = {
    "lrzip_z": ("lrzip -T -z (ZPAQ back end, as the 1.0611 record)",
                ["lrzip", "-T", "-z", "-q", "-f", "-o", "{out}", "{inp}"], ["lrzip", "-V"]),
    "zpaq_m5": ("zpaq a out.zpaq file -m5", ["zpaq", "a", "{out}", "{inp}", "-m5"], ["zpaq"]),
}


def tool_versions() -> dict:
    v = {"zstandard": f"{zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})",
         "lzma": f"python lzma (liblzma; xz CLI: {_tool_version(['xz', '--version'])})",
         "brotli": getattr(brotli, "__version__", "unknown") if brotli is not None else None,
         "numpy": np.__version__}
    for key, (_, cmd, vcmd) in EXTERNAL.items():
        v[key] = _tool_version(vcmd) if shutil.which(cmd[0]) else None
    return v


def peer_sizes(raw: bytes, workdir: Path) -> tuple[dict, dict, dict]:
    """Bytes of ``raw`` (one code per byte) under every peer coder; (sizes, seconds, notes).

    xz/zstd/brotli run in process; lrzip and zpaq as the Debian tools, in ``workdir`` (their
    output files include the tools' own container headers). A missing tool is skipped with a note.
    """
    sizes, secs, notes = {}, {}, {}

    def timed(key, fn):
        t = time.perf_counter()
        sizes[key] = fn()
        secs[key] = round(time.perf_counter() - t, 2)

    timed("zstd22", lambda: len(zstandard.ZstdCompressor(level=22).compress(raw)))
    timed("xz9e", lambda: len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)))
    if brotli is not None:
        timed("brotli11", lambda: len(brotli.compress(raw, quality=11, lgwin=24)))
    else:
        notes["brotli11"] = "skipped: the brotli module is not installed (pip install brotli)"
    inp = workdir / "codes.bin"
    inp.write_bytes(raw)
    for key, (_, cmd, _) in EXTERNAL.items():
        if shutil.which(cmd[0]) is None:
            notes[key] = f"skipped: {cmd[0]} not found (apt-get install -y {cmd[0]})"
            continue
        out = workdir / f"codes.{key}"
        out.unlink(missing_ok=True)
        argv = [a.format(inp=inp, out=out) for a in cmd]
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, cwd=workdir,
                           env={**os.environ, "LRZIP": "NOCONFIG"})
        if p.returncode != 0 or not out.exists():
            notes[key] = f"failed (rc {p.returncode}): {(p.stderr or p.stdout).strip()[-300:]}"
            continue
        secs[key] = round(time.perf_counter() - t, 2)
        sizes[key] = out.stat().st_size
        out.unlink()
    inp.unlink()
    return sizes, secs, notes


# --- count-based context models

def _ln_gamma(x: np.ndarray) -> np.ndarray:
    return torch.lgamma(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _h_counts(c: np.ndarray) -> float:
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum()) if c.size else 0.0


def dirichlet_bits(joint: np.ndarray, alphabet: int, alpha: np.ndarray) -> float:
    """Bits of coding adaptively, every context with its own counts started at ``alpha``.

    ``joint``: counts (contexts · alphabet,) of (context, symbol); ``alpha`` float64[alphabet],
    the prior pseudo-counts (0 for a symbol that never occurs). The sequential cost of a
    Dirichlet-multinomial does not depend on the order of the symbols:
    ``sum_k log Γ(n_k + β)/Γ(β) - sum_{k,s} log Γ(n_ks + α_s)/Γ(α_s)``, β = Σ α.
    """
    nz = np.flatnonzero(joint)
    cnt = joint[nz].astype(np.float64)
    a = alpha[nz % alphabet]
    nk = np.bincount(nz // alphabet, weights=cnt)
    nk = nk[nk > 0]
    beta = float(alpha.sum())
    nats = (float((_ln_gamma(nk + beta) - _ln_gamma(np.full(1, beta))).sum())
            - float((_ln_gamma(cnt + a) - _ln_gamma(a)).sum()))
    return float(nats / np.log(2.0))


_BACKOFF_STRENGTHS = np.array([2.0, 8.0, 32.0, 128.0, 512.0])


@njit(nogil=True)
def _backoff_kernel(ctx, sym, n_ctx, lo, hi, betas):  # pragma: no cover
    """Bits, one per β, of a sequential coder: p(s | k) = (n_ks + β·g(s)) / (n_k + β), where
    g is the adaptive order-0 estimate (g_s + 1/2) / (g + A/2) over the used range lo..hi."""
    alphabet = hi + 1
    half_a = 0.5 * (hi - lo + 1)
    nb = betas.size
    cnt = np.zeros((n_ctx, alphabet), np.int32)
    tot = np.zeros(n_ctx, np.int64)
    g = np.zeros(alphabet, np.int64)
    out = np.zeros(nb)
    for e in range(sym.size):
        k = ctx[e]
        s = sym[e]
        pg = (g[s] + 0.5) / (e + half_a)
        for b in range(nb):
            out[b] -= np.log2((cnt[k, s] + betas[b] * pg) / (tot[k] + betas[b]))
        cnt[k, s] += 1
        tot[k] += 1
        g[s] += 1
    return out


def adaptive_costs(joint: np.ndarray, alphabet: int, counts0: np.ndarray, ctx: np.ndarray | None = None,
                   sym: np.ndarray | None = None, n_ctx: int = 1) -> dict:
    """Honest bits of per-context adaptive coders (no table stored: only lo, hi and one byte).

    ``kt``: every context its own Krichevsky–Trofimov counts (α = 1/2 on the used range lo..hi),
    from ``joint`` (counts of (context, symbol), order-free). ``backoff`` (when the sequence
    ``ctx``, ``sym`` is given): counts per context started from β times the adaptive order-0
    estimate, β the best of ``_BACKOFF_STRENGTHS``: a context starts at order 0 and specializes
    as its counts grow, the way PPM/CM coders blend orders.
    """
    used = np.flatnonzero(counts0)
    lo, hi = int(used[0]), int(used[-1])
    kt = np.zeros(alphabet)
    kt[lo:hi + 1] = 0.5
    out = {"kt": dirichlet_bits(joint, alphabet, kt) + 16.0}
    if sym is not None:
        out["backoff"] = float(_backoff_kernel(ctx, sym, n_ctx, lo, hi, _BACKOFF_STRENGTHS).min()) + 24.0
    return out


def _buckets(codes: np.ndarray, center2: int, nb: int) -> np.ndarray:
    """Quantile buckets 0..nb-1 of |code - zero point| (edges: nb - 1 bytes of side information)."""
    d2 = np.abs(2 * codes.astype(np.int64) - center2).ravel()
    cdf = np.cumsum(np.bincount(d2)) / d2.size
    edges = np.unique(np.searchsorted(cdf, np.arange(1, nb) / nb))
    return np.searchsorted(edges, d2, side="left").reshape(codes.shape)


def neighbour_contexts(codes: np.ndarray, alphabet: int, center2: int, nb: int = N_BUCKETS) -> dict:
    """Context arrays (row-major, one per symbol) of the neighbours; a missing one is its own value."""
    c = codes.astype(np.int64)
    above = np.full_like(c, alphabet)
    above[1:] = c[:-1]
    left = np.full_like(c, alphabet)
    left[:, 1:] = c[:, :-1]
    b = _buckets(codes, center2, nb)
    ba = np.full_like(b, nb)
    ba[1:] = b[:-1]
    bl = np.full_like(b, nb)
    bl[:, 1:] = b[:, :-1]
    return {"above": above.ravel(), "left": left.ravel(), "above_b": ba.ravel(), "left_b": bl.ravel(),
            "above_left_b": (ba * (nb + 1) + bl).ravel(), "n_buckets": nb}


def log2_factorial(n: int) -> float:
    return float(_ln_gamma(np.array([n + 1.0]))[0]) / np.log(2.0)


# --- parametric models (the codec's family) with additive log-widths

@njit(nogil=True)
def _window_costs(group, base, cur, cidx, sym, bits, jbase, window, groups):  # pragma: no cover
    """``cost[g, t]``: bits of group g's symbols at width byte clip(base + cur[g] + t - window);
    ``bits[center, s, j - jbase]`` holds the width bytes jbase.. (clipped to that range)."""
    width = 2 * window + 1
    cost = np.zeros((groups, width))
    top = bits.shape[2] - 1
    for e in range(group.size):
        g = group[e]
        b = base[e] + cur[g] - window - jbase
        row = bits[cidx[e], sym[e]]
        if b >= 0 and b + width - 1 <= top:
            for t in range(width):
                cost[g, t] += row[b + t]
        else:
            for t in range(width):
                j = b + t
                j = 0 if j < 0 else (top if j > top else j)
                cost[g, t] += row[j]
    return cost


@njit(nogil=True)
def _total_cost(width, cidx, sym, bits, jbase):  # pragma: no cover
    top = bits.shape[2] - 1
    s = 0.0
    for e in range(width.size):
        j = width[e] - jbase
        j = 0 if j < 0 else (top if j > top else j)
        s += bits[cidx[e], sym[e], j]
    return s


class _Tables:
    """``P - log2(freq)`` of the codec's integer tables (``rans._param_freqs``) for width bytes
    ``jbase..jtop`` and the given centers (twice the center code), built once per shape m;
    laid out ``[center, symbol, j - jbase]`` so a symbol's candidate widths are adjacent."""

    def __init__(self, lo: int, hi: int, jbase: int, jtop: int):
        self.lo, self.hi, self.jbase, self.jtop = lo, hi, jbase, jtop
        self.cache = {}

    def get(self, m: int, centers2: np.ndarray) -> np.ndarray:
        key = (m, centers2.tobytes())
        if key not in self.cache:
            js = np.arange(self.jbase, self.jtop + 1)
            freq = rans._param_freqs(np.tile(js, centers2.size), m, self.lo, self.hi,
                                     centers2.repeat(js.size), rans._PROB_BITS)
            self.cache[key] = np.ascontiguousarray((rans._PROB_BITS - np.log2(freq)).reshape(
                centers2.size, js.size, self.hi - self.lo + 1).transpose(0, 2, 1))   # [center, s, j]
        return self.cache[key]


def _moment_shift(d: np.ndarray, group: np.ndarray, groups: int, width: np.ndarray) -> np.ndarray:
    """Per-group width-byte shifts that set a² to the group's mean square, relative to ``width``."""
    n = np.maximum(np.bincount(group, minlength=groups), 1)
    msd = np.bincount(group, weights=d * d, minlength=groups) / n
    target = 8.0 * np.log2(np.maximum(msd, 0.25)) + rans._WIDTH_OFFSET
    return np.rint(target - np.bincount(group, weights=width.astype(np.float64), minlength=groups) / n
                   ).astype(np.int64)


def fit_additive(sym: np.ndarray, d: np.ndarray, factors: dict, cidx: np.ndarray, bits: np.ndarray,
                 jbase: int, max_sweeps: int = 8, window: int = 3) -> tuple[float, dict, np.ndarray]:
    """Width byte of symbol e = 64 + Σ_F shift_F[index_F(e)], its table the codec's family.

    ``factors``: name -> (index per symbol int64, number of members); ``d``: each symbol's
    distance to its center. Coordinate descent: second-moment starting shifts, then each
    factor in turn moves every member's shift to the best of ±window (exact table bits), until
    a sweep changes nothing. Returns (data bits, shifts per factor, width per symbol).
    """
    shifts = {}
    width = np.full(sym.size, rans._WIDTH_OFFSET, np.int64)
    for f, (idx, n) in factors.items():
        shifts[f] = _moment_shift(d, idx, n, width)
        width += shifts[f][idx]
    for _ in range(max_sweeps):
        moved = 0
        for f, (idx, n) in factors.items():
            base = width - shifts[f][idx]
            cost = _window_costs(idx, base, shifts[f], cidx, sym, bits, jbase, window, n)
            step = np.argmin(cost, axis=1) - window
            moved += int(np.count_nonzero(step))
            shifts[f] = shifts[f] + step
            width = base + shifts[f][idx]
        if not moved:
            break
    return _total_cost(width, cidx, sym, bits, jbase), shifts, width


def _side_bits_signed(v: np.ndarray) -> float:
    """Side bits of signed bytes (zig-zag, static rANS), as the codec estimates its side blobs."""
    return rans._side_bits(rans._zigzag(np.clip(v, -128, 127)))


PARAM_MODELS = {   # name -> (width factors, column centers, row order, prediction from the row above)
    "row": (("row",), False, "stored", False),
    "column_centered": (("col",), True, "stored", False),
    "row_x_column": (("row", "col"), False, "stored", False),
    "row_x_column_centered": (("row", "col"), True, "stored", False),
    "row_x_column_x_context": (("row", "col", "ctx"), "auto", "stored", False),
    "row_x_column_row_predicted": (("row", "col"), "auto", "stored", True),
    "row_x_column_row_predicted_permuted": (("row", "col"), "auto", "chain", True),
}
PARAM_DOC = {
    "row": "per-row width (kind 1's model)",
    "column_centered": "per-column width and center (kind 2's model, without its 256-table cap)",
    "row_x_column": "rank 1: width a_ij = r_i·c_j (a row byte and a column byte), one center",
    "row_x_column_centered": "rank 1 + per-column centers",
    "row_x_column_x_context": "rank 1 (+ column centers where they paid) + a width shift per "
                              "(bucket(|above|), bucket(|left|)) context",
    "row_x_column_row_predicted": "rank 1 (+ centers where they paid), each row's center moved by "
                                  "ρ_i·(code above - its center), ρ_i in {0, 1/8, .., 1} per row "
                                  "(least squares pick; side byte per row)",
    "row_x_column_row_predicted_permuted": "the same with the rows in the nearest-neighbour chain "
                                           "order; the permutation is charged separately "
                                           "(permutation_bytes)",
}
RHO_STEPS = 8


def _row_predictions(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row i >= 1 the ρ = k/RHO_STEPS minimizing the mean square of r_i - ρ·r_(i-1) (rounded to
    half codes, as the model codes it); returns (prediction in half codes, k per row)."""
    prev, cur = r[:-1], r[1:]
    best = np.full(prev.shape[0], np.inf)
    pick = np.zeros(r.shape[0], np.int64)
    for k in range(RHO_STEPS + 1):
        msd = ((cur - np.rint(2 * k / RHO_STEPS * prev) / 2) ** 2).mean(axis=1)
        better = msd < best
        best[better] = msd[better]
        pick[1:][better] = k
    pred = np.zeros(r.shape, np.int64)
    pred[1:] = np.rint(2 * (pick[1:, None] / RHO_STEPS) * prev).astype(np.int64)
    return pred, pick


def parametric_models(codes: np.ndarray, alphabet: int, center2: int, ctx: dict,
                      order: np.ndarray) -> dict:
    """Bytes of the :data:`PARAM_MODELS`: data bits with the codec's integer tables (P = 15,
    its shapes m) + side bytes estimated as the codec does (static rANS of the bytes) + a fixed
    header. m: the per-row fit's for the coordinate descent, then the best of all shapes for
    the fitted widths. ``order``: the row order of the nearest-neighbour chain."""
    rows, cols = codes.shape
    lo, hi = int(codes.min()), int(codes.max())
    z = center2 / 2.0
    m0 = rans._fit_parametric(codes.ravel(), rows, cols, lo, hi, center2, rans._PROB_BITS)[0]
    index = {"row": (np.repeat(np.arange(rows), cols), rows), "col": (np.tile(np.arange(cols), rows), cols),
             "ctx": (ctx["above_left_b"], (ctx["n_buckets"] + 1) ** 2)}
    d2_lo, d2_hi = max(-128, -center2), min(127, 2 * (alphabet - 1) - center2)
    # Width bytes worth tabulating: from the narrowest row/column spread / 64 to 4x the widest.
    d = codes.astype(np.float64) - z
    msd = np.concatenate([(d * d).mean(axis=0), (d * d).mean(axis=1)])
    jbase = max(0, int(np.floor(8 * np.log2(max(msd.min(), 1e-3) / 64))) + rans._WIDTH_OFFSET)
    jtop = min(255, int(np.ceil(8 * np.log2(max(msd.max(), 1e-3) * 4))) + rans._WIDTH_OFFSET)
    tables = _Tables(lo, hi, jbase, jtop)
    cases = {}
    for name, (factor_names, centered, row_order, predicted) in PARAM_MODELS.items():
        c = codes[order] if row_order == "chain" else codes
        sym = (c.ravel() - lo).astype(np.int64)
        if centered == "auto":   # column centers where they paid in rank 1
            centered = cases["row_x_column_centered"]["bytes"] < cases["row_x_column"]["bytes"]
        c2 = np.full((rows, cols), center2, np.int64)
        side = 0.0
        if centered:             # half-code column offsets at the rounded column means
            delta = np.clip(np.rint(2 * (c.mean(axis=0) - z)).astype(np.int64), d2_lo, d2_hi)
            c2 = c2 + delta[None, :]
            side += _side_bits_signed(delta)
        extra = {"centered": bool(centered)}
        if predicted:
            pred, pick = _row_predictions(c - c2 / 2.0)
            c2 = np.clip(c2 + pred, 0, 2 * (alphabet - 1))
            side += rans._side_bits(pick.astype(np.uint8))
            extra["rows_predicted"] = int(np.count_nonzero(pick))
            extra["rows_rho_1"] = int(np.count_nonzero(pick == RHO_STEPS))
        c2 = c2.ravel()
        centers, cidx = np.unique(c2, return_inverse=True)
        cidx = cidx.astype(np.int64)
        factors = {f: index[f] for f in factor_names}
        if "ctx" in factors:
            side += 8.0 * (ctx["n_buckets"] - 1)     # the bucket edges
        bits, shifts, width = fit_additive(sym, c.ravel() - c2 / 2.0, factors, cidx,
                                           tables.get(m0, centers), jbase)
        best_m = m0
        # Every shape for the plain models; after them (many centers: costly tables) only m0 and
        # the shape rank 1 picked.
        shapes = rans._SHAPES if "row_x_column_centered" not in cases else {
            m0, cases["row_x_column"]["m"], cases["row_x_column_centered"]["m"]}
        for m in shapes:
            if m != m0:
                b = _total_cost(width, cidx, sym, tables.get(m, centers), jbase)
                if b < bits:
                    bits, best_m = b, m
        side += sum(_side_bits_signed(s) for s in shifts.values())
        cases[name] = {"bytes": (bits + side) / 8.0 + _HEADER_BYTES, "side_bytes": side / 8.0, "m": best_m,
                       **extra}
        if predicted:            # its center set is its own: drop its tables
            tables.cache = {k: v for k, v in tables.cache.items() if k[1] != centers.tobytes()}
    return cases


def context_analysis(codes: np.ndarray, alphabet: int, center2: int, nb: int = N_BUCKETS) -> tuple:
    """One tensor's conditional entropies (``empirical_*``: tables free, the ideal) and the honest
    costs of coders that reach for them (``kt_*``, ``backoff_*``: adaptive counts; ``param_*``:
    the codec's family with fitted widths and side bytes), in bytes. Also returns the
    (context, symbol) count tables and the order-0 counts, for pooling by kind."""
    rows, cols = codes.shape
    flat = codes.ravel().astype(np.int64)
    counts0 = np.bincount(flat, minlength=alphabet)
    ctx = neighbour_contexts(codes, alphabet, center2, nb)
    order = rans._chain_order(codes.astype(np.int16))  # rANS kind 4's row order (greedy L1 chain)
    perm = codes[order].astype(np.int64)
    above_p = np.full((rows, cols), alphabet, np.int64)
    above_p[1:] = perm[:-1]
    seqs = {"none": (np.zeros_like(flat), flat, 1),
            "above": (ctx["above"], flat, alphabet + 1), "left": (ctx["left"], flat, alphabet + 1),
            "above_b": (ctx["above_b"], flat, nb + 1), "left_b": (ctx["left_b"], flat, nb + 1),
            "above_left_b": (ctx["above_left_b"], flat, (nb + 1) ** 2),
            "above_permuted": (above_p.ravel(), perm.ravel(), alphabet + 1)}
    out = {"order0": _h_counts(counts0) / 8.0}
    joints = {}
    for name, (c, s, k) in seqs.items():
        joint = np.bincount(c * alphabet + s, minlength=k * alphabet)
        joints[name] = joint
        if name != "none":
            out[f"empirical_{name}"] = (_h_counts(joint) - _h_counts(np.bincount(c))) / 8.0
        for model, bits in adaptive_costs(joint, alphabet, counts0, c, s, k).items():
            out[f"{model}_{name}"] = bits / 8.0
    out["permutation_bytes"] = float(log2_factorial(rows) / 8.0)
    for name, r in parametric_models(codes, alphabet, center2, ctx, order).items():
        out[f"param_{name}"] = r["bytes"]
        out.update({f"param_{name}_{k}": v for k, v in r.items() if k != "bytes"})
    return out, joints, counts0

# --- by kind: the peers on the concatenated codes, the context costs summed

PEERS = ("zstd22", "xz9e", "brotli11", "lrzip_z", "zpaq_m5")
# What a codec could keep per tensor (smallest of): the honest model sets, each with side costs.
HONEST = {
    "codec_auto": ("rans_auto",),
    "counts_context": ("rans_auto", "kt_above", "kt_left", "kt_above_left_b", "backoff_above",
                       "backoff_left", "backoff_above_b", "backoff_left_b", "backoff_above_left_b"),
    "rank1": ("rans_auto", "param_row_x_column", "param_row_x_column_centered"),
    "rank1_context": ("rans_auto", "param_row_x_column", "param_row_x_column_centered",
                      "param_row_x_column_x_context"),
    "rank1_row_predicted": ("rans_auto", "param_row_x_column", "param_row_x_column_centered",
                            "param_row_x_column_row_predicted"),
    "permuted_above": ("rans_auto", "param_row_x_column", "param_row_x_column_centered",
                       "backoff_above_permuted+perm", "kt_above_permuted+perm",
                       "param_row_x_column_row_predicted_permuted+perm"),
    "best": ("rans_auto", "kt_above", "kt_left", "kt_above_left_b", "backoff_above", "backoff_left",
             "backoff_above_b", "backoff_left_b", "backoff_above_left_b", "param_row_x_column",
             "param_row_x_column_centered", "param_row_x_column_x_context", "param_row_x_column_row_predicted",
             "backoff_above_permuted+perm", "kt_above_permuted+perm",
             "param_row_x_column_row_predicted_permuted+perm"),
}
CONTEXT_COLS = (  # (key, header) of the printed context table
    ("empirical_above", "H|above"), ("empirical_left", "H|left"), ("empirical_above_left_b", "H|a,l(b)"),
    ("empirical_above_permuted", "H|abv perm"), ("kt_above", "KT above"), ("backoff_above", "bo above"),
    ("backoff_above_left_b", "bo a,l(b)"), ("backoff_above_permuted+perm", "bo perm+P"),
    ("rans_parametric", "row blob"), ("rans_column", "col blob"), ("rans_auto", "auto"),
    ("param_row_x_column", "r x c"), ("param_row_x_column_centered", "r x c +ctr"),
    ("param_row_x_column_x_context", "+ctx"), ("param_row_x_column_row_predicted", "+pred"),
    ("param_row_x_column_row_predicted_permuted+perm", "+pred perm"), ("honest_rank1", "rank1 set"),
    ("honest_permuted_above", "perm set"), ("honest_best", "best"))


def _tensor_context(t: dict, r: dict) -> dict:
    """The per-tensor context record (bytes): the analysis, plus the artifact's and the bench's rANS."""
    ctx, joints, counts0 = context_analysis(t["codes"], t["alphabet"], rans.default_center2(t["alphabet"]))
    nbytes = lambda key: r[key] * r["n"] / 8.0  # noqa: E731  (bits per symbol → bytes)
    ctx.update({"rans_stored": float(t["stored_codes_bytes"]), **{k: nbytes(k) for k in RANS}})
    ctx["rans_auto"] = min(ctx[k] for k in RANS)
    for key in [k for k in ctx if k.endswith("_permuted") and not k.startswith("empirical")]:
        ctx[key + "+perm"] = ctx[key] + ctx["permutation_bytes"]
    for name, keys in HONEST.items():
        ctx[f"honest_{name}"] = min(ctx[k] for k in keys)
        ctx[f"honest_{name}_pick"] = min(keys, key=lambda k: ctx[k])
    # mlp.fc rows can be permuted for free (the hidden units, with mlp.proj's columns)
    free = t["kind"] == "mlp.fc"
    ctx["honest_best_free_fc_perm"] = min(ctx[k.removesuffix("+perm") if free else k] for k in HONEST["best"])
    return ctx, joints, counts0


def kind_analysis(tensors: list[dict], results: dict, peers: bool = True, context: bool = True) -> dict:
    """Per kind and in total: bytes of every coder on the kind's codes (peers on the concatenation,
    rANS and the order-0 entropy summed over the tensors), and the context analysis summed."""
    kinds = [k for k in KINDS if any(t["kind"] == k for t in tensors)]
    by_kind, ctx_kind, pooled, peer_secs, notes = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="entropy_bench_") as tmp:
        for kind in kinds:
            ts = [t for t in tensors if t["kind"] == kind]
            rs = [results[t["case"]] for t in ts]
            row = {"tensors": len(ts), "symbols": int(sum(r["n"] for r in rs)),
                   "order0": sum(r["order0_entropy"] * r["n"] / 8 for r in rs),
                   "rans_stored": sum(t["stored_codes_bytes"] for t in ts),
                   "rans_stored_all_streams": sum(t["stored_bytes"] for t in ts)}
            for key in RANS:
                row[key] = sum(r[key] * r["n"] / 8 for r in rs)
            row["rans_auto"] = sum(min(r[k] for k in RANS) * r["n"] / 8 for r in rs)
            if peers:
                raw = b"".join(np.ascontiguousarray(t["codes"]).tobytes() for t in ts)
                sizes, secs, note = peer_sizes(raw, Path(tmp))
                row.update(sizes)
                peer_secs[kind] = secs
                notes.update(note)
            by_kind[kind] = row
            if context:
                t0 = time.perf_counter()
                sums, pj, pc = {}, {}, None
                for t, r in zip(ts, rs):
                    c, joints, counts0 = _tensor_context(t, r)
                    r["context"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in c.items()}
                    for k, v in c.items():
                        if isinstance(v, float):
                            sums[k] = sums.get(k, 0.0) + v
                    pc = counts0 if pc is None else pc + counts0
                    for k, j in joints.items():
                        pj[k] = j if k not in pj else pj[k] + j
                ctx_kind[kind] = sums
                # One adaptive KT model shared by all the tensors of the kind (counts pooled).
                pooled[kind] = {f"kt_{k}": adaptive_costs(j, ts[0]["alphabet"], pc)["kt"] / 8.0
                                for k, j in pj.items()}
                print(f"  context {kind}: {time.perf_counter() - t0:.1f} s")
    total = {k: sum(v[k] for v in by_kind.values()) for k in by_kind[kinds[0]] if
             all(k in v for v in by_kind.values())}
    out = {"kinds": kinds, "by_kind": by_kind, "total": total}
    if peers:
        out["peer_seconds"] = peer_secs
        out["peer_notes"] = notes
        out["peer_commands"] = {"zstd22": "zstandard level 22", "xz9e": "lzma preset 9|EXTREME (xz format)",
                                "brotli11": "brotli quality 11, lgwin 24",
                                **{k: v[0] for k, v in EXTERNAL.items()}}
    if context:
        ctot = {k: sum(v[k] for v in ctx_kind.values()) for k in ctx_kind[kinds[0]]}
        o0 = ctot["order0"]
        verdict = {name: {"bytes": round(ctot[f"honest_{name}"]),
                          "below_order0": round(1 - ctot[f"honest_{name}"] / o0, 5),
                          "below_codec_auto": round(1 - ctot[f"honest_{name}"] / ctot["rans_auto"], 5)}
                   for name in list(HONEST) + ["best_free_fc_perm"]}
        best = max(verdict, key=lambda n: verdict[n]["below_order0"])
        picks = {}
        for t in tensors:
            p = results[t["case"]].get("context", {}).get("honest_best_pick")
            picks[p] = picks.get(p, 0) + 1
        out["context"] = {
            "n_buckets": N_BUCKETS,
            "models": {"empirical_X": "empirical H(code | X) · n / 8: a table per context, tables free (the ideal)",
                       "kt_X": "adaptive Krichevsky–Trofimov counts per context X, honest (no table stored)",
                       "backoff_X": "adaptive counts per context X started from β · the adaptive order-0 "
                                    "estimate (β best of %s), honest" % list(_BACKOFF_STRENGTHS),
                       "X = above / left": "the code at the same column in the previous row / the previous "
                                           "code in the row (full value; a missing one is its own context)",
                       "X = above_b / left_b / above_left_b": f"{N_BUCKETS} quantile buckets of "
                                                              "|code - zero point| (joint: 13 x 13 contexts)",
                       "X = above_permuted": "rows in a greedy nearest-neighbour chain order (L1 of code rows); "
                                             "'+perm' adds log2(rows!) bits for the permutation (free by "
                                             "symmetry only for mlp.fc rows with mlp.proj columns)",
                       "rans_*": "the codec's actual blobs (rans_stored: what the artifact stores; "
                                 "rans_parametric is H(code | row) at its real cost)",
                       **{f"param_{k}": v for k, v in PARAM_DOC.items()},
                       **{f"honest_{k}": "per tensor the smallest of " + ", ".join(v) for k, v in HONEST.items()},
                       "honest_best_free_fc_perm": "honest_best, the mlp.fc permutation not charged (free by "
                                                   "symmetry: permute mlp.proj's columns the same way)"},
            "by_kind": ctx_kind, "total": ctot, "kt_pooled_by_kind": pooled,
            "verdict": {"order0_bytes": round(o0), **verdict, "best_set": best,
                        "best_below_order0": verdict[best]["below_order0"],
                        "reaches_2pct_below_order0": verdict[best]["below_order0"] >= 0.02,
                        "best_picks": picks},
        }
    return out


def print_kinds(rec: dict) -> None:
    cols = ["order0", "rans_stored", "rans_auto"] + [p for p in PEERS if p in rec["total"]]
    print("\nbytes per kind (codes only, one code per byte for the peers)")
    print(f"{'kind':10s}{'tensors':>8s}{'symbols':>10s}" + "".join(f"{c:>12s}" for c in cols))
    for kind, row in list(rec["by_kind"].items()) + [("total", rec["total"])]:
        print(f"{kind:10s}{row.get('tensors', sum(r['tensors'] for r in rec['by_kind'].values())):8d}"
              f"{row['symbols']:10d}" + "".join(f"{row.get(c, float('nan')):12.0f}" for c in cols))
    if "context" not in rec:
        return
    c = rec["context"]
    print("\ncontext models: % against the order-0 entropy (negative = smaller); last line bytes")
    print(f"{'kind':10s}{'order0':>10s}" + "".join(f"{h:>11s}" for _, h in CONTEXT_COLS))
    for kind, row in list(c["by_kind"].items()) + [("total", c["total"])]:
        print(f"{kind:10s}{row['order0']:10.0f}" + "".join(
            f"{100 * (row[k] / row['order0'] - 1):+11.3f}" for k, _ in CONTEXT_COLS))
    print(f"{'bytes':10s}{c['total']['order0']:10.0f}" + "".join(f"{c['total'][k]:11.0f}" for k, _ in CONTEXT_COLS))
    print("verdict:", json.dumps(c["verdict"]))


COLS = ["order0_entropy", "rans_static", "rans_parametric", "rans_column", "rans_rowref", "rans_rowperm",
        "zstd22", "lzma9e", "brotli11"]
RANS = ("rans_static", "rans_parametric", "rans_column", "rans_rowref", "rans_rowperm")
GENERAL = ("zstd22", "lzma9e", "brotli11")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--checkpoint", type=Path, help=".pt / .safetensors weights, or a .pgolf artifact")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --checkpoint tensors")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "entropy_bench.json")
    ap.add_argument("--no-peers", action="store_true", help="artifact: skip the peer coders per kind")
    ap.add_argument("--no-context", action="store_true", help="artifact: skip the context analysis")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    cases = [] if args.no_synthetic else list(synthetic_cases(args.rows, args.cols))
    tensors = []                   # a .pgolf artifact's tensors: also analysed by kind
    if args.checkpoint and args.checkpoint.suffix == ".pgolf":
        tensors = artifact_tensors(args.checkpoint)
        cases += [(t["case"], t["codes"], t["alphabet"]) for t in tensors]
    elif args.checkpoint:
        cases += list(checkpoint_cases(args.checkpoint))
    hdr = (f"{'tensor':34s}" + "".join(f"{c[:11]:>12s}" for c in COLS)
           + "".join(f"{h:>9s}" for h in ("enc M/s", "col enc", "dec M/s", "col dec")))
    print("bits per symbol (lower is better)\n" + hdr)
    results = []
    for name, codes, alphabet in cases:
        r = measure(codes, alphabet)
        r["case"] = name
        results.append(r)
        print(f"{name:34s}" + "".join(f"{r.get(c, float('nan')):12.4f}" for c in COLS)
              + "".join(f"{r[k]:9.1f}" for k in ("enc_msym_s", "enc_column_msym_s", "dec_msym_s",
                                                  "dec_column_msym_s")))

    ours = lambda r: min(r[c] for c in RANS)  # noqa: E731
    best_general = lambda r: min(r[c] for c in GENERAL if c in r)  # noqa: E731
    best_param = lambda r: min(r["rans_parametric"], r["rans_column"])  # noqa: E731
    big = [r for r in results if r["n"] >= 256 * 1024]
    real = [r for r in results if not r["case"].startswith("gauss")]
    summary = {
        "static_overhead_vs_order0_max": max(r["rans_static"] / r["order0_entropy"] - 1 for r in big)
        if big else None,
        "parametric_below_order0": [r["case"] for r in results if r["rans_parametric"] < r["order0_entropy"]],
        "column_below_order0": [r["case"] for r in results if r["rans_column"] < r["order0_entropy"]],
        # Real weights: which cases the better of the two parametric models (row or column)
        # codes below the order-0 entropy, and by how much (bits per symbol).
        "real_best_parametric_below_order0": {
            r["case"]: {"model": "row" if r["rans_parametric"] <= r["rans_column"] else "column",
                        "gain_bits": round(r["order0_entropy"] - best_param(r), 4)}
            for r in real if best_param(r) < r["order0_entropy"]},
        "real_cases": len(real),
        "rans_beats_all_general_coders": all(ours(r) < best_general(r) for r in results),
        "rans_loses_to_a_general_coder": [r["case"] for r in results if ours(r) >= best_general(r)],
        "min_gain_vs_best_general": min(1 - ours(r) / best_general(r) for r in results),
        "decode_msym_s_min": min(r["dec_msym_s"] for r in results),
        "decode_column_msym_s_min": min(r["dec_column_msym_s"] for r in results),
        "decode_rowref_msym_s_min": min(r["dec_rowref_msym_s"] for r in results),
        "decode_rowperm_msym_s_min": min(r["dec_rowperm_msym_s"] for r in results),
        "encode_msym_s_min": min(r["enc_msym_s"] for r in results),
        "decode_target_msym_s": 100.0,
        "static_target_overhead": 0.01,
    }
    print("\nsummary:", json.dumps(summary, indent=1))
    kinds = None
    if tensors and not (args.no_peers and args.no_context):
        kinds = kind_analysis(tensors, {r["case"]: r for r in results}, peers=not args.no_peers,
                              context=not args.no_context)
        print_kinds(kinds)
    record = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU, {platform.processor() or platform.machine()} (1 thread), {platform.system()}, "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "ceiling": "order-0 empirical entropy of each tensor's codes (static-model limit); "
                   "general coders zstd-22, lzma-9e, brotli-11",
        "summary": summary,
        "results": results,
    }
    if kinds is not None:
        record.update({
            "code_commit": git("rev-parse", "--short", "HEAD"),
            "code_dirty": bool(git("status", "--porcelain", "--", str(Path(__file__).resolve()))),
            "artifact": {"path": str(args.checkpoint), "bytes": args.checkpoint.stat().st_size},
            "tool_versions": tool_versions(),
            "peer_threads": "lrzip and zpaq run with their default threads (all cores); the rest 1 thread",
            "kinds": kinds,
        })
    record["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} ({record['elapsed_s']} s)")


if __name__ == "__main__":
    main()
