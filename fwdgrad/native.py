"""Build and load fwdgrad's small C libraries (the engine's fused epilogues, the CPU Philox sampler).

Each library is one C file next to the module that uses it, compiled with the system C compiler (``$CC``,
else ``cc``/``gcc``) at first use into ``$FWDGRAD_CACHE_DIR`` (default ``~/.cache/fwdgrad``), under a name
hashed from the source, the flags, the compiler and the CPU: built once per machine (about a second), then
loaded with ctypes. Without a compiler, when a build fails, or with ``FWDGRAD_KERNELS=0``, `load` returns
None and callers take their torch/numpy path, which computes the same integers (tests run both paths).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from .files import temp_path

ENV = "FWDGRAD_KERNELS"  # "0", "off", "false" or "no": never use the C libraries
CACHE_ENV = "FWDGRAD_CACHE_DIR"
# no FP contraction (a fused multiply-add would round float32 arithmetic differently from torch); no
# trapping math so floor/rint and the clamps vectorize (the kernels only see finite values)
FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off", "-fno-trapping-math"]
OPTIONAL_FLAGS = [["-march=native", "-fopenmp"], ["-march=native"], []]  # the first set that builds wins

_loaded: dict[Path, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """False when ``FWDGRAD_KERNELS`` turns the C libraries off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cpu_id() -> str:
    """What compiled code depends on: the machine and, on Linux, the CPU's model and ISA flags."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return text


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@cache
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout


def _compile(cc: str, source: Path, flags: list[str], cache_dir: Path) -> Path | str:
    """The library built from `source` with `flags` (cached), or the compiler's last error line."""
    version = _compiler_version(cc)
    key = hashlib.sha256(source.read_bytes() + repr((flags, version, cpu_id())).encode()).hexdigest()[:16]
    lib = cache_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(lib)  # built beside, renamed over: a concurrent or killed build leaves no half library
    try:
        cmd = [cc, *flags, "-o", str(tmp), str(source), "-lm"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if run.returncode:
            return (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        os.replace(tmp, lib)
    finally:
        tmp.unlink(missing_ok=True)
    return lib


def _unavailable(source: Path, why: str) -> None:
    warnings.warn(f"fwdgrad: C library {source.name} unavailable ({why}); using the torch path", stacklevel=4)


def load(source: Path, signatures: dict[str, tuple]) -> ctypes.CDLL | None:
    """The library built from `source` with its functions typed by `signatures` (name -> (restype,
    argtypes)), or None (disabled, no compiler, build failed: one warning says which). Cached per process,
    with ``FWDGRAD_KERNELS`` read at the first call; `reset` forgets it."""
    if source in _loaded:  # the hot path: one dict lookup per call
        return _loaded[source]
    _loaded[source] = dll = _build_and_load(source) if enabled() else None
    if dll is not None:
        for name, (res, args) in signatures.items():
            fn = getattr(dll, name)
            fn.restype, fn.argtypes = res, args
    return dll


def _build_and_load(source: Path) -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        _unavailable(source, "no C compiler; set CC")
        return None
    cache_dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fwdgrad")
    try:
        for extra in OPTIONAL_FLAGS:
            lib = _compile(cc, source, FLAGS + extra, cache_dir)
            if isinstance(lib, Path):
                return ctypes.CDLL(str(lib))
        _unavailable(source, f"{cc}: {lib}")
    except (OSError, subprocess.SubprocessError) as e:
        _unavailable(source, str(e))
    return None


def reset() -> None:
    """Forget the loaded libraries: the next `load` re-reads ``FWDGRAD_KERNELS`` and ``CC``."""
    _loaded.clear()


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block every caller takes its torch/numpy path, as on a machine without a C compiler
    (how the benchmark measures the fallback side by side)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "0"
    reset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
        reset()
