"""A run's provenance and logs: code hash, versions, git commit, device name, and the log that
rank 0 writes (train.log lines, train.jsonl records)."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from pgolf_train.source import module_source


PACKAGE_ROOT = Path(__file__).resolve().parent


REPO_ROOT = PACKAGE_ROOT.parent


def code_hash() -> str:
    """sha256 over the sources of the pgolf packages (path + bytes of every .py, sorted); where they
    are no files (a generated train_gpt.py), over the loaded pgolf modules' sources (name + text)."""
    h = hashlib.sha256()
    roots = [REPO_ROOT / pkg for pkg in ("pgolf_train", "pgolf_codec", "pgolf_eval", "pgolf")]
    if not any(r.is_dir() for r in roots):
        for name in sorted(m for m in sys.modules if m.split(".")[0] in ("pgolf_train", "pgolf_codec", "pgolf_eval", "pgolf")):
            h.update(name.encode() + b"\0" + module_source(name).encode())
        return h.hexdigest()
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(REPO_ROOT)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("pgolf", "sentencepiece", "zstandard", "msgpack", "triton"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - an absent optional package is just not reported
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when there are local changes), if any."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class RunLog:
    """Rank-0 logging: human lines to stdout and ``train.log``, records to ``train.jsonl``."""

    def __init__(self, out_dir: Path | None, master: bool, echo: bool = True) -> None:
        self.master = master
        self.echo = echo
        self.text = out_dir / "train.log" if out_dir and master else None
        self.jsonl = out_dir / "train.jsonl" if out_dir and master else None

    def __call__(self, msg: str) -> None:
        if not self.master:
            return
        if self.echo:
            print(msg, flush=True)
        if self.text is not None:
            with open(self.text, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    def record(self, **fields: Any) -> None:
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(fields) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint (the run repeats those steps)."""
        if self.jsonl is None or not self.jsonl.exists():
            return
        keep = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("step", 0) <= step or rec.get("event") == "resume":
                keep.append(line)
        _atomic_write_text(self.jsonl, "".join(k + "\n" for k in keep))


def _atomic_write_text(path: Path, text: str) -> None:
    from pgolf_codec.atomic import atomic_write

    atomic_write(path, text.encode("utf-8"), overwrite=True)
