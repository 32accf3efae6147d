"""Measuring what a piece of code costs: peak memory allocated by torch. Bottom layer (torch only), used by
the trainer, the benchmarks and the memory-model tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def measure_peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Measured peak bytes allocated by torch while running ``fn()`` above the level before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: ``torch.profiler``
    with ``profile_memory=True`` records every allocation (+bytes) and free (-bytes) of torch's CPU
    allocator, kernels' internal workspaces included; the result is the maximum of the running sum of
    those deltas in time order. Memory not allocated through torch (Python objects, numpy) is not seen;
    tensors that already exist when ``fn`` starts count only if ``fn`` frees them (as negative deltas).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    # kineto logs profiler_start/stop and a "gpuGetDeviceCount failed" ERROR line on CPU-only machines at
    # its default level; 6 silences them (a KINETO_LOG_LEVEL the user set wins). Read at profiler start.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag.name == "Allocation":
            allocs.append((event.start_time_ns, event.extra_fields.alloc_size))
    peak = live = 0
    for _, delta in sorted(allocs):
        live += delta
        peak = max(peak, live)
    return peak
