"""Shared test fixtures: where `../shared/data` is, and hypothesis profiles (derandomized in CI)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# One Triton mode for the whole session, fixed before any test module imports Triton: Triton's own
# library functions are interpreted or compiled from that import on, so a module that set the
# variable itself made the mode depend on collection order (a subset ran compiled, the full run
# interpreted). Without a GPU the kernels run on CPU tensors through the interpreter; with one,
# compiled on CUDA tensors (tests/train/test_fused_gpu.py). An explicit TRITON_INTERPRET wins.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PGOLF_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: real FineWeb/Wikipedia text and the sp1024 tokenizer (read-only)."""
    if not (DATA / "tokenizers" / "fineweb_1024_bpe.model").exists():
        pytest.fail(f"shared data not found at {DATA}; set PGOLF_SHARED")
    return DATA


@pytest.fixture(scope="session")
def sp1024(shared_data: Path) -> Path:
    return shared_data / "tokenizers" / "fineweb_1024_bpe.model"


@pytest.fixture(scope="session")
def fineweb_docs(shared_data: Path) -> Path:
    return shared_data / "fineweb" / "parameter_golf_verify_docs_200.jsonl"


@pytest.fixture(scope="session")
def wiki_shard(shared_data: Path) -> Path:
    return shared_data / "wikipedia" / "enwiki20190720_pages_000.jsonl.xz"
