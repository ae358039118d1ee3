"""`pgolf pack | unpack | inspect | verify` end to end through the real entry point."""
from __future__ import annotations

import json

import pytest
import torch

from pgolf.cli import main
from pgolf_codec import read_artifact
from pgolf_codec.container import FORMAT_VERSION
from pgolf_codec.safetensors_io import read_safetensors, write_safetensors


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    sd = {"tok_emb.weight": torch.randn(64, 32) * 0.02, "blocks.0.fc.weight": torch.randn(48, 32) * 0.02,
          "blocks.0.norm.weight": torch.ones(32)}
    torch.save(sd, tmp_path / "ck.pt")
    (tmp_path / "model.py").write_text("import torch\n")
    return tmp_path, sd


def test_pack_inspect_verify_unpack(ckpt, capsys):
    d, sd = ckpt
    art = d / "m.pgolf"
    rc = main(["pack", str(d / "ck.pt"), "-o", str(art), "--recipe", "tok_emb*=int8;*norm*=fp16;*=int6:sdclip=12.5",
               "--code", str(d / "model.py"), "--max-bytes", "16000000"])
    assert rc == 0 and art.exists()
    a = read_artifact(art)
    assert a.code == {"model.py": "import torch\n"} and a.metadata["model_code"] == "model.py"
    capsys.readouterr()
    assert main(["inspect", str(art), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_bytes"] == art.stat().st_size and info["format_version"] == FORMAT_VERSION
    assert {t["name"] for t in info["tensors"]} == set(sd)
    assert main(["inspect", str(art)]) == 0 and "headroom" in capsys.readouterr().out
    assert main(["verify", str(art), "--against", str(d / "ck.pt")]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert main(["unpack", str(art), "-o", str(d / "out.safetensors")]) == 0
    out, meta = read_safetensors(d / "out.safetensors")
    assert all(torch.equal(out[k], a.tensors[k]) for k in sd)
    assert json.loads(meta["model_code"]) == "model.py"
    # the unpacked file is itself a valid source for packing
    assert main(["pack", str(d / "out.safetensors"), "-o", str(d / "m2.pgolf"), "--coder", "zstd"]) == 0


def test_refusals_are_one_line_errors(ckpt, capsys):
    d, _ = ckpt
    art = d / "m.pgolf"
    assert main(["pack", str(d / "ck.pt"), "-o", str(art)]) == 0
    capsys.readouterr()
    assert main(["pack", str(d / "ck.pt"), "-o", str(art)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["pack", str(d / "ck.pt"), "-o", str(d / "small.pgolf"), "--max-bytes", "500"]) == 2
    err = capsys.readouterr().err
    assert "ArtifactTooLarge" in err and err.count("\n") == 1 and not (d / "small.pgolf").exists()
    assert main(["pack", str(d / "ck.pt"), "-o", str(art), "--force", "--recipe", "*=int4"]) == 0
    assert "--config" in capsys.readouterr().err  # a plain state dict carries no model config: say so
    bad = d / "bad.pgolf"
    bad.write_bytes(art.read_bytes()[:-10])
    assert main(["verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgolf verify: error: ") and ("ChecksumMismatch" in err or "Truncated" in err)
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["pack", str(d / "junk.pt"), "-o", str(d / "j.pgolf")]) == 2


def test_verify_fails_when_source_differs(ckpt, capsys):
    d, sd = ckpt
    art = d / "m.pgolf"
    assert main(["pack", str(d / "ck.pt"), "-o", str(art)]) == 0
    sd2 = dict(sd, extra=torch.zeros(3))
    write_safetensors(d / "other.safetensors", sd2)
    assert main(["verify", str(art), "--against", str(d / "other.safetensors")]) == 1
    assert "FAIL names differ" in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_pack_checks_its_arguments_before_quantizing(ckpt, capsys, monkeypatch):
    d, _ = ckpt
    art = d / "m.pgolf"
    art.write_bytes(b"keep me")
    import pgolf_codec.cli as cli

    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("read the checkpoint first"))
    assert main(["pack", str(d / "ck.pt"), "-o", str(art)]) == 2
    err = _one_line_error(capsys)
    assert f"-o {art} exists (pass --force" in err and "overwrite=True" not in err
    assert art.read_bytes() == b"keep me"
    assert main(["pack", str(d / "ck.pt"), "-o", str(d / "n.pgolf"), "--recipe", "nosuch.toml"]) == 2
    err = _one_line_error(capsys)
    assert "nosuch.toml" in err and "no such file" in err and "PATTERN=SCHEME" not in err
    (d / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    assert main(["pack", str(d / "ck.pt"), "-o", str(d / "n.pgolf"), "--code", str(d / "latin1.py")]) == 2
    err = _one_line_error(capsys)
    assert str(d / "latin1.py") in err and "UTF-8" in err
    assert not (d / "n.pgolf").exists()


def test_pack_refuses_values_out_of_range(tmp_path, capsys):
    w = torch.zeros(4, 4)
    w[0, 1] = 3e38
    torch.save({"w": w}, tmp_path / "ck.pt")
    assert main(["pack", str(tmp_path / "ck.pt"), "-o", str(tmp_path / "m.pgolf")]) == 2
    err = _one_line_error(capsys)
    assert "'w'" in err and "3e+38" in err and "scale=q8" in err
    assert not (tmp_path / "m.pgolf").exists()
    assert main(["pack", str(tmp_path / "ck.pt"), "-o", str(tmp_path / "m.pgolf"), "--recipe", "*=fp16"]) == 2
    assert "overflows fp16" in _one_line_error(capsys)
