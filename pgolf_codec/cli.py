"""`pgolf pack | unpack | inspect | verify`: the artifact from the command line."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .argtypes import positive_int
from .coders import CODERS
from .container import BUDGET_BYTES, read_artifact, read_header, write_artifact
from .errors import Limits
from .safetensors_io import read_safetensors, write_safetensors
from .schemes import Recipe, dequantize, quantize

DEFAULT_RECIPE = "*=int8"


def load_checkpoint(path: str | Path, limits: Limits = Limits()) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> float tensor, metadata) from a `.safetensors` file or a `.pt` state dict.

    `.pt` files are read with `torch.load(weights_only=True)` (no code runs); a dict holding
    a `"model"` state dict (a training checkpoint) is accepted, and its `"model_config"`
    becomes metadata.  Safetensors `__metadata__` values that are JSON are decoded (the
    trainer stores `model_config` there).
    """
    path = Path(path)
    meta: dict = {}
    if path.suffix == ".safetensors":
        tensors, raw_meta = read_safetensors(path, limits)
        for k, v in raw_meta.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, ValueError):
            raise
        except Exception as e:  # unpickling errors of a hostile or foreign file
            raise ValueError(f"{path}: not a weights-only torch checkpoint: {type(e).__name__}: {e}") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            if isinstance(obj.get("model_config"), dict):
                meta["model_config"] = obj["model_config"]
            obj = obj["model"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: expected a state dict (name -> tensor)")
        tensors = obj
    bad = [k for k, v in tensors.items() if not torch.is_floating_point(v)]
    if bad:
        raise ValueError(f"{path}: non-float tensors cannot be packed: {', '.join(bad[:5])}")
    return dict(tensors), meta


def _limits(args: argparse.Namespace) -> Limits:
    n = getattr(args, "max_elements", None)
    return Limits() if n is None else Limits.for_elements(n)


def _recipe(arg: str | None) -> Recipe:
    if arg is None:
        return Recipe.parse(DEFAULT_RECIPE)
    p = Path(arg)
    if p.suffix.lower() in (".toml", ".json"):
        if not p.is_file():
            raise FileNotFoundError(f"--recipe {arg}: no such file")
        return Recipe.load(p)
    return Recipe.coerce(arg)


def _read_code(arg: str) -> tuple[str, str]:
    """(file name, UTF-8 text) of a --code file; errors name the file."""
    p = Path(arg)
    try:
        return p.name, p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--code {arg}: not UTF-8 text ({e.reason} at byte {e.start}); the code section "
                         "stores source text") from None


def _model_config(arg: str) -> dict:
    """The model config map in a JSON file: the map itself, or an object holding it under
    `model_config` (as the artifact's metadata does)."""
    p = Path(arg)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {arg}: not a JSON file: {e}") from None
    if isinstance(d, dict) and isinstance(d.get("model_config"), dict):
        d = d["model_config"]
    if not isinstance(d, dict):
        raise ValueError(f"--config {arg}: expected a JSON object (the model config map)")
    return d


