"""Shared test settings: one intra-op thread. The models under test are tiny, and on a 2-core machine a
second OpenMP thread only adds synchronization (and contention with the pytest process itself)."""

import pytest
import torch
from threadpoolctl import threadpool_limits

torch.set_num_threads(1)


@pytest.fixture
def one_blas_thread():
    """numpy's OpenBLAS and torch's OpenMP pools oversubscribe small machines when both run in one process
    (the edge runtime's tests): one thread each. Use: pytestmark = pytest.mark.usefixtures(...)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)
