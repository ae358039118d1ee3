"""``pgolf quantize``: a trained checkpoint → the artifact with the lowest distortion that fits
the byte budget (model + code), by GPTQ candidates and the rate–distortion allocator.

Pipeline: load weights and config → calibration Hessians (training shards or self-generated)
→ for every matrix with a Hessian, candidates over bits × k·σ clips × {GPTQ, round-to-nearest}
(optionally + a low-rank correction), each with its exact coded size and Hessian-weighted error
(optionally rescaled by a measured per-tensor loss sensitivity) → allocation within the budget
left after code, header and the small float tensors → artifact → val bpb of the artifact and of
the unquantized model. The artifact is only moved into place when the bpb loss is within
``--tolerance`` (or ``--allow-degradation``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pgolf_codec.allocate import AllocationResult, Candidate, allocate
from pgolf_codec.coders import thread_pool
from pgolf_codec.container import (build_artifact, encoded_size, read_artifact, read_artifact_bytes,
                                   write_bytes_atomic)
from pgolf_codec.gptq import (LOWRANK_A, LOWRANK_B, apply_lowrank, gptq_quantize_many, hessian_error,
                              lowrank_correction)
from pgolf_codec.schemes import Quantized, QuantSpec, dequantize, quantize
from pgolf_train.model import GPT, GPTConfig
from pgolf_train.scoring import Scorer
from pgolf_train.source import model_source

__all__ = ["QuantizeOptions", "build_candidates", "quantize_model", "load_checkpoint_weights", "add_parser"]

HEADER_SLACK = 512  # bytes kept back for header-size changes between the estimate and the build


def _log(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


@dataclass
class QuantizeOptions:
    """Candidate grid and allocation knobs. ``clips``: k of the k·σ clip; ``gptq``: "on", "off"
    or "both"; ``group``: 0 = per-row scales; ``other``: spec of tensors without a Hessian
    (norm gains, mixes, untied embeddings); ``lowrank``: rank of the optional correction, tried
    on the ``lowrank_tensors`` highest-error matrices; ``sensitivity``: "hessian" (raw error)
    or "measured" (error × Δloss/error of one probe per tensor on a calibration batch)."""

    bits: tuple[int, ...] = (4, 5, 6, 7, 8)
    clips: tuple[float, ...] = (8.0, 10.0, 12.0, 14.0, 16.0)
    gptq: str = "both"
    group: int = 0
    other: str = "fp16"
    lowrank: int = 0
    lowrank_tensors: int = 3
    lowrank_spec: str = "int8"
    sensitivity: str = "measured"
    block_size: int = 128
    damp: float = 0.01
    coder: str = "auto"


def load_checkpoint_weights(path: str | os.PathLike, model_config: str | None = None
                            ) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """State dict (float32, CPU) and ``GPTConfig`` of a ``.safetensors`` or ``.pt`` checkpoint, or of
    a ``.pgolf`` artifact (its decoded weights: re-quantizing them stacks a second rounding).

    The config comes from ``model_config`` (a JSON file or inline JSON; GPTConfig fields, extra
    TrainConfig fields ignored), else the checkpoint's own ``config`` (trainer ``checkpoint.pt``),
    else ``train_summary.json`` / ``config.json`` next to it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    cfg_dict: dict | None = None
    if path.suffix == ".safetensors":
        from pgolf_codec.safetensors_io import read_safetensors

        state, _ = read_safetensors(path)
    elif path.suffix == ".pgolf":  # an artifact: its decoded (already once quantized) weights and config
        art = read_artifact(path)
        state = apply_lowrank(art.tensors)
        cfg_dict = art.metadata.get("model_config")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a trainer checkpoint.pt
            cfg_dict = state.get("config")
            state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if model_config:
        text = Path(model_config).read_text() if Path(model_config).is_file() else model_config
        try:
            cfg_dict = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-config is neither a JSON file nor JSON: {e}") from None
    if cfg_dict is None:
        for name in ("train_summary.json", "config.json"):
            side = path.with_name(name)
            if side.is_file():
                data = json.loads(side.read_text())
                cfg_dict = data.get("model_config") or data.get("config") or data
                break
    if not isinstance(cfg_dict, dict):
        raise ValueError(f"no model config for {path}: pass --model-config or keep train_summary.json next to it")
    cfg_dict = cfg_dict.get("model_config", cfg_dict)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    cfg = GPTConfig.from_dict({k: v for k, v in cfg_dict.items() if k in fields})
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, cfg


