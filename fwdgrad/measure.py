"""Measuring what a piece of code costs: peak memory allocated by torch. Bottom layer (torch only), used by
the trainer, the benchmarks and the memory-model tests."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

#: c10's log levels (TORCH_CPP_LOG_LEVEL): INFO 0, WARNING 1, ERROR 2, FATAL 3
CPP_LOG_ERROR = 2


def measure_peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Measured peak bytes allocated by torch while running ``fn()`` above the level before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: ``torch.profiler``
    with ``profile_memory=True`` records every allocation (+bytes) and free (-bytes) of torch's CPU
    allocator, kernels' internal workspaces included; the result is the maximum of the running sum of
    those deltas in time order. Memory not allocated through torch (Python objects, numpy) is not seen, and
    neither is the release of a tensor that existed before ``fn`` started (the profiler does not know its
    size; torch's allocator logs a C++ warning about it, which ``quiet_cpp_warnings`` silences here).
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
    with quiet_cpp_warnings(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


@cache
def _c10_log_level() -> ctypes.c_int | None:
    """c10's minimum log level, the int behind TORCH_CPP_LOG_LEVEL (`FLAGS_caffe2_log_level` in libc10,
    read by every C++ LOG(...) call); None where this torch build does not export it."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libc10.so", "libc10.dylib", "c10.dll"):
        if (lib_dir / name).exists():
            try:
                return ctypes.c_int.in_dll(ctypes.CDLL(str(lib_dir / name)), "FLAGS_caffe2_log_level")
            except (OSError, ValueError):
                return None
    return None


@contextmanager
def quiet_cpp_warnings() -> Iterator[None]:
    """Within the block, torch's C++ code logs errors only: the CPU allocator's "Memory block of unknown size
    was allocated before the profiling started" (printed by every memory profile whose code frees a tensor
    made before it, e.g. a training step dropping the previous batch) does not reach stderr. Python
    warnings are not affected; neither is a level above WARNING that the user set (TORCH_CPP_LOG_LEVEL)."""
    level = _c10_log_level()
    if level is None:
        yield
        return
    saved = level.value
    level.value = max(saved, CPP_LOG_ERROR)
    try:
        yield
    finally:
        level.value = saved
