"""Fixtures shared by the training tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .train_fixtures import make_tiny_shards


@pytest.fixture
def one_thread():
    """Tiny models run faster (and steadier on a busy 2-core machine) without intra-op threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, fineweb_docs, sp1024) -> Path:
    """Tiny train/val shards of real FineWeb text (sp1024), shared by the trainer tests."""
    return make_tiny_shards(tmp_path_factory.mktemp("tiny_shards"), fineweb_docs, sp1024)
