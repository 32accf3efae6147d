"""Exceptions and argument checks shared by the data package.

Every loader reports a missing dataset with :class:`DatasetNotFound` (a ``FileNotFoundError``) whose
one-line message names the path it looked at and how to get the data; a dataset whose checksum does
not match raises :class:`DatasetCorrupted`. Bad arguments raise ``ValueError`` naming the bad value
and what is allowed (:func:`check_choice`, :func:`check_int_range`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not where the loader looked."""

    def __init__(self, name: str, path: str | Path, how_to_get: str) -> None:
        super().__init__(f"{name} not found at {path}; {how_to_get}")
        self.path = Path(path)


class DatasetCorrupted(RuntimeError):
    """A dataset file exists but fails its published checksum."""

    def __init__(self, name: str, path: str | Path, how_to_fix: str) -> None:
        super().__init__(f"{name}: {path} fails its md5 check; {how_to_fix}")
        self.path = Path(path)


def check_choice(what: str, value: object, allowed: Iterable[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_int_range(what: str, value: object, low: int, high: int) -> int:
    """Return ``value`` as an int if it is an integer in ``[low, high]``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def require_files(name: str, paths: Iterable[Path], how_to_get: str) -> None:
    """Raise :class:`DatasetNotFound` for the first of ``paths`` that does not exist."""
    for path in paths:
        if not Path(path).exists():
            raise DatasetNotFound(name, path, how_to_get)
