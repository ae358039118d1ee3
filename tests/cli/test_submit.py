"""`pgolf submit`: a run becomes a records folder whose train_gpt.py runs without pgolf installed."""
from __future__ import annotations

import dataclasses
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgolf.bundle import ENTRY, build, closure, latin1_literal, minify, module_file
from pgolf.cli import main
from pgolf_train.config import load_config

from ..codec.kernel_aot import AOT_SCRIPT as CODEC_AOT_SCRIPT
from ..train.kernel_aot import AOT_SCRIPT

# Runs a script with every pgolf package import refused unless the script's own loader serves it
# (its finder goes first in sys.meta_path), then checks that each pgolf module loaded came from it.
ISOLATED = '''
import sys, importlib.abc, runpy
PKGS = ("pgolf", "pgolf_codec", "pgolf_train", "pgolf_eval")
BLOCK = set(sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else set()
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PKGS or name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (refused: not from the bundle)", name=name)
        return None
sys.meta_path.insert(0, Refuse())
script = sys.argv[1]
sys.argv = [script]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    bad = [n for n, m in list(sys.modules.items()) if n.split(".")[0] in PKGS
           and not str(getattr(m.__spec__, "origin", "")).startswith("train_gpt.py:")]
    if bad:
        print("NOT FROM THE BUNDLE:", bad, file=sys.stderr)
        sys.exit(3)
'''


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fineweb_docs, wiki_shard, sp1024):
    out = tmp_path_factory.mktemp("submit") / "tiny"
    rc = main(["run", "--config", "tiny", "--docs", str(fineweb_docs), str(wiki_shard), "--val-docs", "20",
               "--tokenizer", str(sp1024), "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def records(tiny_run, tmp_path_factory):
    dest = tmp_path_factory.mktemp("records") / "2026-12-01_tiny"
    assert main(["submit", str(tiny_run), "-o", str(dest), "--name", "tiny test", "--author", "A. Author",
                 "--github", "aauthor"]) == 0
    return dest


def _run_isolated(script: Path, cwd: Path, env: dict[str, str], block: str = "") -> subprocess.CompletedProcess:
    iso = cwd / "isolated.py"
    iso.write_text(ISOLATED)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([sys.executable, "-I", str(iso), script.name, block], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=900)


def test_records_folder_counts_the_script_as_the_challenge_does(records, tiny_run):
    sub = json.loads((records / "submission.json").read_text())
    script = (records / "train_gpt.py").read_bytes()
    report = json.loads((tiny_run / "report.json").read_text())
    assert sub["bytes_code"] == len(script)
    assert sub["bytes_model"] == report["artifact_bytes"] == (tiny_run / "train" / "model.pgolf").stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + sub["bytes_model"]
    assert (sub["name"], sub["author"], sub["github_id"]) == ("tiny test", "A. Author", "aauthor")
    assert sub["val_bpb"] == report["val_bpb"] and sub["val_loss"] > 0 and sub["date"]
    # brotli codes the bundle when it is importable here and wins; the script then needs it too
    brotli = {"brotli"} if b"__import__('brotli')" in script else set()
    assert set((records / "requirements.txt").read_text().split()) == {"numba", "zstandard", "msgpack"} | brotli
    assert "pgolf" not in (records / "requirements.txt").read_text()
    assert {p.name for p in (records / "logs").iterdir()} >= {"report.md", "report.json", "train.log"}
    readme = (records / "README.md").read_text()
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme and f"{sub['bytes_total']:,}" in readme
    ast.parse(script.decode("ascii"))  # plain ASCII Python (base85 payload)


def test_submit_refuses_to_overwrite_and_keeps_what_was_there(records, tiny_run, capsys):
    before = (records / "train_gpt.py").read_bytes()
    assert main(["submit", str(tiny_run), "-o", str(records)]) == 2
    assert "exists" in capsys.readouterr().err and (records / "train_gpt.py").read_bytes() == before
    assert main(["submit", str(tiny_run.parent / "nothing"), "-o", str(records.parent / "x")]) == 2
    assert "report.json" in capsys.readouterr().err and not (records.parent / "x").exists()


def test_generated_script_trains_exports_and_scores_without_pgolf(records, tiny_run, sp1024, tmp_path):
    """The acceptance test: in an empty directory, under `python -I`, with every pgolf import that
    the bundle does not serve refused, train_gpt.py trains, writes model.pgolf, and prints a score
    that pgolf's own evaluator reproduces."""
    from pgolf_eval.evaluate import evaluate_artifact

    work = tmp_path / "work"
    work.mkdir()
    (work / "train_gpt.py").write_bytes((records / "train_gpt.py").read_bytes())
    proc = _run_isolated(work / "train_gpt.py", work, {"DATA_PATH": str(tiny_run / "data"),
                                                       "TOKENIZER_PATH": str(sp1024), "RUN_ID": "iso",
                                                       "ITERATIONS": "12"})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    m = re.search(r"final_pgolf_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    code = int(re.search(r"Code size: (\d+) bytes", proc.stdout).group(1))
    model = int(re.search(r"Serialized model pgolf: (\d+) bytes", proc.stdout).group(1))
    total = int(re.search(r"Total submission size pgolf: (\d+) bytes", proc.stdout).group(1))
    assert code == len((records / "train_gpt.py").read_bytes()) and total == code + model
    artifact = work / "model.pgolf"
    assert artifact.stat().st_size == model
    summary = json.loads((work / "logs" / "iso" / "train_summary.json").read_text())
    assert summary["steps"] == 12  # ITERATIONS overrode the baked config (40)
    cfg = load_config("tiny")
    res = evaluate_artifact(artifact, tiny_run / "data", sp1024, max_tokens=cfg.val_max_tokens, log=None)
    assert abs(res.val_bpb - float(m.group(2))) <= 1e-4


def test_a_missing_package_is_one_clear_line(records, tiny_run, sp1024, tmp_path):
    (tmp_path / "train_gpt.py").write_bytes((records / "train_gpt.py").read_bytes())
    proc = _run_isolated(tmp_path / "train_gpt.py", tmp_path, {"DATA_PATH": str(tiny_run / "data"),
                                                               "TOKENIZER_PATH": str(sp1024)}, block="zstandard")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "zstandard" in proc.stderr and "pip install -r requirements.txt" in proc.stderr


def test_closure_comes_from_the_import_graph_and_the_config():
    names = closure(ENTRY, load_config("h200"))
    assert {"pgolf.submission", "pgolf_train.trainer", "pgolf_eval.ttt", "pgolf_codec.rans",
            "pgolf_train.model", "pgolf_codec.lowrank"} <= set(names)
    # what only `pgolf run`, the CLIs and data preparation use stays out
    assert not {"pgolf.cli", "pgolf.run", "pgolf.report", "pgolf_train.prepare", "pgolf_codec.cli",
                "pgolf_codec.gptq", "pgolf.bundle"} & set(names)
    assert "pgolf_train.distill" not in names and "pgolf_train.distill" in closure(ENTRY, load_config("distill"))
    # the trainer's fused kernels travel only with a config that uses them (h200 does)
    assert "pgolf_train.fused" in names and "pgolf_train.fused" not in closure(ENTRY, load_config("baseline"))
    assert "pgolf_train.triton_env" in names  # theirs and fused_attn's Triton helpers, with them only
    assert "pgolf_train.triton_env" not in closure(ENTRY, load_config("baseline"))
    # the attention kernels only with fused=qk or xsa (h200 sets both)
    plain = closure(ENTRY, dataclasses.replace(load_config("h200"), fused="ce,rope,qkv"))
    assert "pgolf_train.fused_attn" in names and "pgolf_train.fused_attn" not in plain
    assert "pgolf_train.fused" in plain
    # document attention's varlen op only with fused=varlen (and fused_attn with it, which calls it)
    docs = closure(ENTRY, dataclasses.replace(load_config("h200"), doc_attention=True, fused="ce,rope,varlen"))
    assert "pgolf_train.doc_attn" not in names and {"pgolf_train.doc_attn", "pgolf_train.fused_attn"} <= set(docs)
    for name in names:  # parents are in: every package __init__ on the way
        parts = name.split(".")
        assert all(".".join(parts[:i]) in names for i in range(1, len(parts)))


def test_minified_modules_compile_and_keep_dataclass_fields():
    for name in closure(ENTRY, dataclasses.replace(load_config("h200"), fused="ce,rope,qk,xsa")):
        path, _ = module_file(name)
        small = minify(path.read_text(encoding="utf-8"))
        compile(small, name, "exec")
        assert '"""' not in small.split("\n", 1)[0]  # no module docstring
    ns: dict = {}
    exec(minify('from dataclasses import dataclass\n@dataclass\nclass C:\n    """doc"""\n    x: int = 1\n'
                'def f(a: int) -> int:\n    """doc"""\n'), ns)
    assert ns["C"]().x == 1 and ns["f"](3) is None


FUSED_ALL = "ce,rope,qkv,qk,xsa,mlp,fa4,varlen"  # every fusion that brings a module: fused, fused_attn, triton_env, doc_attn, fused_mlp, fa4_attn


def _annotations(tree: ast.Module) -> dict[str, tuple[list[str], list[str], bool, bool]]:
    """Per function, keyed by its dotted path and its position in the walk (``_`` is defined
    several times): the parameters annotated ``constexpr``, those annotated at all, whether it has
    a return annotation, and whether it is decorated."""
    out = {}

    def walk(body, prefix):
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                ann = [a for a in (*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs) if a.annotation is not None]
                key = f"{prefix}{n.name}@{len(out)}"
                out[key] = ([a.arg for a in ann if "constexpr" in ast.unparse(a.annotation)], [a.arg for a in ann],
                            n.returns is not None, bool(n.decorator_list))
                walk(n.body, key + ".")
            elif isinstance(n, ast.ClassDef):
                walk(n.body, f"{prefix}{n.name}.")
    walk(tree.body, "")
    return out


def test_minify_keeps_the_annotations_read_at_run_time():
    """Triton reads a kernel's ``tl.constexpr`` annotations (without them BLOCK is a run-time int
    and ``tl.arange(0, BLOCK)`` does not compile) and ``torch.library.custom_op`` infers the op's
    schema from its function's: the h200 bundle (fused=ce,rope) once failed at import without them."""
    cfg = dataclasses.replace(load_config("h200"), fused=FUSED_ALL, doc_attention=True)
    kept_constexpr = kept_decorated = 0
    for name in closure(ENTRY, cfg):
        path, _ = module_file(name)
        src = path.read_text(encoding="utf-8")
        before, after = _annotations(ast.parse(src)), _annotations(ast.parse(minify(src)))
        assert list(before) == list(after), name
        for key, (cx, ann, ret, decorated) in before.items():
            got = after[key]
            assert got[0] == cx, (name, key)  # every constexpr parameter stays one
            if decorated:
                assert (got[1], got[2]) == (ann, ret), (name, key)
                kept_decorated += bool(ann)
            elif not cx:
                assert got[1] == [] and not got[2], (name, key)  # the rest go
            kept_constexpr += bool(cx)
    assert kept_constexpr >= 5 and kept_decorated >= 3  # the kernels and custom ops were there to keep


# Loads the bundle (bundle.py beside it) as a module, not as __main__, then imports each of its
# modules and runs the trainer's Triton kernels (interpreted: TRITON_INTERPRET=1) against the torch path.
BUNDLE_PROBE = """
import runpy, sys
import torch
runpy.run_path("bundle.py", run_name="bundle")
import importlib
for n in NAMES:
    importlib.import_module(n)
from pgolf_train import fused, fused_attn, triton_env
assert triton_env.interpreter()
torch.manual_seed(0)
logits, t = torch.randn(6, 300), torch.randint(0, 300, (6,))
z = logits.double().requires_grad_()
ref = torch.nn.functional.cross_entropy(30 * torch.tanh(z / 30), t, reduction="none")
ref.sum().backward()
g = logits.clone()
loss = fused.softcap_ce_rows(g, t, 30.0, 1.0)
torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
torch.testing.assert_close(g.double(), z.grad, rtol=1e-4, atol=1e-6)
x = torch.randn(2, 5, 4, 16)
cos, sin = torch.randn(5, 8).cos(), torch.randn(5, 8).sin()
gain = torch.rand(4) + 0.5
torch.testing.assert_close(fused_attn.qk_norm_rope(x, cos, sin, gain),
                           fused_attn._qk_reference(x, cos, sin, gain).transpose(1, 2), rtol=1e-5, atol=1e-5)
y, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
torch.testing.assert_close(fused_attn.xsa(y, v), fused_attn._xsa_reference(y, v), rtol=1e-5, atol=1e-5)
from pgolf_train import doc_attn
idx = torch.randint(2, 50, (2, 6))
idx[0, 3] = 1
cu = doc_attn.segments(idx, 1)
assert cu.tolist() == [0, 3, 6, 12], cu
q, k = torch.randn(12, 4, 8, dtype=torch.float64), torch.randn(12, 2, 8, dtype=torch.float64)
o = doc_attn.varlen_attention(q, k, k, cu, 6, None)
seg = q[:3].transpose(0, 1)[None], k[:3].repeat_interleave(2, 1).transpose(0, 1)[None]
want = torch.nn.functional.scaled_dot_product_attention(seg[0], seg[1], seg[1], is_causal=True)[0].transpose(0, 1)
torch.testing.assert_close(o[:3], want)
from pgolf_train import fa4_attn, fused_mlp
assert fused_mlp.unavailable() is not None and fa4_attn.unavailable() is not None  # no CUDA: the trainer refuses them
qf, kf = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8)
torch.testing.assert_close(fa4_attn.fa4_attention(qf, kf, kf, None), torch.nn.functional.scaled_dot_product_attention(
    qf.transpose(1, 2), kf.transpose(1, 2), kf.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2))
print("PROBE OK", len(NAMES))
"""


def test_bundled_fused_kernels_import_and_run(tmp_path):
    """The h200 bundle with every fusion, loaded by its own finder with every other pgolf import
    refused: each module imports (the custom ops register), the Triton kernels run (interpreted)
    and compile for sm_90."""
    pytest.importorskip("triton")
    cfg = dataclasses.replace(load_config("h200"), fused=FUSED_ALL, doc_attention=True)
    names = closure(ENTRY, cfg)
    assert {"pgolf_train.fused", "pgolf_train.fused_attn", "pgolf_train.triton_env", "pgolf_train.doc_attn",
            "pgolf_train.fused_mlp", "pgolf_train.fa4_attn"} <= set(names)
    (tmp_path / "bundle.py").write_text(build(cfg).text)
    (tmp_path / "probe.py").write_text(f"NAMES = {names!r}\n" + BUNDLE_PROBE)
    proc = _run_isolated(tmp_path / "probe.py", tmp_path, {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PROBE OK" in proc.stdout
    # and compiled for the H200 (sm_90, ahead of time: no GPU here) from the bundle's own sources
    for script in (AOT_SCRIPT, CODEC_AOT_SCRIPT):  # the trainer's kernels, then the codec's
        (tmp_path / "aot.py").write_text('import runpy\nrunpy.run_path("bundle.py", run_name="bundle")\n' + script)
        proc = _run_isolated(tmp_path / "aot.py", tmp_path, {"TRITON_INTERPRET": "0"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "AOT OK" in proc.stdout


@given(st.binary(max_size=600))
def test_latin1_payload_literal_roundtrips(data):
    src = ("# -*- coding: latin-1 -*-\nx = " + latin1_literal(data) + ".encode('latin-1')\n").encode("latin-1")
    ns: dict = {}
    exec(compile(src, "t.py", "exec"), ns)
    assert ns["x"] == data


def test_latin1_bundle_is_smaller_and_states_its_own_length():
    cfg = load_config("tiny")
    b85, raw = build(cfg), build(cfg, encoding="latin1")
    assert raw.bytes < 0.85 * b85.bytes and raw.coder == b85.coder
    for b in (b85, raw):
        assert f",{b.bytes}))" in b.text  # the length it passes to the entry point is its own


@pytest.mark.slow
def test_generated_script_runs_under_torchrun_on_two_processes(records, tiny_run, sp1024, tmp_path):
    """`torchrun --nproc_per_node=2 train_gpt.py` (gloo, CPU): one run directory, one artifact, both
    ranks train and score their shares; the printed score is the artifact's."""
    from pgolf_eval.evaluate import evaluate_artifact

    (tmp_path / "train_gpt.py").write_bytes((records / "train_gpt.py").read_bytes())
    iso = tmp_path / "isolated.py"
    iso.write_text(ISOLATED)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env = {**clean, "DATA_PATH": str(tiny_run / "data"), "TOKENIZER_PATH": str(sp1024), "ITERATIONS": "6",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-I", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(iso), "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.findall(r"final_pgolf_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", proc.stdout)
    assert len(m) == 1  # rank 0 alone prints
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and json.loads((runs[0] / "results.json").read_text())["world_size"] == 2
    res = evaluate_artifact(tmp_path / "model.pgolf", tiny_run / "data", sp1024,
                            max_tokens=load_config("tiny").val_max_tokens, log=None)
    assert abs(res.val_bpb - float(m[0])) <= 1e-4


def test_report_states_the_challenge_count_that_submit_writes(records, tiny_run):
    ch = json.loads((tiny_run / "report.json").read_text())["challenge"]
    sub = json.loads((records / "submission.json").read_text())
    assert (ch["code_bytes"], ch["model_bytes"], ch["total_bytes"]) == (sub["bytes_code"], sub["bytes_model"],
                                                                        sub["bytes_total"])
    assert ch["headroom_bytes"] == 16_000_000 - ch["total_bytes"]
    assert f"challenge count **{ch['total_bytes']:,} bytes**" in (tiny_run / "report.md").read_text()


def test_max_artifact_bytes_can_bound_the_challenge_count(tiny_run, sp1024, tmp_path, capsys):
    report = json.loads((tiny_run / "report.json").read_text())
    between = (report["artifact_bytes"] + report["challenge"]["total_bytes"]) // 2  # the artifact fits, code + it not
    args = ["run", "--config", "tiny", "--data", str(tiny_run / "data"), "--tokenizer", str(sp1024),
            "--set", f"max_artifact_bytes={between}"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "c"), "--set", "max_bytes_count=challenge"]) == 1
    assert "challenge's count" in capsys.readouterr().out


def test_inspect_states_the_challenge_count_when_the_artifact_records_its_config(tiny_run, tmp_path, capsys):
    from pgolf_codec.container import read_artifact, write_artifact

    ch = json.loads((tiny_run / "report.json").read_text())["challenge"]
    artifact = tiny_run / "train" / "model.pgolf"
    assert main(["inspect", str(artifact)]) == 0
    assert f"challenge count: train_gpt.py {ch['code_bytes']:,} + artifact {ch['model_bytes']:,}" in capsys.readouterr().out
    assert main(["inspect", str(artifact), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["challenge"]["total_bytes"] == ch["total_bytes"]
    art = read_artifact(artifact)  # the same tensors without the training config: no count
    bare = tmp_path / "bare.pgolf"
    write_artifact(bare, art.tensors, "*=fp32", metadata={"model_config": art.metadata["model_config"]})
    assert main(["inspect", str(bare)]) == 0
    assert "challenge count: unknown" in capsys.readouterr().out


def test_submit_refuses_a_run_the_script_would_not_reproduce(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "alloc"
    shutil.copytree(tiny_run, run)
    report = json.loads((run / "report.json").read_text())
    report["config"]["quantize_budget"] = 200_000  # scored the allocator's artifact
    (run / "report.json").write_text(json.dumps(report))
    assert main(["submit", str(run), "-o", str(tmp_path / "out")]) == 2
    assert "allocator" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _venv_without_pgolf(root: Path) -> Path:
    """A venv whose only extra path is this interpreter's site-packages as a plain directory: its
    packages import (torch, numpy, sentencepiece, numba, zstandard, msgpack), but the .pth hooks
    there (pgolf's editable install) never run, so no pgolf package can be imported."""
    import site
    import venv

    venv.EnvBuilder(with_pip=False).create(root)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "host_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py


def test_generated_script_runs_in_a_venv_without_pgolf(records, tiny_run, sp1024, tmp_path):
    py = _venv_without_pgolf(tmp_path / "venv")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    probe = subprocess.run([str(py), "-I", "-c", "import torch, numpy, sentencepiece\nimport pgolf_codec"],
                           cwd=tmp_path, env=clean, capture_output=True, text=True)
    assert probe.returncode == 1 and "No module named 'pgolf_codec'" in probe.stderr  # the venv has no pgolf
    work = tmp_path / "work"
    work.mkdir()
    (work / "train_gpt.py").write_bytes((records / "train_gpt.py").read_bytes())
    env = {**clean, "DATA_PATH": str(tiny_run / "data"), "TOKENIZER_PATH": str(sp1024), "RUN_ID": "venv",
           "ITERATIONS": "6"}
    proc = subprocess.run([str(py), "-I", "train_gpt.py"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final_pgolf_roundtrip_exact" in proc.stdout and (work / "model.pgolf").is_file()
