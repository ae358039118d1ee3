"""One self-contained ``train_gpt.py`` for a config: the pgolf modules it runs, minified and
compressed behind a bootstrap that imports them from the file itself.

The modules are the import closure of :data:`ENTRY` over the pgolf packages, read from the source
with ``ast`` (imports inside functions included), less the modules :data:`OPTIONAL` says the config
does not use. Each is minified through ``ast`` (docstrings and comments dropped, annotations of
functions and variables dropped; those read at run time stay: class bodies' (dataclass fields), a
decorated function's (``torch.library.custom_op`` schemas) and a Triton kernel's) except
:data:`VERBATIM` (the model file, whose source the artifact embeds: kept as it is, so the artifact's
code section is the same as ``pgolf run``'s). The table of sources and the run's resolved config
go through the smallest of lzma / zlib (and brotli when importable here and at run time) and
base85 into a bootstrap of a few lines; the challenge counts ``len(train_gpt.py)``.
"""
from __future__ import annotations

import ast
import base64
import json
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PACKAGES = ("pgolf", "pgolf_codec", "pgolf_train", "pgolf_eval")
ROOT = Path(__file__).resolve().parent.parent
ENTRY = "pgolf.submission"
VERBATIM = frozenset({"pgolf_train.model"})


def _fusions(cfg: Any) -> set[str]:
    """The names in a config's comma-separated ``fused``."""
    return {f.strip() for f in cfg.fused.split(",")} - {""}


# Modules a config can do without, and the condition under which it needs them.
OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "pgolf_train.distill": lambda cfg: cfg.distill_teacher_frac > 0,
    "pgolf_train.fused": lambda cfg: bool(cfg.fused.strip() or cfg.sdpa_backend),
    "pgolf_train.fused_attn": lambda cfg: bool({"qk", "xsa", "varlen", "fa4"} & _fusions(cfg)),
    "pgolf_train.fa4_attn": lambda cfg: "fa4" in _fusions(cfg),
    "pgolf_train.doc_attn": lambda cfg: "varlen" in _fusions(cfg),
    "pgolf_train.fused_mlp": lambda cfg: "mlp" in _fusions(cfg),
}


@dataclass(frozen=True)
class ModuleEntry:
    name: str
    is_package: bool
    source_bytes: int  # the file as it is
    minified_bytes: int  # what the bundle holds
    compressed_bytes: int | None  # that alone through lzma, with build(measure=True) (the bundle compresses all together)


@dataclass(frozen=True)
class Bundle:
    text: str  # train_gpt.py
    modules: tuple[ModuleEntry, ...]
    coder: str
    payload_bytes: int  # the compressed table before its encoding
    encoding: str = "base85"

    @property
    def data(self) -> bytes:
        """The file's bytes (ASCII for base85; latin-1 is the declared encoding of the other)."""
        return self.text.encode("ascii" if self.encoding == "base85" else "latin-1")

    @property
    def bytes(self) -> int:
        return len(self.data)


def module_file(name: str) -> tuple[Path, bool] | None:
    """``(path, is_package)`` of a pgolf module, or None when ``name`` is no module of the packages."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    return None


def imports_of(name: str) -> set[str]:
    """The pgolf modules ``name`` imports anywhere in its source (functions included)."""
    path, is_pkg = module_file(name)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if module_file(m) is not None}


def closure(entry: str = ENTRY, cfg: Any = None) -> list[str]:
    """The modules ``entry`` needs, parents first (sorted); without those of :data:`OPTIONAL` that
    ``cfg`` does not need."""
    skip = {m for m, needed in OPTIONAL.items() if cfg is not None and not needed(cfg)}
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imports_of(name))
    return sorted(seen)


def _reads_annotations(node: ast.FunctionDef | ast.AsyncFunctionDef, args: list[ast.arg]) -> bool:
    """Whether something reads this function's annotations at run time, so the minifier keeps them:
    a Triton kernel (a ``tl.constexpr`` parameter is a compile-time constant only by its annotation)
    and a decorated function (``torch.library.custom_op`` infers the op's schema from them)."""
    return bool(node.decorator_list) or any(
        a.annotation is not None and "constexpr" in ast.unparse(a.annotation) for a in args)


class _Minify(ast.NodeTransformer):
    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        return body or [ast.Pass()]

    def visit_Module(self, node: ast.Module) -> ast.Module:
        self.generic_visit(node)
        node.body = self._body(node.body)
        return node

    def _function(self, node):
        self.generic_visit(node)
        node.body = self._body(node.body)
        args = [a for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg,
                            node.args.kwarg) if a is not None]
        if not _reads_annotations(node, args):
            node.returns = None
            for a in args:
                a.annotation = None
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        # class-body annotations define dataclass fields: visit methods only, keep AnnAssign as is
        node.body = [self.visit(s) if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else s
                     for s in node.body]
        node.body = self._body(node.body)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign):  # outside class bodies: a plain assignment, or nothing
        if node.value is None:
            return None
        return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)


