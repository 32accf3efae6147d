"""The bundle file: one ``.npz`` (``np.savez``, no pickle) with a JSON header and the integer arrays.

Layout (format ``fwdgrad-bundle``, version ``major.minor``; the full spec is ``docs/edge.md``):

* ``__header__`` — a 0-d unicode array holding the JSON header: format, version, engine semantics,
  input/output quantization, input preprocessing, the op graph in execution order, the training state
  (trainable tensors, ε, 1_q, multipliers, m, seed, rounding, step counter) and ``arrays``, a map from
  every array name to its dtype and shape;
* one array per name in ``header["arrays"]``, named ``<node>.<role>`` (``stem_0.weight``).

Versioning: a reader accepts any minor version of its major version (minor bumps only add optional
fields, which older readers ignore) and rejects a newer major version (changed meaning) with a clear error.
Saving is atomic: temp file in the same directory, fsync, ``os.replace`` — a failed save leaves the
previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np

FORMAT = "fwdgrad-bundle"
VERSION = "1.0"
SUPPORTED_MAJOR = 1
HEADER_KEY = "__header__"
REQUIRED = ("format", "version", "engine", "input", "output", "ops", "arrays")
OP_KINDS = (
    "input",
    "const",
    "conv2d",
    "linear",
    "add",
    "concat",
    "avgpool",
    "maxpool",
    "clamp",
    "lut",
    "flatten",
    "reshape",
    "permute",
    "transpose",
    "identity",
)

#: the documented dtypes of each array role (the suffix after the last '.')
ROLE_DTYPES = {
    "weight": ("int8", "int16"),
    "bias": ("int32",),
    "mult": ("int64",),
    "shift": ("int64",),
    "table": ("int32",),
    "value": ("int32",),
    "eps_q": ("int64",),
    "update_mult": ("int64",),
    "update_shift": ("int64",),
    "mask": ("bool",),
}


class BundleError(ValueError):
    """A bundle file that cannot be used: missing, corrupt, wrong format/version, bad array."""


@dataclass
class Bundle:
    """A loaded bundle: the JSON header (dict) and the arrays by name (updated in place by training)."""

    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: str | None = None

    @property
    def ops(self) -> list[dict]:
        return self.header["ops"]

    @property
    def training(self) -> dict:
        if not self.header.get("training"):
            raise BundleError("this bundle has no training settings; export it with export_bundle(...)")
        return self.header["training"]

    def array_spec(self) -> dict:
        return {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in self.arrays.items()}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def parse_version(version) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(version).split("."))
    except ValueError:
        raise BundleError(
            f"bundle version {version!r} is invalid; expected 'major.minor', e.g. {VERSION!r}"
        ) from None
    return major, minor


def validate_header(header: dict) -> None:
    """Format, version, required fields, op kinds and the dtype of every array the header names."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise BundleError(f"not a fwdgrad bundle: header format is {got!r}, expected {FORMAT!r}")
    major, _ = parse_version(header.get("version"))
    if major > SUPPORTED_MAJOR:
        raise BundleError(
            f"bundle format version {header['version']} is newer than this runtime supports "
            f"({SUPPORTED_MAJOR}.x); upgrade fwdgrad to read it"
        )
    if major < 1:
        raise BundleError(
            f"bundle format version {header['version']} is invalid; supported: {SUPPORTED_MAJOR}.x"
        )
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise BundleError(f"bundle header lacks required field(s) {missing}")
    spec = header["arrays"]
    for op in header["ops"]:
        if op.get("kind") not in OP_KINDS:
            raise BundleError(
                f"op {op.get('name')!r} has unknown kind {op.get('kind')!r}; this runtime supports {OP_KINDS}"
            )
        for name in op.get("arrays", {}).values():
            if name not in spec:
                raise BundleError(f"op {op['name']!r} names array {name!r}, which the header does not list")
    for t in (header.get("training") or {}).get("tensors", []):
        for role in ("eps_q", "update_mult", "update_shift", "mask"):
            if t.get(role) and t[role] not in spec:
                raise BundleError(
                    f"trainable tensor {t.get('name')!r} names array {t[role]!r}, which the header "
                    "does not list"
                )
    for name, s in spec.items():
        allowed = ROLE_DTYPES.get(name.rsplit(".", 1)[-1])
        if allowed is None:
            raise BundleError(f"array {name!r} has an unknown role; allowed suffixes: {sorted(ROLE_DTYPES)}")
        if s.get("dtype") not in allowed:
            raise BundleError(f"array {name!r} is declared {s.get('dtype')!r}; documented dtype: {allowed}")


def validate_arrays(header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Every array the header lists is present with the declared dtype and shape."""
    for name, s in header["arrays"].items():
        if name not in arrays:
            raise BundleError(f"bundle is missing array {name!r} named in its header")
        a = arrays[name]
        if str(a.dtype) != s["dtype"]:
            raise BundleError(f"bundle array {name!r} has dtype {a.dtype}, expected {s['dtype']}")
        if list(a.shape) != list(s["shape"]):
            raise BundleError(f"bundle array {name!r} has shape {list(a.shape)}, expected {s['shape']}")


def load_bundle(path) -> Bundle:
    """Read and validate a bundle file; any problem raises a one-line `BundleError`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise BundleError(f"cannot read bundle {path!r}: {err.strerror or err}") from None
    if magic != b"PK\x03\x04":
        raise BundleError(f"{path!r} is not a bundle (.npz zip archive): no zip signature")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if HEADER_KEY not in npz.files:
                raise BundleError(f"{path!r} has no {HEADER_KEY!r} entry; not a fwdgrad bundle")
            raw = npz[HEADER_KEY]
            if raw.dtype.kind != "U" or raw.ndim != 0:
                raise BundleError(f"{path!r}: {HEADER_KEY!r} must be a 0-d unicode array, got {raw.dtype}")
            header = json.loads(raw.item())
            validate_header(header)
            arrays = {k: npz[k] for k in header["arrays"] if k in npz.files}
    except BundleError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError) as err:
        raise BundleError(f"bundle {path!r} is truncated or corrupt ({type(err).__name__}: {err})") from None
    except (TypeError, AttributeError) as err:
        raise BundleError(f"bundle {path!r} has a malformed header ({type(err).__name__}: {err})") from None
    validate_arrays(header, arrays)
    return Bundle(header, arrays, path)


def save_bundle(bundle: Bundle, path=None) -> str:
    """Write the bundle atomically to `path` (default: where it was loaded from); returns the path.

    The header's ``arrays`` map is refreshed from the arrays, the result validated, then written to a temp
    file in the target directory, fsynced and renamed over the target (``os.replace``).
    """
    path = os.fspath(path if path is not None else bundle.path)
    if path is None:
        raise BundleError("save_bundle needs a path for a bundle that was not loaded from a file")
    header = dict(bundle.header, arrays=bundle.array_spec())
    validate_header(header)
    validate_arrays(header, bundle.arrays)
    text = json.dumps(header)  # fails here (before any file is touched) on an unserializable value
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **{HEADER_KEY: np.array(text)}, **bundle.arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    bundle.header, bundle.path = header, path
    return path


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
