"""Shared test set-up: one intra-op thread in every test process (the suite runs in parallel with pytest-xdist, and
subprocess runs inherit OMP_NUM_THREADS=1), so runs do not oversubscribe a small CPU and numerics are the same in
every process and fixture, whatever its scope."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # child processes (CLI runs, torchrun) inherit it


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
