"""The bundle file: one ``.npz`` (``np.savez``, no pickle) with a JSON header and the integer arrays.

Layout (format ``fwdgrad-bundle``, version ``major.minor``; the full spec is ``docs/edge.md``):

* ``__header__`` — a 0-d unicode array holding the JSON header: format, version, engine semantics,
  input/output quantization, input preprocessing, the op graph in execution order, the training state
  (trainable tensors, ε, 1_q, multipliers, m, seed, rounding, step counter), ``arrays``, a map from
  every array name to its dtype and shape, and ``arrays_sha256``, a SHA-256 of the arrays (since 1.1);
* one array per name in ``header["arrays"]``, named ``<node>.<role>`` (``stem_0.weight``).

Versioning: a reader accepts any minor version of its major version (minor bumps only add optional
fields, which older readers ignore) and rejects a newer major version (changed meaning) with a clear error.
A 1.0 bundle (older than checksums) loads without a checksum check; from 1.1 on the checksum is required.
Loading checks the header's fields and ranges, every array and the checksum, so a damaged or edited file
fails in one line naming the file. Saving is atomic (`fwdgrad.files`: temp file in the same folder, fsync,
``os.replace``, the replaced file's permission bits kept): a failed save leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .. import rng
from ..files import atomic_open

FORMAT = "fwdgrad-bundle"
VERSION = "1.1"
SUPPORTED_MAJOR = 1
CHECKSUM_SINCE = (1, 1)  # the first version whose bundles carry `arrays_sha256`
HEADER_KEY = "__header__"
REQUIRED = ("format", "version", "engine", "input", "output", "ops", "arrays")
#: fields the runtime reads from each header section
SECTION_FIELDS = {
    "engine": ("requant", "acc_bits", "overflow"),
    "input": ("name", "scale", "zero_point", "qmin", "qmax"),
    "output": ("name", "scale", "zero_point"),
}
#: per op kind: the attrs and arrays its kernel reads (avgpool also needs `output_size` or kernel/stride/
#: padding, by `adaptive`)
OP_FIELDS = {
    "input": ((), ()),
    "const": (("lo", "hi"), ("value",)),
    "conv2d": (
        ("stride", "padding", "dilation", "groups", "zp_in", "zp_out", "lo", "hi", "channel_dim"),
        ("weight", "mult", "shift"),
    ),
    "linear": (("zp_in", "zp_out", "lo", "hi", "channel_dim"), ("weight", "mult", "shift")),
    "add": (("zp_in", "shift", "zp_out", "lo", "hi"), ("mult",)),
    "concat": (("zp_in", "shift", "zp_out", "lo", "hi", "dim"), ("mult",)),
    "avgpool": (("adaptive", "zp_in", "zp_out", "lo", "hi", "scale_in", "scale_out"), ()),
    "maxpool": (("kernel", "stride", "padding", "dilation"), ()),
    "clamp": (("lo", "hi"), ()),
    "lut": (("qmin", "lo", "hi"), ("table",)),
    "layernorm": (
        ("zp_in", "dim", "frac", "v_eps", "zp_out", "lo", "hi"),
        ("weight", "bias", "mult", "shift"),
    ),
    "softmax": (("levels",), ("table",)),
    "matmul": (("zp_in", "zp_out", "lo", "hi"), ("mult", "shift")),
    "tokens": (
        ("at", "drop", "zp_in", "in_mult", "in_shift", "zp_out", "lo", "hi"),
        ("weight", "mult", "shift"),
    ),
    "flatten": (("start_dim", "end_dim"), ()),
    "unflatten": (("dim", "sizes"), ()),
    "getitem": (("index",), ()),
    "reshape": (("shape",), ()),
    "permute": (("dims",), ()),
    "transpose": (("dim0", "dim1"), ()),
    "identity": ((), ()),
}
OP_KINDS = tuple(OP_FIELDS)
#: the op kinds holding a `weight` array that QZO-FF can train (perturb and update)
WEIGHTED_KINDS = ("conv2d", "linear", "layernorm", "tokens")
DISTRIBUTIONS = ("qgaussian", "qrademacher")
DIFFERENCES = ("sign", "median")
#: training.target: what a step perturbs, the trained weights or (one linear layer's) outputs; perturbed
#: outputs also take the central difference (`fwdgrad.edge.train.Trainer.outputs_step`)
TARGETS = ("weights", "outputs")
OUTPUT_DIFFERENCES = (*DIFFERENCES, "central")
OUTPUTS_FIELDS = ("eps_q", "in_scale", "in_zp", "out_scale", "out_zp", "lo", "hi")
ROUNDINGS = ("nearest", "floor", "stochastic")
#: training.loss: the cross-entropy each step's signs are decided on, by option name (`train.loss`,
#: `finetune --loss`): the float64 one of the dequantized logits, or the integer one (`fwdgrad.edge.loss`)
LOSS_NAMES = {"float": "cross_entropy_f64", "integer": "cross_entropy_q"}
TRAINING_FIELDS = (
    "distribution",
    "eps",
    "lr",
    "m",
    "seed",
    "z_max",
    "one_q",
    "rounding",
    "perturb",
    "step",
    "tensors",
)
TENSOR_FIELDS = ("name", "eps_q", "update_mult", "update_shift", "qmin", "qmax")

#: the documented dtypes of each array role (the suffix after the last '.')
ROLE_DTYPES = {
    "weight": ("int8", "int16"),
    "bias": ("int32",),
    "mult": ("int64",),
    "shift": ("int64",),
    "table": ("int32",),  # LUT codes; softmax exp table (< 2^31: 2^(bits+14) with bits <= 16)
    "value": ("int32",),
    "eps_q": ("int64",),
    "update_mult": ("int64",),
    "update_shift": ("int64",),
    "mask": ("bool",),
}


class BundleError(ValueError):
    """A bundle file that cannot be used: missing, corrupt, wrong format/version, bad field or array."""


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
            raise BundleError(
                f"bundle {self.path!r} has no training settings; export it with export_bundle(...)"
            )
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


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the arrays in name order: per array its name, dtype and shape (a JSON line), then its
    bytes, C order, little-endian, so the same arrays hash the same on any machine and in any npz layout."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(json.dumps([name, a.dtype.name, list(a.shape)]).encode() + b"\n")
        h.update(np.ascontiguousarray(a, a.dtype.newbyteorder("<")))
    return h.hexdigest()


def _require(section, keys, where: str) -> None:
    if not isinstance(section, dict):
        raise BundleError(f"malformed header: {where} must be an object, got {json.dumps(section)[:40]}")
    missing = [f"{where}.{k}" for k in keys if k not in section]
    if missing:
        raise BundleError(f"header lacks required field(s) {missing}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(where: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise BundleError(f"header field {where} is {value!r}; allowed: {allowed}")


def _positive(where: str, v) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    _check(where, v, ok, "a finite number > 0")


def _int_in(where: str, v, lo: int, hi: int) -> None:
    _check(where, v, _is_int(v) and lo <= v < hi, f"an integer in [{lo}, {hi})")


def validate_training(tr: dict, ops: list[dict]) -> None:
    """The QZO-FF settings: required fields, hyper-parameters in range, tensors naming weighted ops."""
    _require(tr, TRAINING_FIELDS, "training")
    _positive("training.lr", tr["lr"])
    _positive("training.eps", tr["eps"])
    _positive("training.z_max", tr["z_max"])
    _int_in("training.m", tr["m"], 1, 2**32)
    _int_in("training.seed", tr["seed"], 0, 2**64)
    _int_in("training.step", tr["step"], 0, 2**32)
    _int_in("training.one_q", tr["one_q"], 1, 2**31)
    _check(
        "training.distribution", tr["distribution"], tr["distribution"] in DISTRIBUTIONS, str(DISTRIBUTIONS)
    )
    _check("training.rounding", tr["rounding"], tr["rounding"] in ROUNDINGS, str(ROUNDINGS))
    loss = tr.get("loss", LOSS_NAMES["float"])  # bundles written before the integer loss: float
    _check("training.loss", loss, loss in LOSS_NAMES.values(), str(tuple(LOSS_NAMES.values())))
    layerwise = tr.get("layerwise", "off")
    _check("training.layerwise", layerwise, layerwise in rng.LAYERWISE, str(rng.LAYERWISE))
    target = tr.get("target", "weights")  # bundles written before perturbed outputs: weights
    _check("training.target", target, target in TARGETS, str(TARGETS))
    difference = tr.get("difference", "sign")  # bundles written before the median difference: sign
    allowed = OUTPUT_DIFFERENCES if target == "outputs" else DIFFERENCES
    _check("training.difference", difference, difference in allowed, f"{allowed} (target {target!r})")
    if target == "outputs":
        _require(tr.get("outputs") or {}, OUTPUTS_FIELDS, "training.outputs")
        _int_in("training.outputs.eps_q", tr["outputs"]["eps_q"], 1, 2**31)
        _positive("training.outputs.in_scale", tr["outputs"]["in_scale"])
        _positive("training.outputs.out_scale", tr["outputs"]["out_scale"])
        n = len(tr["tensors"]) if isinstance(tr["tensors"], list) else 0
        _check("training.tensors", f"{n} tensors", n == 1, "one tensor with target 'outputs'")
    if difference == "median":
        _int_in("training.m", tr["m"], 2, 2**32)
    _require(tr["perturb"], ("mult", "n"), "training.perturb")
    _int_in("training.perturb.mult", tr["perturb"]["mult"], 1, 2**31)
    _int_in("training.perturb.n", tr["perturb"]["n"], 1, 63)
    tensors = tr["tensors"]
    _check("training.tensors", tensors, isinstance(tensors, list) and tensors, "a non-empty list")
    weighted = {op["name"] for op in ops if op["kind"] in WEIGHTED_KINDS}
    for i, t in enumerate(tensors):
        where = f"training.tensors[{i}]"
        _require(t, TENSOR_FIELDS, where)
        allowed = f"the name of an op of kind {WEIGHTED_KINDS}"
        _check(f"{where}.name", t["name"], t["name"] in weighted, allowed)
        _int_in(f"{where}.qmin", t["qmin"], -(2**31), 0)
        _int_in(f"{where}.qmax", t["qmax"], 1, 2**31)


def validate_header(header: dict) -> None:
    """Format, version, required fields (per section, per op kind, training), value ranges of the training
    settings, and the dtype of every array the header names."""
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
        raise BundleError(f"header lacks required field(s) {missing}")
    for section, keys in SECTION_FIELDS.items():
        _require(header[section], keys, section)
    _require(header["arrays"], (), "arrays")
    spec = header["arrays"]
    if not isinstance(header["ops"], list) or not header["ops"]:
        raise BundleError("malformed header: ops must be a non-empty list")
    produced = set()
    for i, op in enumerate(header["ops"]):
        _require(op, ("kind", "name", "inputs", "attrs", "arrays"), f"ops[{i}]")
        if op["kind"] not in OP_FIELDS:
            raise BundleError(
                f"op {op['name']!r} has unknown kind {op['kind']!r}; this runtime supports {OP_KINDS}"
            )
        attrs, roles = OP_FIELDS[op["kind"]]
        if op["kind"] == "avgpool" and isinstance(op["attrs"], dict):
            attrs += ("output_size",) if op["attrs"].get("adaptive") else ("kernel", "stride", "padding")
        _require(op["attrs"], attrs, f"ops[{i}].attrs")
        _require(op["arrays"], roles, f"ops[{i}].arrays")
        for name in op["arrays"].values():
            if name not in spec:
                raise BundleError(f"op {op['name']!r} names array {name!r}, which the header does not list")
        unknown = [name for name in op["inputs"] if name not in produced]
        if unknown:
            raise BundleError(f"op {op['name']!r} reads {unknown}, which no earlier op produces")
        produced.add(op["name"])
    if header["output"]["name"] not in produced:
        raise BundleError(f"output.name {header['output']['name']!r} is not an op of the graph")
    if header.get("training"):
        validate_training(header["training"], header["ops"])
        for t in header["training"]["tensors"]:
            for role in ("eps_q", "update_mult", "update_shift", "mask"):
                if t.get(role) and t[role] not in spec:
                    raise BundleError(
                        f"trainable tensor {t['name']!r} names array {t[role]!r}, which the header "
                        "does not list"
                    )
    for name, s in spec.items():
        allowed = ROLE_DTYPES.get(name.rsplit(".", 1)[-1])
        if allowed is None:
            raise BundleError(f"array {name!r} has an unknown role; allowed suffixes: {sorted(ROLE_DTYPES)}")
        if not isinstance(s, dict) or s.get("dtype") not in allowed:
            got = s.get("dtype") if isinstance(s, dict) else s
            raise BundleError(f"array {name!r} is declared {got!r}; documented dtype: {allowed}")


def validate_arrays(header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Every array the header lists is present with the declared dtype and shape, and the checksum (required
    from version 1.1 on) matches."""
    for name, s in header["arrays"].items():
        if name not in arrays:
            raise BundleError(f"missing array {name!r} named in its header")
        a = arrays[name]
        if str(a.dtype) != s["dtype"]:
            raise BundleError(f"array {name!r} has dtype {a.dtype}, expected {s['dtype']}")
        if list(a.shape) != list(s.get("shape", ())):
            raise BundleError(f"array {name!r} has shape {list(a.shape)}, expected {s.get('shape')}")
    expected = header.get("arrays_sha256")
    if expected is None and parse_version(header["version"]) >= CHECKSUM_SINCE:
        raise BundleError(
            f"header lacks required field 'arrays_sha256' (bundles of version {header['version']} carry one)"
        )
    if expected is not None and expected != checksum(arrays):
        raise BundleError(
            "checksum mismatch: its arrays do not match the header's arrays_sha256 (the file was damaged or "
            "edited after it was written); allowed: an unmodified bundle, so re-export or restore it"
        )