def minify(source: str) -> str:
    """``source`` without docstrings, comments and function/variable annotations; still valid Python
    (``ast.unparse``). A module that defines ``__doc__``-driven behaviour would change: none here does."""
    tree = _Minify().visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def _coders() -> dict[str, tuple[Callable[[bytes], bytes], str]]:
    """name -> (compress, the bootstrap's decompress expression over the bytes ``b``)."""
    out = {"lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), "__import__('lzma').decompress(b)"),
           "zlib": (lambda b: zlib.compress(b, 9), "__import__('zlib').decompress(b)")}
    try:
        import brotli  # only when it is here; the bundle then needs it at run time too (requirements.txt)

        out["brotli"] = (lambda b: brotli.compress(b, quality=11), "__import__('brotli').decompress(b)")
    except ImportError:
        pass
    return out


ENCODINGS = ("base85", "latin1")
# base85: ASCII, 5 characters per 4 bytes. latin1: one byte per byte (the file declares latin-1, so
# the payload is a str literal whose latin-1 encoding is the compressed bytes; only the backslash,
# the quote, NUL, CR and LF are escaped), ~20% smaller; some tools take such a file for binary.
BOOTSTRAP = '''{coding}# train_gpt.py, generated by `pgolf submit` (pgolf {version}) from one config: do not edit.
# {n} pgolf modules and the resolved config, {coder} + {encoding}; `torchrun --standalone train_gpt.py`.
import sys,json,importlib.abc as A,importlib.util as U
b={payload}
T=json.loads({decompress})
class F(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  if n in T['m']:
   x=U.spec_from_loader(n,s,origin='train_gpt.py:'+n,is_package=T['m'][n][0]);x.has_location=False;return x
 def create_module(s,x):return None
 def exec_module(s,m):
  n=m.__name__;m.__file__='train_gpt.py/'+n.replace('.','/')+('/__init__.py' if T['m'][n][0] else '.py')
  exec(compile(T['m'][n][1],m.__spec__.origin,'exec'),m.__dict__)
 def get_source(s,n):return T['m'][n][1]
sys.meta_path.insert(0,F())
if __name__=='__main__':sys.exit(__import__('pgolf.submission').submission.main(T['c'],{code_bytes}))
'''


def latin1_literal(data: bytes) -> str:
    """A Python string literal (in a latin-1 source file) whose ``.encode('latin-1')`` is ``data``."""
    esc = {0: "\\x00", 10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}
    return '"' + "".join(esc.get(c, chr(c)) for c in data) + '"'


def build(cfg: Any, *, coder: str | None = None, encoding: str = "base85", measure: bool = False) -> Bundle:
    """The bundle for ``cfg`` (a TrainConfig; baked in resolved); ``coder`` forces one of
    lzma/zlib/brotli; ``encoding`` is one of :data:`ENCODINGS`; ``measure`` also compresses each
    module alone for the per-module table (`pgolf submit`, the benchmark)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"bundle encoding must be one of {ENCODINGS}, got {encoding!r}")
    from pgolf import __version__

    names = closure(ENTRY, cfg)
    sources, entries = {}, []
    for name in names:
        path, is_pkg = module_file(name)
        raw = path.read_text(encoding="utf-8")
        text = raw if name in VERBATIM else minify(raw)
        sources[name] = [is_pkg, text]
        alone = len(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME)) if measure else None
        entries.append(ModuleEntry(name, is_pkg, len(raw.encode()), len(text.encode()), alone))
    table = json.dumps({"m": sources, "c": cfg.to_dict()}, separators=(",", ":"), sort_keys=True).encode()
    coders = _coders()
    if coder is not None and coder not in coders:
        raise ValueError(f"bundle coder {coder!r} is not available here; have {sorted(coders)}")
    packed = {k: coders[k][0](table) for k in ([coder] if coder else coders)}
    best = min(packed, key=lambda k: len(packed[k]))
    if encoding == "base85":
        payload, coding = f"__import__('base64').b85decode({base64.b85encode(packed[best]).decode('ascii')!r})", ""
    else:
        payload, coding = latin1_literal(packed[best]) + ".encode('latin-1')", "# -*- coding: latin-1 -*-\n"
    text, code_bytes = "", 0
    for _ in range(3):  # the file states its own length: iterate until it is stable
        text = BOOTSTRAP.format(coding=coding, version=__version__, n=len(names), coder=best,
                                encoding=encoding, payload=payload, decompress=coders[best][1], code_bytes=code_bytes)
        if len(text.encode("latin-1")) == code_bytes:
            break
        code_bytes = len(text.encode("latin-1"))
    return Bundle(text, tuple(entries), best, len(packed[best]), encoding)