def _spec(bits: int, clip: float, group: int) -> QuantSpec:
    return QuantSpec(kind="int", bits=bits, group=group, clip="sdclip", clip_param=float(clip))


@torch.no_grad()
def _probe_loss(model: GPT, batch: torch.Tensor) -> float:
    return float(model(batch[:, :-1], batch[:, 1:]))


@torch.no_grad()
def build_candidates(model: GPT, hessians: dict[str, torch.Tensor], opts: QuantizeOptions,
                     probe: torch.Tensor | None = None) -> dict[str, list[Candidate]]:
    """Candidates for every weight with a Hessian: name → list of ``Candidate`` whose payload is
    ``{"q": Quantized, "lowrank": (Quantized, Quantized) | None}``; ``nbytes`` is the exact
    coded payload (codes + scales (+ factors)); ``distortion`` the Hessian-weighted error,
    times the tensor's measured sensitivity when ``opts.sensitivity == "measured"`` (needs
    ``probe``: a long ``[B, T+1]`` calibration batch)."""
    state = model.state_dict()
    out: dict[str, list[Candidate]] = {}
    modes = {"on": [True], "off": [False], "both": [True, False]}[opts.gptq]
    t0 = time.perf_counter()
    specs = list(dict.fromkeys(_spec(bits, clip, opts.group) for bits in opts.bits for clip in opts.clips))
    # A candidate's coded size is CPU work (the coders; one thread each), while GPTQ and the
    # Hessian errors are torch work (GPU, or every CPU thread): the sizes are coded in the
    # codec's thread pool, every candidate of every tensor as a task, while the next tensors'
    # candidates are made. Each size is the same exact number as coded inline.
    pool = thread_pool()
    pending: dict[str, list[tuple[Future, float, str, dict]]] = {}
    for i, (name, H) in enumerate(sorted(hessians.items())):
        w = state[name].float()
        # All GPTQ candidates of a tensor in one call: one inverse-Hessian factorisation and
        # one stacked column sweep instead of one of each per spec (same results).
        solved = {}
        if True in modes:
            solved = dict(zip(specs, gptq_quantize_many(w, H, specs, block_size=opts.block_size, damp=opts.damp)))
        cands = []
        for spec in specs:
            for use_gptq in modes:
                q = solved[spec] if use_gptq else quantize(w, spec)
                err = hessian_error(w, dequantize(q).to(w.device), H)
                size = pool.submit(encoded_size, q, coder=opts.coder, parallel=False)
                cands.append((size, err, f"{spec}{'' if use_gptq else ' rtn'}", {"q": q, "lowrank": None}))
        pending[name] = cands
        _log(f"candidates {i + 1}/{len(hessians)} {name}: {len(cands)} ({time.perf_counter() - t0:.0f}s)")
    out.update(_sizes_done(pending))
    _log(f"candidate sizes coded ({time.perf_counter() - t0:.0f}s)")
    if opts.lowrank > 0:
        _add_lowrank(state, hessians, out, opts)
    if opts.sensitivity == "measured":
        if probe is None:
            raise ValueError("measured sensitivity needs a probe batch")
        _scale_by_sensitivity(model, probe, out)
    return out


def _sizes_done(pending: dict[str, list[tuple[Future, float, str, dict]]]) -> dict[str, list[Candidate]]:
    """The candidates of :func:`build_candidates` once their coded sizes are in."""
    return {name: [Candidate(size.result(), err, label, payload) for size, err, label, payload in cands]
            for name, cands in pending.items()}


