"""Triton kernels compiled ahead of time for the H200 (sm_90) on a machine without a GPU: Triton's
front end, its GPU passes and the ptxas it ships all run on the CPU. This catches what the
interpreter cannot (a kernel that no longer compiles: a block size that is not a ``tl.constexpr``,
a helper Triton cannot inline, a type error in the GPU lowering) before a GPU run does.

``AOT_HELPER`` is source for a fresh interpreter (Triton must be imported compiled, not
interpreted; the bundle's test runs it under ``python -I``, where this package is not importable).
It defines ``compile_sm90(fn, consts, types, **options)``: ``fn`` a kernel (a plain function or
one already jitted), ``consts`` its constexpr values (each must be a constexpr parameter),
``types`` a Triton type per parameter name for those that are not the default (``*bf16`` for a
``*_ptr``, ``i32`` otherwise); it prints ``AOT <kernel> <constants> <bytes of cubin>`` and returns
the cubin's size.
"""
from __future__ import annotations

import os
import subprocess
import sys

AOT_HELPER = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

SM90 = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, consts, types, **options):
    jf = fn if isinstance(fn, JITFunction) else JITFunction(fn)
    missing = sorted(set(consts) - {p.name for p in jf.params if p.is_constexpr})
    assert not missing, f"{fn.__name__}: not constexpr: {missing}"
    sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "*bf16" if p.name.endswith("_ptr") else "i32")
           for p in jf.params}
    src = ASTSource(jf, sig, constexprs={(jf.arg_names.index(n),): v for n, v in consts.items()})
    k = triton.compile(src, target=SM90, options=options or None)
    print("AOT", fn.__name__, consts, len(k.asm["cubin"]))
    return len(k.asm["cubin"])
'''


def parse(stdout: str) -> tuple[int, list[int]]:
    """(the count the script's ``AOT OK n`` line states, the cubin sizes of its compiles)."""
    lines = [line.split() for line in stdout.splitlines() if line.startswith("AOT ")]
    assert lines and lines[-1][:2] == ["AOT", "OK"], stdout[-2000:]
    return int(lines[-1][2]), [int(line[-1]) for line in lines[:-1]]


def compile_all(script: str) -> list[int]:
    """Run an ``AOT_HELPER`` script in a fresh interpreter (Triton compiled, not interpreted): the
    cubin sizes of its compiles, after checking it compiled as many as it said it would."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, cubins = parse(proc.stdout)
    assert n == len(cubins), proc.stdout[-2000:]
    return cubins
