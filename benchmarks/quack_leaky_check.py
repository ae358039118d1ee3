"""``fused=mlp``'s LeakyReLU² in the CuTe DSL, checked on a CPU: no GPU and no torch needed.

    python3.12 benchmarks/quack_leaky_check.py --site DIR [--out FILE]

DIR holds the unpacked wheels of ``fa4_probe.sh`` (quack-kernels, nvidia-cutlass-dsl and its libs;
cp312) plus typing_extensions, numpy and cuda-bindings. Two checks, each of the real libraries:

1. quack's kernel-cache fingerprint (``quack.gemm_runtime.identity.function_semantic_key``) of an
   activation epilogue, relu² and the registered leaky_relu_sq, with the packages where DIR is: it
   fails unless DIR's path has a ``site-packages`` folder (the failure of the 2026-12-04 probe).
2. The activation's forward and backward as the DSL compiles them (``cute.jit``, run on the host),
   scalar and packed pairs, on a grid of values against float64 math: f = max(x, x/2)², the
   backward's (dout·f'(x), f(x)) with f' = 2·max(x, x/4).

torch is stubbed (``_register`` imports torch.nn.functional for quack's torch fallback table only),
and quack's package ``__init__`` (which imports torch) is skipped.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
XS = [-1e3, -7.25, -3.0, -1.0, -0.5, -1e-3, -0.0, 0.0, 1e-3, 0.5, 1.0, 3.0, 7.25, 1e3]
DOUT = 1.5


def _import_quack(site: str):
    sys.path[:0] = [site, site + "/nvidia_cutlass_dsl/dsl_packages"]
    for name, sub in (("quack", "quack"), ("quack.gemm_runtime", "quack/gemm_runtime")):
        m = types.ModuleType(name)
        m.__path__ = [f"{site}/{sub}"]
        sys.modules[name] = m
    from quack import activation

    return activation


def _register(activation) -> None:
    """pgolf_train.fused_mlp._register, run with torch and quack.gemm_interface stubbed."""
    t = types.ModuleType("torch")
    t.nn = types.ModuleType("torch.nn")
    t.nn.functional = types.ModuleType("torch.nn.functional")
    gi = types.ModuleType("quack.gemm_interface")
    gi.act_to_pytorch_fn_map = {}
    sys.modules.update({"torch": t, "torch.nn": t.nn, "torch.nn.functional": t.nn.functional,
                        "quack.gemm_interface": gi})
    sys.modules["quack"].gemm_interface = gi
    path = ROOT / "pgolf_train" / "fused_mlp.py"
    fn = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "_register")
    ns: dict = {"__name__": "pgolf_train.fused_mlp"}
    exec(compile(ast.Module([fn], []), str(path), "exec"), ns)
    ns["_register"]()


def worker(site: str) -> int:
    """Run in the child: print one JSON line per check."""
    activation = _import_quack(site)
    from quack.gemm_runtime.identity import function_semantic_key

    def act_mod(fn):  # quack's make_act_mod: an epilogue closing over the activation
        def mod(acc):
            return {"D": acc, "postact": fn(acc)}
        return mod

    keys = {}
    _register(activation)
    for name in ("relu_sq", "leaky_relu_sq"):
        for table in ("act_fn_map", "dact_fn_map"):
            try:
                function_semantic_key(act_mod(getattr(activation, table)[name]))
                keys[f"{name}/{table}"] = "ok"
            except TypeError as e:
                keys[f"{name}/{table}"] = f"TypeError: {str(e)[:160]}"
    print(json.dumps({"fingerprint": keys}), flush=True)

    import cutlass.cute as cute
    from cutlass import Float32

    globals()["Float32"] = Float32  # cute.jit evaluates the (string) annotations in this module's globals
    f, df = activation.act_fn_map["leaky_relu_sq"], activation.dact_fn_map["leaky_relu_sq"]

    @cute.jit
    def probe(x: Float32, d: Float32):
        y = f(x)
        g, y2 = df(x, d)
        p = f((x, d))
        pg, py = df((x, x), (d, d))
        cute.printf("ROW %.9e %.9e %.9e %.9e %.9e %.9e %.9e\n", y, g, y2, p[0], p[1], pg[1], py[1])

    for x in XS:
        probe(Float32(x), Float32(DOUT))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", required=True, help="the unpacked wheels (see the docstring)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quack_leaky_cpu.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.site)
    proc = subprocess.run([sys.executable, __file__, "--worker", "--site", args.site],
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    fp = next((json.loads(s)["fingerprint"] for s in lines if s.startswith("{")), None)
    rows = [list(map(float, s.split()[1:])) for s in lines if s.startswith("ROW ")]
    worst = 0.0
    table = []
    for x, (y, g, y2, p0, p1, pg, py) in zip(XS, rows):
        want_f, want_g = max(x, x / 2) ** 2, DOUT * 2 * max(x, x / 4)
        want_p1 = max(DOUT, DOUT / 2) ** 2
        errs = [abs(a - b) / max(abs(b), 1e-30) for a, b in
                ((y, want_f), (y2, want_f), (p0, want_f), (py, want_f), (g, want_g), (pg, want_g), (p1, want_p1))]
        worst = max(worst, max(errs))
        table.append({"x": x, "f": y, "dout_fprime": g, "f_want": want_f, "dout_fprime_want": want_g,
                      "max_rel_err": max(errs)})
    ok = (proc.returncode == 0 and len(rows) == len(XS) and worst < 2e-7  # fp32 rounding of the inputs
          and fp is not None and all(v == "ok" for v in fp.values()))
    result = {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
              "python": sys.version.split()[0], "site": args.site, "returncode": proc.returncode,
              "fingerprint": fp, "values": table, "max_rel_err_vs_float64": worst,
              "ok": ok, "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: result[k] for k in ("fingerprint", "max_rel_err_vs_float64", "ok")}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