def _add_lowrank(state: dict, hessians: dict, cands: dict[str, list[Candidate]], opts: QuantizeOptions) -> None:
    """Low-rank variants of the GPTQ candidates of the ``lowrank_tensors`` highest-error matrices."""
    fspec = QuantSpec.parse(opts.lowrank_spec)
    worst = sorted(cands, key=lambda n: -float(sorted(c.distortion for c in cands[n])[len(cands[n]) // 2]))
    for name in worst[:opts.lowrank_tensors]:
        w, H = state[name].float(), hessians[name]
        if opts.lowrank > min(w.shape):
            continue
        extra = []
        for c in cands[name]:
            if c.label.endswith(" rtn"):
                continue
            w_hat = dequantize(c.payload["q"]).to(w.device)
            qa, qb = lowrank_correction(w, w_hat, opts.lowrank, fspec, H=H)
            fixed = w_hat + dequantize(qa).to(w.device) @ dequantize(qb).to(w.device)
            nbytes = c.nbytes + encoded_size(qa, coder=opts.coder) + encoded_size(qb, coder=opts.coder)
            extra.append(Candidate(nbytes, hessian_error(w, fixed, H), f"{c.label}+lr{opts.lowrank}",
                                   {"q": c.payload["q"], "lowrank": (qa, qb)}))
        cands[name].extend(extra)
        _log(f"low-rank r={opts.lowrank} candidates for {name}")


def _candidate_weight(c: Candidate) -> torch.Tensor:
    w = dequantize(c.payload["q"])
    if c.payload["lowrank"] is not None:
        qa, qb = c.payload["lowrank"]
        w = w + dequantize(qa) @ dequantize(qb)
    return w


@torch.no_grad()
def _scale_by_sensitivity(model: GPT, probe: torch.Tensor, cands: dict[str, list[Candidate]]) -> None:
    """Rescale each tensor's distortions to nats: Hessian errors of different layers are not
    comparable (norms, residual gains and the softcap sit between them and the loss), so each
    tensor gets one measured Δloss/error ratio.

    The probe is antithetic: with δ = ŵ − w of the tensor's median-distortion candidate, it
    measures ``(L(w+δ) + L(w−δ))/2 − L(w)``, the curvature term ½δᵀFδ that the Hessian error
    models. A one-sided probe also carries the batch gradient's g·δ, which on one small batch
    is as large as the curvature and of random sign, and probing only the worst candidate
    extrapolated a far-from-operating-point ratio to every candidate (both misranked tensors).
    """
    params = dict(model.named_parameters())
    base = _probe_loss(model, probe)
    for name, cs in cands.items():
        ref = sorted(cs, key=lambda c: c.distortion)[len(cs) // 2]
        p = params[name]
        orig = p.data.clone()
        delta_w = _candidate_weight(ref).to(p.device, p.dtype).reshape(p.shape) - orig
        losses = []
        for sign in (1.0, -1.0):
            p.data.copy_(orig + sign * delta_w)
            losses.append(_probe_loss(model, probe))
        p.data.copy_(orig)
        delta = (losses[0] + losses[1]) / 2 - base
        # A tiny positive floor: a probe that happens to lower the loss still means "insensitive",
        # never "free" (negative distortion would make the allocator prefer worse candidates).
        sens = max(delta, 1e-6 * abs(base)) / max(ref.distortion, 1e-30)
        cands[name] = [dataclasses.replace(c, distortion=c.distortion * sens) for c in cs]
        _log(f"sensitivity {name}: Δloss {delta:+.5f} nats at ±{ref.label}")


def _tensors_for(state: dict[str, torch.Tensor], cands: dict[str, list[Candidate]], choice: dict[str, int],
                 other: QuantSpec) -> dict[str, torch.Tensor | Quantized]:
    tensors: dict[str, torch.Tensor | Quantized] = {}
    for name, w in state.items():
        if name in cands:
            c = cands[name][choice[name]]
            tensors[name] = c.payload["q"]
            if c.payload["lowrank"] is not None:
                tensors[name + LOWRANK_A], tensors[name + LOWRANK_B] = c.payload["lowrank"]
        else:
            tensors[name] = quantize(w, other)
    return tensors


def quantize_model(state: dict[str, torch.Tensor], cfg: GPTConfig, hessians: dict[str, torch.Tensor],
                   budget: int, opts: QuantizeOptions, *, metadata: dict, probe: torch.Tensor | None = None,
                   device: str | torch.device = "cpu", candidates: dict[str, list[Candidate]] | None = None
                   ) -> tuple[bytes, Any, AllocationResult, dict[str, str]]:
    """Allocate and build the artifact bytes within ``budget`` (total file bytes, code included).

    ``candidates``: the output of :func:`build_candidates` for these weights and ``opts``, to
    allocate several budgets without rebuilding them (built here when None). Returns ``(artifact bytes, ArtifactInfo, allocation, {tensor: chosen label})``; raises
    ``ValueError`` when even the smallest candidates cannot fit.
    """
    model = GPT(cfg).to(device)
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    hessians = {k: v.to(device) for k, v in hessians.items() if k in state and state[k].dim() == 2}
    cands = candidates if candidates is not None else build_candidates(
        model, hessians, opts, probe=None if probe is None else probe.to(device))
    names = sorted(cands)
    code = {"model.py": model_source()}
    other = QuantSpec.parse(opts.other)
    # Everything but the allocated payloads: header, code section, float tensors. Measured with
    # the smallest candidates in place; the header changes by a few bytes with the choice.
    smallest = {n: min(range(len(cands[n])), key=lambda i: cands[n][i].nbytes) for n in names}
    _, info0 = build_artifact(_tensors_for(state, cands, smallest, other), "fp32", metadata=metadata,
                              code=code, coder=opts.coder)
    overhead = info0.total_bytes - sum(cands[n][smallest[n]].nbytes for n in names)
    slack = HEADER_SLACK
    for _ in range(6):
        alloc = allocate([cands[n] for n in names], budget - overhead - slack)
        choice = dict(zip(names, alloc.choice))
        data, info = build_artifact(_tensors_for(state, cands, choice, other), "fp32", metadata=metadata,
                                    code=code, coder=opts.coder)
        if len(data) <= budget:
            labels = {n: cands[n][choice[n]].label for n in names}
            return data, info, alloc, labels
        slack += len(data) - budget + 64
    raise ValueError(f"could not fit the artifact within {budget:,} bytes")


def model_from_artifact_bytes(data: bytes, cfg: GPTConfig, device: str | torch.device = "cpu") -> GPT:
    """The model an artifact's bytes decode to (low-rank corrections folded in), in eval mode."""
    model = GPT(cfg)
    model.load_state_dict(apply_lowrank(read_artifact_bytes(data).tensors))
    return model.to(device).eval()


@dataclass
class QuantizeResult:
    """What :func:`quantize_checkpoint` made: the artifact bytes and how they score."""

    data: bytes
    info: Any                  # ArtifactInfo of ``data``
    alloc: AllocationResult
    labels: dict[str, str]     # tensor -> chosen candidate
    bpb_before: float          # the checkpoint's own val bpb
    bpb_after: float           # the artifact's val bpb (same tokens)
    tokens: int

    @property
    def delta(self) -> float:
        return self.bpb_after - self.bpb_before


def quantize_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, tokenizer: str | os.PathLike,
                        budget: int, opts: QuantizeOptions = QuantizeOptions(), *, model_config: str | None = None,
                        calib: str = "shards", calib_tokens: int = 262_144, calib_seconds: float | None = None,
                        calib_seq_len: int | None = None, calib_batch: int = 16, val_tokens: int | None = None,
                        device: str | None = None, bpb_before: float | None = None,
                        scorer: Scorer) -> QuantizeResult:
    """GPTQ + bit allocation of a checkpoint within ``budget`` total bytes, scored before and after.

    Hessians come from ``calib_tokens`` of ``calib`` ("shards": ``data_dir``'s train shards,
    "self": sampled from the model); both scores use ``data_dir``'s val stream (a prefix of
    ``val_tokens`` if given). ``bpb_before``: the checkpoint's score on that stream when the caller
    already has it (the trainer's pre-quantization score of the same weights), so it is not scored
    twice. ``scorer`` (:class:`pgolf_eval.scorer.Scorer`, from the caller) loads the stream and
    scores. Nothing is written: the caller decides whether to keep the bytes.
    """
    from pgolf_train.calibrate import calibrate, shard_batches
    from pgolf_train.tokenizer import tokenizer_info

    from pgolf_train.device import check_device

    check_options(budget, opts)
    device = check_device(device, "--device") if device else ("cuda" if torch.cuda.is_available() else "cpu")
    state, cfg = load_checkpoint_weights(checkpoint, model_config)
    floor = fixed_bytes(state, opts)
    if budget < floor:
        raise ValueError(f"--budget {budget:,}: below the {floor:,} bytes that the code and the tensors kept as "
                         f"{opts.other} take before any matrix is stored")
    model = GPT(cfg).to(device)
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    cal = calibrate(model, source=calib, data_dir=data_dir, tokens=calib_tokens, seconds=calib_seconds,
                    seq_len=calib_seq_len, batch_size=calib_batch)
    probe = None
    if opts.sensitivity == "measured":
        probe = next(shard_batches(data_dir, seq_len=min(cfg.seq_len, 1024) + 1, batch_size=8,
                                   vocab_size=cfg.vocab_size))
    metadata = {"model_config": cfg.to_dict(), "model_code": "model.py", "tokenizer": tokenizer_info(tokenizer),
                "quantize": {"checkpoint": str(checkpoint), "calib": cal.source, "calib_tokens": cal.tokens,
                             "budget": budget, "lowrank": opts.lowrank}}
    data, info, alloc, labels = quantize_model(state, cfg, cal.hessians, budget, opts, metadata=metadata,
                                               probe=probe, device=device)
    tokens, tables = scorer.load_val(Path(data_dir), Path(tokenizer), cfg.vocab_size, val_tokens)
    if bpb_before is None:
        bpb_before = scorer.score(model.eval(), tokens, tables, seq_len=cfg.seq_len, device=device).val_bpb
    del model  # the decoded artifact's model takes its place
    post = scorer.score(model_from_artifact_bytes(data, cfg, device), tokens, tables, seq_len=cfg.seq_len,
                        device=device)
    return QuantizeResult(data, info, alloc, labels, bpb_before, post.val_bpb, post.tokens)


def check_options(budget: int, opts: QuantizeOptions) -> None:
    """The budget and candidate grid, checked before any calibration (ValueError naming the flag)."""
    from pgolf_codec.coders import coder_by_name

    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"--budget {budget!r}: must be a byte count >= 1")
    if not opts.bits or not opts.clips:
        raise ValueError("--bits and --clips need at least one value each")
    for b in opts.bits:
        for c in opts.clips:
            try:
                _spec(b, c, opts.group)
            except ValueError as e:
                raise ValueError(f"--bits {b} --clips {c:g} --group {opts.group}: {e}") from None
    if opts.coder != "auto":
        try:
            coder_by_name(opts.coder)
        except ValueError as e:
            raise ValueError(f"--coder: {e}") from None
    if opts.lowrank < 0:
        raise ValueError(f"--lowrank {opts.lowrank}: must be >= 0 (0 = off)")


def fixed_bytes(state: dict[str, torch.Tensor], opts: QuantizeOptions) -> int:
    """A lower bound of every artifact of ``state``: the code section and the tensors that get no
    candidates (all but the matrices) as ``opts.other``, with no matrix at all. Seconds at most."""
    other = QuantSpec.parse(opts.other)
    small = {k: quantize(v, other) for k, v in state.items() if v.dim() != 2}
    if not small:
        return 0
    _, info = build_artifact(small, "fp32", code={"model.py": model_source()},
                             coder=opts.coder)
    return info.total_bytes


def _run(args: argparse.Namespace, scorer: Scorer) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists (pass --force to replace it)")
    opts = QuantizeOptions(bits=args.bits, clips=args.clips, gptq=args.gptq,
                           group=args.group, lowrank=args.lowrank, sensitivity=args.sensitivity, coder=args.coder)
    res = quantize_checkpoint(args.checkpoint, args.data, args.tokenizer, args.budget, opts,
                              model_config=args.model_config, calib=args.calib, calib_tokens=args.calib_tokens,
                              calib_seconds=args.calib_seconds, calib_seq_len=args.calib_seq_len,
                              calib_batch=args.calib_batch, val_tokens=args.val_tokens, device=args.device,
                              scorer=scorer)
    print(f"{'tensor':40s} {'choice':32s}")
    for name, label in res.labels.items():
        print(f"{name:40s} {label:32s}")
    print(f"total {res.info.total_bytes:,} bytes (model {res.info.model_bytes:,} + code {res.info.code_bytes:,}) "
          f"budget {args.budget:,}; allocation exact={res.alloc.exact}")
    print("frontier (payload bytes -> distortion):")
    step = max(1, len(res.alloc.frontier) // 12)
    for b, d in res.alloc.frontier[::step] + res.alloc.frontier[-1:]:
        print(f"  {b:>12,}  {d:.6g}")
    print(f"val_bpb unquantized {res.bpb_before:.5f}  artifact {res.bpb_after:.5f}  (+{res.delta:.5f}) "
          f"on {res.tokens:,} tokens")
    if res.delta > args.tolerance and not args.allow_degradation:
        print(f"pgolf quantize: refusing: quantization costs {res.delta:.5f} bpb, more than --tolerance "
              f"{args.tolerance}; no artifact written (raise the budget, or pass --allow-degradation)",
              file=sys.stderr)
        return 3
    write_bytes_atomic(out, res.data, overwrite=args.force)
    print(f"wrote {out}")
    return 0


def add_parser(subparsers, scorer: Callable[[], Scorer]) -> argparse.ArgumentParser:
    """Register ``pgolf quantize`` (``scorer()`` makes the evaluator it scores with)."""
    from pgolf_codec.argtypes import (float_list, int_list, int_range, nonneg_float, nonneg_int, positive_float,
                                      positive_int)

    p = subparsers.add_parser("quantize", help="GPTQ + bit allocation: a checkpoint -> the best artifact within a byte budget",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help=".safetensors or .pt state dict (or a trainer checkpoint.pt)")
    p.add_argument("--budget", type=positive_int, default=16_000_000, help="total artifact bytes, model + code")
    p.add_argument("--data", required=True, help="directory with fineweb_train_*/fineweb_val_* shards")
    p.add_argument("--tokenizer", required=True, help="the SentencePiece .model")
    p.add_argument("--model-config", help="GPTConfig as a JSON file or inline JSON (default: next to the checkpoint)")
    p.add_argument("--calib", choices=("shards", "self"), default="shards", help="calibration text source")
    p.add_argument("--calib-tokens", type=positive_int, default=262_144, help="calibration tokens")
    p.add_argument("--calib-seconds", type=positive_float, help="wall-clock limit for calibration")
    p.add_argument("--calib-seq-len", type=positive_int, help="calibration sequence length (default: the model's)")
    p.add_argument("--calib-batch", type=positive_int, default=16, help="calibration sequences per batch")
    p.add_argument("--bits", type=int_list(1, 8), default="4,5,6,7,8", help="candidate bit widths")
    p.add_argument("--clips", type=float_list(0.0, lo_open=True), default="8,10,12,14,16",
                   help="candidate k of the k·std clip")
    p.add_argument("--gptq", choices=("on", "off", "both"), default="both", help="GPTQ candidates, RTN ones, or both")
    p.add_argument("--group", type=nonneg_int, default=0, help="elements per scale group (0 = per row)")
    p.add_argument("--lowrank", type=nonneg_int, default=0, help="rank of a low-rank error correction (0 = off)")
    p.add_argument("--sensitivity", choices=("hessian", "measured"), default="measured",
                   help="distortion = Hessian error, or Hessian error x measured loss sensitivity")
    p.add_argument("--coder", default="auto", help="codes coder (auto, rans, zstd, ...)")
    p.add_argument("--tolerance", type=nonneg_float, default=0.02, help="largest accepted bpb increase")
    p.add_argument("--allow-degradation", action="store_true", help="write the artifact even above --tolerance")
    p.add_argument("--val-tokens", type=int_range(2), help="evaluate on a prefix of the val stream (quick checks)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-o", "--output", required=True, help="artifact path")
    p.set_defaults(func=lambda args: _run(args, scorer()))
    return p