def _read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The validated header and the arrays it names (the arrays themselves are checked by the caller)."""
    with np.load(path, allow_pickle=False) as npz:
        if HEADER_KEY not in npz.files:
            raise BundleError(f"has no {HEADER_KEY!r} entry; not a fwdgrad bundle")
        raw = npz[HEADER_KEY]
        if raw.dtype.kind != "U" or raw.ndim != 0:
            raise BundleError(f"{HEADER_KEY!r} must be a 0-d unicode array, got {raw.dtype}")
        header = json.loads(raw.item())
        validate_header(header)
        return header, {k: npz[k] for k in header["arrays"] if k in npz.files}


def load_bundle(path) -> Bundle:
    """Read and validate a bundle file; any problem raises a one-line `BundleError` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise BundleError(f"cannot read bundle {path!r}: {err.strerror or err}") from None
    try:
        if magic != b"PK\x03\x04":
            raise BundleError("not a bundle (.npz zip archive): no zip signature")
        header, arrays = _read(path)
        validate_arrays(header, arrays)
    except BundleError as err:
        raise BundleError(f"bundle {path!r}: {err}") from None
    except (TypeError, AttributeError) as err:  # JSON of an unexpected shape where validation does not look
        raise BundleError(f"bundle {path!r} has a malformed header ({type(err).__name__}: {err})") from None
    # whatever zipfile and numpy raise on damaged bytes: BadZipFile, NotImplementedError, TokenError...
    except Exception as err:
        raise BundleError(f"bundle {path!r} is truncated or corrupt ({type(err).__name__}: {err})") from None
    return Bundle(header, arrays, path)


def save_bundle(bundle: Bundle, path=None) -> str:
    """Write the bundle atomically to `path` (default: where it was loaded from); returns the path.

    The header's ``arrays`` map and checksum are refreshed from the arrays (and an older version raised to
    this writer's), the result validated and serialized (so a bad value fails before any file is touched),
    then written through `fwdgrad.files.atomic_open`: a temp file in the target folder, fsynced, renamed over
    the target with the permission bits of the file it replaces (a new file gets 0666 & ~umask).
    """
    path = path if path is not None else bundle.path
    if path is None:
        raise BundleError("save_bundle needs a path for a bundle that was not loaded from a file")
    path = os.fspath(path)
    version = max(bundle.header.get("version", VERSION), VERSION, key=parse_version)
    header = dict(
        bundle.header, version=version, arrays=bundle.array_spec(), arrays_sha256=checksum(bundle.arrays)
    )
    validate_header(header)
    validate_arrays(header, bundle.arrays)
    text = json.dumps(header)  # fails here (before any file is touched) on an unserializable value
    with atomic_open(path, "wb") as f:
        np.savez(f, allow_pickle=False, **{HEADER_KEY: np.array(text)}, **bundle.arrays)
    bundle.header, bundle.path = header, path
    return path
