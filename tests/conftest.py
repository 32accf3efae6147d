"""Shared test settings: one intra-op thread. The models under test are tiny, and on a 2-core machine a
second OpenMP thread only adds synchronization (and contention with the pytest process itself)."""

import torch

torch.set_num_threads(1)
