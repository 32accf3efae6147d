"""State files: the torch files fwdgrad writes (checkpoint.pt, model.pt, the cached source models).

A state file holds plain data only (dicts, lists, numbers, strings, tensors), never a pickled object, and is
read with ``torch.load(weights_only=True)``, which refuses anything else: a planted pickle cannot run code.
Its payload carries a SHA-256 over every tensor's bytes and every value (`digest`), checked on load, so a
flipped byte is an error naming the file instead of a silently different weight. Files are written
atomically (fwdgrad.files).

    {"fwdgrad_state": FORMAT, "kind": "checkpoint" | "model" | "source-model", "sha256": ..., "payload": ...}
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from typing import Any

import torch

from .files import atomic_open

FORMAT = 1  # bump when the layout above changes


def unreadable(where: str, kind: str) -> str:
    return f"{where!r} cannot be read as a {kind} file (not a torch file, or damaged)"


class StateFileError(ValueError):
    """A state file that cannot be used: unreadable, not plain data, the wrong kind, or a bad checksum."""


def digest(obj: Any) -> str:
    """SHA-256 of a plain-data tree: key order, types, shapes, dtypes and bytes all count."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(f"K{k!r}".encode())
                walk(x[k])
        elif isinstance(x, list | tuple):
            h.update(f"{type(x).__name__}{len(x)}".encode())
            for v in x:
                walk(v)
        elif x is None or isinstance(x, bool | int | float | str):
            h.update(f"V{type(x).__name__}:{x!r}".encode())
        else:
            raise TypeError(f"{type(x).__name__} is not plain data (dict, list, tuple, number, str, tensor)")

    walk(obj)
    return h.hexdigest()


def save_state(path: str | os.PathLike, kind: str, payload: dict) -> None:
    """Write `payload` (plain data) as a state file of `kind`, atomically, with its checksum."""
    record = {"fwdgrad_state": FORMAT, "kind": kind, "sha256": digest(payload), "payload": payload}
    buf = io.BytesIO()  # serialized first: torch's own writer turns a full disk into a RuntimeError
    torch.save(record, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())


def load_state(path: str | os.PathLike, kind: str) -> dict:
    """The payload of the state file at `path`, after checking that it is plain data of `kind` with an intact
    checksum; any problem is a one-line `StateFileError` naming the file."""
    where = str(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StateFileError(f"{where!r} does not exist") from None
    except IsADirectoryError:
        raise StateFileError(f"{where!r} is a folder, not a {kind} file") from None
    except pickle.UnpicklingError as e:  # weights_only refused a global (never executed), or not a pickle
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise StateFileError(
                f"{where!r} holds pickled Python objects ({found.group(1)}), which fwdgrad never loads (they "
                f"can run code); allowed: a {kind} file written by fwdgrad"
            ) from None
        raise StateFileError(unreadable(where, kind)) from None
    except OSError as e:
        raise StateFileError(f"{where!r} cannot be read ({e.strerror or type(e).__name__})") from None
    except Exception:  # noqa: BLE001 - torch.load fails on foreign bytes in many ways; all are one line
        raise StateFileError(unreadable(where, kind)) from None
    if not isinstance(record, dict) or "fwdgrad_state" not in record:
        raise StateFileError(f"{where!r} is not a fwdgrad state file; allowed: a {kind} file fwdgrad wrote")
    if record.get("fwdgrad_state") != FORMAT:
        raise StateFileError(
            f"{where!r} has state-file format {record.get('fwdgrad_state')!r}; allowed: {FORMAT}"
        )
    if record.get("kind") != kind:
        raise StateFileError(f"{where!r} is a {record.get('kind')} file; allowed: a {kind} file")
    try:
        ok = digest(record["payload"]) == record.get("sha256")
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise StateFileError(f"{where!r} is corrupted: its checksum does not match its contents")
    return record["payload"]