def _pack(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:  # before the (slow) quantization
        raise FileExistsError(f"-o {out} exists (pass --force to replace it)")
    recipe = _recipe(args.recipe)
    limits = _limits(args)
    code = {}
    for c in args.code or []:
        name, text = _read_code(c)
        if name in code:
            raise ValueError(f"two code files named {name!r}")
        code[name] = text
    tensors, meta = load_checkpoint(args.checkpoint, limits)
    if args.config:
        meta["model_config"] = _model_config(args.config)
    if len(code) == 1:
        meta.setdefault("model_code", next(iter(code)))
    info = write_artifact(out, tensors, recipe, metadata=meta, code=code, coder=args.coder,
                          max_bytes=args.max_bytes, overwrite=args.force, limits=limits)
    print(f"wrote {args.output}: {info.total_bytes:,} bytes (model {info.model_bytes:,}, code {info.code_bytes:,}), "
          f"{8 * info.total_bytes / max(info.params, 1):.3f} bits/param, headroom {info.headroom_bytes:,}")
    if not isinstance(meta.get("model_config"), dict):
        print("note: no model config in the checkpoint; `pgolf eval` needs one (pass --config FILE.json)",
              file=sys.stderr)
    return 0


def _unpack(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise FileExistsError(f"-o {out} exists (pass --force to replace it)")
    art = read_artifact(args.artifact, _limits(args))
    meta = {k: json.dumps(v, sort_keys=True) for k, v in art.metadata.items()}
    write_safetensors(args.output, art.tensors, meta, overwrite=args.force)
    print(f"wrote {args.output}: {len(art.tensors)} tensors, {art.info.params:,} parameters (float32)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    h = read_header(args.artifact, _limits(args))  # headers and CRCs only: no payload is decoded
    d = h.info.to_dict()
    d["metadata_keys"] = sorted(h.metadata)
    d["code_files"] = sorted(h.code_files)
    d["over_limits"] = h.over_limits
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"{args.artifact}: format {d['format_version']}, {d['total_bytes']:,} bytes "
          f"(header {d['header_bytes']:,}, tensors {d['model_bytes'] - d['header_bytes']:,}, code {d['code_bytes']:,}); "
          f"{d['params']:,} params, {d['bits_per_param']:.3f} bits/param; "
          f"headroom {d['headroom_bytes']:,} under {BUDGET_BYTES:,}")
    w = max([len(t["name"]) for t in d["tensors"]] + [4])
    print(f"{'name':<{w}}  {'shape':<14} {'scheme':<28} {'coder':<11} {'bytes':>10} {'bits/param':>10}")
    for t in d["tensors"]:
        coder = t["coder"] + (f"/{t['rans_model']}" if "rans_model" in t else "")  # e.g. rans/column
        print(f"{t['name']:<{w}}  {'x'.join(map(str, t['shape'])) or '()':<14} {t['scheme']:<28} {coder:<11} "
              f"{t['bytes']:>10,} {t['bits_per_param']:>10.3f}")
    if d["code_files"]:
        print("code files:", ", ".join(d["code_files"]))
    if h.over_limits:
        print(f"note: decoding it would be refused: {h.over_limits}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    art = read_artifact(args.artifact, _limits(args))  # checks magic, version, limits, every CRC; decodes all
    ok = True
    for name, t in art.tensors.items():
        if not bool(torch.isfinite(t).all()):
            print(f"FAIL {name}: non-finite values after decoding")
            ok = False
    print(f"checksums ok, {len(art.tensors)} tensors decoded ({art.info.total_bytes:,} bytes)")
    if args.against:
        src, _ = load_checkpoint(args.against, _limits(args))
        missing, extra = sorted(set(src) - set(art.tensors)), sorted(set(art.tensors) - set(src))
        if missing or extra:
            print(f"FAIL names differ: missing {missing[:5]}, unexpected {extra[:5]}")
            ok = False
        print(f"{'name':<40} {'rmse':>10} {'max err':>10} {'rel rmse':>9}  requantizes")
        for name in sorted(set(src) & set(art.tensors)):
            w, q = src[name].float(), art.quantized[name]
            if tuple(w.shape) != q.shape:
                print(f"FAIL {name}: shape {tuple(w.shape)} vs {q.shape}")
                ok = False
                continue
            d = art.tensors[name] - w
            rmse = float(d.pow(2).mean().sqrt()) if d.numel() else 0.0
            ref = float(w.pow(2).mean().sqrt()) if w.numel() else 0.0
            same = torch.equal(dequantize(quantize(w, q.spec)), art.tensors[name])
            print(f"{name:<40} {rmse:>10.3g} {float(d.abs().max()) if d.numel() else 0.0:>10.3g} "
                  f"{rmse / ref if ref else 0.0:>9.4f}  {'yes' if same else 'no (e.g. GPTQ)'}")
            ok &= math.isfinite(rmse)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _add_max_elements(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.add_argument("--max-elements", type=int, metavar="N",
                   help=f"accept up to N elements per tensor and in all (default {d.max_tensor_elements:,} per "
                        f"tensor, {d.max_total_elements:,} in all)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add pack, unpack, inspect and verify to the `pgolf` command."""
    p = subparsers.add_parser("pack", help="quantize + code a checkpoint into an artifact")
    p.add_argument("checkpoint", help=".pt state dict (weights_only) or .safetensors")
    p.add_argument("-o", "--output", required=True, help="artifact path to write")
    p.add_argument("--recipe", help=f"rules 'PATTERN=SCHEME;...', one scheme, or a .toml/.json file (default {DEFAULT_RECIPE!r})")
    p.add_argument("--code", nargs="*", metavar="PATH", help="source files stored in the code section")
    p.add_argument("--config", metavar="JSON", help="model config map stored as metadata model_config (`pgolf eval` "
                   "needs it; checkpoints written by `pgolf train` carry it)")
    p.add_argument("--max-bytes", type=positive_int, help="fail (writing nothing) if the artifact would exceed this")
    p.add_argument("--coder", default="auto", choices=["auto"] + [c.name for c in sorted(CODERS.values(), key=lambda c: c.id)],
                   help="entropy coder forced on the int/ternary code streams (other streams: auto)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    _add_max_elements(p)
    p.set_defaults(func=_pack)
    p = subparsers.add_parser("unpack", help="decode an artifact to float32 .safetensors")
    p.add_argument("artifact")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    _add_max_elements(p)
    p.set_defaults(func=_unpack)
    p = subparsers.add_parser("inspect", help="bytes by section and tensor, bits/param, headroom (headers only)")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")
    _add_max_elements(p)
    p.set_defaults(func=_inspect)
    p = subparsers.add_parser("verify", help="checksums, full decode, error vs the source checkpoint")
    p.add_argument("artifact")
    p.add_argument("--against", metavar="CHECKPOINT")
    _add_max_elements(p)
    p.set_defaults(func=_verify)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `pgolf` command")
