"""C99 code generator for a bundle's integer inference (microcontroller runtime, first phase).

`generate_c(bundle, out_dir)` writes ``model.h`` and ``model.c``: the weights, biases, requantization
constants and lookup tables as ``const`` arrays (flash), one static arena for every activation (SRAM),
sized at export time from the activation shapes and the op graph's liveness (an op's output is placed
first-fit among the buffers still live; flatten/reshape/unflatten/identity alias their input), no malloc,
and

    void infer(const model_input_t *input_codes, int32_t *logits_codes);

for one sample: integer input codes (the input format, e.g. uint8) in, the output op's codes out. Every
kernel is the numpy runtime's formula (`fwdgrad.edge.runtime`, `fwdgrad.edge.ops`) in int64 arithmetic:
exact accumulation, the accumulator width (saturate / wrap), requantization ``single`` or ``gemmlowp``
exactly as `ops.requantize` (including its split-multiplier branch), zero points, clamps. So its codes are
bit-identical with the numpy runtime and the engine's integer mode (tests/test_c_runtime.py).

The generated code also has ``int64_t loss_q(const int32_t *logits_codes, int32_t label)``: the integer
cross-entropy of `fwdgrad.edge.loss` on 2^-Q nats. A bundle with training settings also gets
``train_step(x, labels, n, losses)``: one QZO-FF step exactly as `fwdgrad.edge.loss.IntegerLossTrainer`
(`fwdgrad.edge.train` with the integer loss): z from Philox4x32-10 and the Gaussian threshold table (or
Rademacher), perturbation and update with nearest / floor / stochastic rounding, per-channel ε_q and update
factors, sparse masks. The trainable tensors live in SRAM (non-const) with one perturbed copy each; the other
weights stay const. Prefix reuse: the ops before the first trained one run once per sample and a step's 2m
perturbed passes resume from the values they leave (kept in a static prefix store of `prefix_samples`
samples).

Assumes two's complement integers and arithmetic right shifts of negative values (gcc, clang, arm-none-eabi
gcc); compile with ``-fno-strict-aliasing`` (the arena is one byte array read through typed pointers).
Ops it cannot handle raise a one-line `CExportError` naming them.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .. import rng
from ..rng.streams import SR_STREAM
from . import ops as K
from .bundle import Bundle
from .loss import LN2_MULT, MANT_BITS, output_spec
from .runtime import Runtime

SUPPORTED = (
    "input",
    "conv2d",
    "linear",
    "avgpool",
    "maxpool",
    "add",
    "concat",
    "clamp",
    "lut",
    "flatten",
    "unflatten",
    "reshape",
    "identity",
)
ALIASES = ("flatten", "unflatten", "reshape", "identity")
ALIGN = 8
ITEMSIZE = {"uint8_t": 1, "int8_t": 1, "uint16_t": 2, "int16_t": 2, "int32_t": 4, "int64_t": 8}
CTYPES = {
    "uint8": "uint8_t",
    "int8": "int8_t",
    "uint16": "uint16_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
}


class CExportError(ValueError):
    """A bundle the C generator cannot translate (unsupported ops, shapes or constants)."""


def _lit(v: int) -> str:
    v = int(v)
    if v == -(2**31):
        return "(-2147483647-1)"
    if not -(2**31) < v < 2**31:
        return f"INT64_C({v})"
    return str(v)


def _array(ctype: str, name: str, values, comment: str = "") -> str:
    flat = [_lit(v) for v in np.asarray(values).reshape(-1)]
    rows = [", ".join(flat[i : i + 16]) for i in range(0, len(flat), 16)] or ["0"]
    body = ",\n    ".join(rows)
    note = f" /* {comment} */" if comment else ""
    return f"static const {ctype} {name}[{max(1, len(flat))}] = {{{note}\n    {body}\n}};\n"


def _trace(bundle: Bundle, input_shape) -> dict[str, np.ndarray]:
    """Every op's output for one sample of the lowest input code (shapes and storage dtypes)."""
    rt = Runtime(bundle)
    spec = bundle.header["input"]
    x = np.full((1, *input_shape), spec["qmin"], dtype=K.storage(spec["qmin"], spec["qmax"]))
    env = {}
    for op in bundle.ops:
        xs = [env[n] for n in op["inputs"]]
        env[op["name"]] = (
            rt.quantize_input(x)
            if op["kind"] == "input"
            else getattr(rt, "_" + op["kind"])(op, *xs, weight_fn=None)
        )
    return env


def plan_arena(ops: list[dict], sizes: dict[str, int], output: str) -> tuple[dict[str, int], int, dict]:
    """Byte offsets of the arena buffers and the arena size. Buffer = a non-alias op's output (the input
    is the caller's); its lifetime runs from its op to the last reader of it or of an alias of it (the
    output: to the end). Buffers are placed first-fit by start, among those whose lifetimes overlap."""
    root = {}
    for op in ops:
        root[op["name"]] = root[op["inputs"][0]] if op["kind"] in ALIASES else op["name"]
    index = {op["name"]: i for i, op in enumerate(ops)}
    end = {}
    for i, op in enumerate(ops):
        end.setdefault(root[op["name"]], i)
        for n in op["inputs"]:
            end[root[n]] = max(end[root[n]], i)
    end[root[output]] = len(ops)
    offsets, placed, total = {}, [], 0
    for op in ops:
        name = op["name"]
        if op["kind"] in ALIASES or op["kind"] == "input":
            continue
        start, stop, size = index[name], end[name], sizes[name]
        live = sorted((o, o + s) for (o, s, a, b) in placed if a <= stop and start <= b)
        off = 0
        for lo, hi in live:
            if off + size <= lo:
                break
            off = max(off, -(-hi // ALIGN) * ALIGN)
        offsets[name] = off
        placed.append((off, size, start, stop))
        total = max(total, off + size)
    return offsets, -(-total // ALIGN) * ALIGN, root


PREAMBLE = r"""
#define ACC_BITS {acc_bits}
#define OVERFLOW_WRAP {wrap}
#define REQUANT_GEMMLOWP {gemmlowp}

static inline int64_t fit_acc(int64_t a) {{
#if ACC_BITS < 64
    const int64_t lo = -((int64_t)1 << (ACC_BITS - 1)), hi = ((int64_t)1 << (ACC_BITS - 1)) - 1;
    if (a >= lo && a <= hi) return a;
#if OVERFLOW_WRAP
    return (int64_t)(((uint64_t)a - (uint64_t)lo) & (((uint64_t)1 << ACC_BITS) - 1)) + lo;
#else
    return a < lo ? lo : hi;
#endif
#else
    return a;
#endif
}}

#if !REQUANT_GEMMLOWP
/* ops.requantize "single": (acc*M + 2^(n-1)) >> n, n = 31 + shift (n < 0: acc << -n first) */
static inline int64_t rq_single(int64_t acc, int64_t mult, int64_t shift, int split) {{
    int64_t n = 31 + shift, left = 0, half, a;
    if (n < 0) {{ left = -n; n = 0; }}
    half = n > 0 ? (int64_t)1 << (n - 1) : 0;
    a = acc * ((int64_t)1 << left);
    if (split) return (a * (mult >> 16) + ((a * (mult & 0xFFFF) + half) >> 16)) >> (n - 16);
    return (a * mult + half) >> n;
}}
#define requant(acc, mult, shift, split) rq_single(acc, mult, shift, split)
#else
/* ops.requantize "gemmlowp": SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT */
static inline int64_t rq_gemmlowp(int64_t acc, int64_t mult, int64_t shift) {{
    int64_t a = acc * ((int64_t)1 << (shift < 0 ? -shift : 0)), prod, v, high, right, mask, thr;
    if (a < INT32_MIN) a = INT32_MIN;
    if (a > INT32_MAX) a = INT32_MAX;
    prod = a * mult;
    v = prod + (prod >= 0 ? ((int64_t)1 << 30) : 1 - ((int64_t)1 << 30));
    high = v >= 0 ? v >> 31 : -((-v) >> 31);
    right = shift > 0 ? shift : 0;
    mask = ((int64_t)1 << right) - 1;
    thr = (mask >> 1) + (high < 0);
    return (high >> right) + ((high & mask) > thr);
}}
#define requant(acc, mult, shift, split) rq_gemmlowp(acc, mult, shift)
#endif

static inline int64_t clip(int64_t v, int64_t lo, int64_t hi) {{ return v < lo ? lo : v > hi ? hi : v; }}

/* requantize, add the output zero point, clamp (runtime._finish) */
static inline int64_t finish(int64_t acc, int64_t mult, int64_t shift, int split, int64_t zp, int64_t lo,
                             int64_t hi) {{
    (void)split; /* only "single" reads it */
    return clip(requant(acc, mult, shift, split) + zp, lo, hi);
}}

/* add / concat: (acc + 2^(s-1)) >> s, zero point, clamp (runtime._round_sum) */
static inline int64_t round_sum(int64_t acc, int s, int64_t zp, int64_t lo, int64_t hi) {{
    return clip(((acc + ((int64_t)1 << (s - 1))) >> s) + zp, lo, hi);
}}
"""

LOSS = r"""
/* integer cross-entropy (fwdgrad.edge.loss): on 2^-{q} nats */
{table}
int64_t loss_q(const int32_t *logits_codes, int32_t label) {{
    int64_t qmax = logits_codes[0], total = 0, e = 0, v, m, out, lam, d;
    int i;
    for (i = 1; i < {classes}; i++) if (logits_codes[i] > qmax) qmax = logits_codes[i];
    for (i = 0; i < {classes}; i++) {{
        d = qmax - logits_codes[i];
        total += LOSS_TABLE[d < {last} ? d : {last}];
    }}
    for (v = total, i = 32; i > 0; i >>= 1) if ((v >> i) > 0) {{ e += i; v >>= i; }}
    m = e >= {mant} ? total >> (e - {mant}) : total << ({mant} - e);
    out = e << {k};
    for (i = {k} - 1; i >= 0; i--) {{
        int64_t bit;
        m = (m * m) >> {mant};
        bit = m >> ({mant} + 1);
        m >>= bit;
        out += bit << i;
    }}
    lam = out - ((int64_t){p} << {k});
    d = qmax - logits_codes[label];
    return ((lam * INT64_C({ln2}) + ((int64_t)1 << {r1})) >> {r})
        + ((d * INT64_C({sm}) + ((int64_t)1 << {sn1})) >> {sn});
}}
"""

TRAIN_DECL = """
/* QZO-FF (fwdgrad.edge.train with the integer loss): one step on a batch of n samples (n * MODEL_INPUT_SIZE
   input codes, n labels); writes the 2m integer batch losses (sum over the batch of loss_q, L+ then L- per
   sample i) to losses; advances the step counter */
#define MODEL_M {m}
void train_step(const model_input_t *x, const int32_t *labels, int n, int64_t *losses);
uint32_t model_step(void);
void *model_weights(int tensor);  /* the trainable tensor's integer weights (SRAM) */
int model_weight_count(int tensor);
"""

TRAIN = r"""
/* ---- QZO-FF training ---- */
#define SEED_LO {seed_lo}u
#define SEED_HI {seed_hi}u
#define ONE_Q {one_q}
#define GAUSSIAN {gaussian}
#define ROUNDING {rounding} /* 0 nearest, 1 floor, 2 stochastic */
#define P_MULT INT64_C({p_mult})
#define P_N {p_n}
#define M_SAMPLES {m}
#define SR_STREAM {sr}u
#define N_TENSORS {n_t}
{consts}
static uint32_t step_counter = {step}u;

/* fwdgrad.rng.reference: Philox4x32-10, counter (i >> 2, tensor, sample, step), key (seed lo, seed hi) */
static uint32_t philox_word(uint32_t step, uint32_t sample, uint32_t t, uint64_t i) {{
    uint32_t c0 = (uint32_t)(i >> 2), c1 = t, c2 = sample, c3 = step, k0 = SEED_LO, k1 = SEED_HI;
    int r;
    for (r = 0; r < 10; r++) {{
        uint64_t p0, p1;
        if (r) {{ k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }}
        p0 = (uint64_t)0xD2511F53u * c0;
        p1 = (uint64_t)0xCD9E8D57u * c2;
        c0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        c1 = (uint32_t)p1;
        c2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c3 = (uint32_t)p0;
    }}
    switch (i & 3) {{ case 0: return c0; case 1: return c1; case 2: return c2; default: return c3; }}
}}

static int64_t z_q(uint32_t step, uint32_t sample, uint32_t t, uint64_t e) {{
    uint32_t u = philox_word(step, sample, t, e);
#if GAUSSIAN
    int lo = 0, hi = 254; /* the number of thresholds <= u, by binary search */
    while (lo < hi) {{ int mid = (lo + hi) / 2; if (GAUSS_T[mid] <= u) lo = mid + 1; else hi = mid; }}
    return lo - 127;
#else
    return (u >> 31) ? -ONE_Q : ONE_Q;
#endif
}}

static uint32_t sr_word(uint32_t step, uint32_t stream, uint32_t t, uint64_t e) {{
#if ROUNDING == 2
    return philox_word(step, SR_STREAM + stream, t, e);
#else
    (void)step; (void)stream; (void)t; (void)e;
    return 0;
#endif
}}

/* train.shift_round: round(prod / 2^n), nearest (half up), floor or stochastic (32-bit word) */
static int64_t shift_round(int64_t prod, int64_t n, uint32_t w) {{
#if ROUNDING == 0
    (void)w;
    return (prod + ((int64_t)1 << (n - 1))) >> n;
#elif ROUNDING == 1
    (void)w;
    return prod >> n;
#else
    int64_t r = n <= 32 ? (int64_t)w >> (32 - n) : (int64_t)w << (n - 32);
    return (prod + r) >> n;
#endif
}}

static void perturb(int t, uint32_t step, uint32_t sample, int64_t sign) {{
    int e;
{perturb}}}

static void restore(int t) {{
{restore}}}

static void update(int t, uint32_t step, const int64_t *coeffs) {{
    int e;
{update}}}

static void * const WEIGHTS[N_TENSORS] = {{ {ptrs} }};
static const int COUNTS[N_TENSORS] = {{ {sizes} }};
void *model_weights(int tensor) {{ return WEIGHTS[tensor]; }}
int model_weight_count(int tensor) {{ return COUNTS[tensor]; }}
uint32_t model_step(void) {{ return step_counter; }}

/* Prefix reuse: ops before FIRST_OP (the first trained one) do not depend on the perturbation. They run
   once per sample; the values they leave for later ops (the frontier, FRONTIER_BYTES per sample) are kept
   for up to PREFIX_SAMPLES samples, and the 2m perturbed passes of those samples resume from op FIRST_OP.
   A longer batch runs in chunks, each making the perturbed weights anew (the same integers). */
#define FIRST_OP {first}
#define N_OPS {n_ops}
#define FRONTIER_BYTES {frontier_bytes}
#define PREFIX_SAMPLES {prefix_samples}
#if FRONTIER_BYTES
static unsigned char prefix_store[PREFIX_SAMPLES * FRONTIER_BYTES];

static void frontier(int j, int save) {{ /* arena <-> the stored frontier of sample j */
    static const int32_t off[] = {{ {frontier_offsets} }}, len[] = {{ {frontier_sizes} }};
    unsigned char *p = prefix_store + (long)j * FRONTIER_BYTES;
    int k;
    for (k = 0; k < (int)(sizeof off / sizeof off[0]); p += len[k], k++) {{
        if (save) memcpy(p, arena.bytes + off[k], (size_t)len[k]);
        else memcpy(arena.bytes + off[k], p, (size_t)len[k]);
    }}
}}
#endif

void train_step(const model_input_t *x, const int32_t *labels, int n, int64_t *losses) {{
    int64_t coeffs[M_SAMPLES];
    int32_t logits[MODEL_OUTPUT_SIZE];
    int i, s, j, t, c0, cn;
    for (i = 0; i < 2 * M_SAMPLES; i++) losses[i] = 0;
    for (c0 = 0; c0 < n; c0 += cn) {{
        cn = n - c0;
#if FRONTIER_BYTES
        if (cn > PREFIX_SAMPLES) cn = PREFIX_SAMPLES;
        for (j = 0; j < cn; j++) {{
            run_ops(x + (long)(c0 + j) * MODEL_INPUT_SIZE, 0, FIRST_OP);
            frontier(j, 1);
        }}
#endif
        for (i = 0; i < M_SAMPLES; i++) {{
            for (s = 0; s < 2; s++) {{
                for (t = 0; t < N_TENSORS; t++) perturb(t, step_counter, (uint32_t)i, s ? -1 : 1);
                for (j = 0; j < cn; j++) {{
#if FRONTIER_BYTES
                    frontier(j, 0);
#endif
                    run_ops(x + (long)(c0 + j) * MODEL_INPUT_SIZE, FIRST_OP, N_OPS);
                    read_output(logits);
                    losses[2 * i + s] += loss_q(logits, labels[c0 + j]);
                }}
                for (t = 0; t < N_TENSORS; t++) restore(t);
            }}
        }}
    }}
    for (i = 0; i < M_SAMPLES; i++)
        coeffs[i] = (losses[2 * i] > losses[2 * i + 1]) - (losses[2 * i] < losses[2 * i + 1]);
    for (t = 0; t < N_TENSORS; t++) update(t, step_counter, coeffs);
    step_counter++;
}}
"""


class _Gen:
    def __init__(self, bundle: Bundle, input_shape):
        self.b, self.arrays = bundle, bundle.arrays
        eng = bundle.header["engine"]
        self.mode, self.acc_bits = eng["requant"], eng["acc_bits"]
        if self.mode not in ("single", "gemmlowp"):
            raise CExportError(f"requantization {self.mode!r} has no C kernel; allowed: 'single', 'gemmlowp'")
        self.env = _trace(bundle, input_shape)
        sizes = {n: v.nbytes for n, v in self.env.items()}
        self.output = bundle.header["output"]["name"]
        self.offsets, self.arena, self.root = plan_arena(bundle.ops, sizes, self.output)
        self.consts: list[str] = []
        self.flash = self.sram = 0
        tr = bundle.header.get("training") or {}
        self.tidx = {t["name"]: k for k, t in enumerate(tr.get("tensors", []))}
        self.trained: list[tuple] = []
        self.inputs = {op["name"] for op in bundle.ops if op["kind"] == "input"}
        self.body: list[str] = []
        self.prefix_samples, self.prefix_bytes = 1, 0

    # -- helpers ---------------------------------------------------------------------------------------
    def ctype(self, name: str) -> str:
        dt = self.env[name].dtype.name
        if dt not in CTYPES:
            raise CExportError(f"value {name!r} has dtype {dt}, which the C runtime does not store")
        return CTYPES[dt]

    def ptr(self, name: str, const: bool = True) -> str:
        r = self.root[name]
        t = self.ctype(name)
        if r in self.inputs:
            return "input_codes"
        q = "const " if const else ""
        return f"(({q}{t} *)(arena.bytes + {self.offsets[r]}))"

    def const(self, ctype: str, cname: str, values, comment: str = "") -> str:
        self.consts.append(_array(ctype, cname, values, comment))
        self.flash += max(1, np.asarray(values).size) * ITEMSIZE[ctype]
        return cname

    def split(self, mult, shift) -> int:
        """Whether `ops.requantize` takes its split-multiplier branch for these constants."""
        if self.mode != "single":
            return 0
        n = 31 + np.asarray(shift, np.int64)
        left = np.maximum(-n, 0)
        return int(self.acc_bits + int(np.max(left)) > 32 and bool(np.all(np.maximum(n, 0) >= 16)))

    def _bias(self, i: int, op: dict) -> str:
        """The C statement adding a conv/linear op's int32 bias to `acc` for channel `c` ("" without one)."""
        if "bias" not in op["arrays"]:
            return ""
        return "acc += " + self.const("int32_t", f"op{i}_bias", self.arrays[op["arrays"]["bias"]]) + "[c];"

    def requant_consts(self, i: int, op: dict, mult, shift, channels: int) -> tuple[str, str, str]:
        """C expressions for (mult, shift) of channel `c` and the split flag."""
        mult, shift = np.asarray(mult, np.int64).reshape(-1), np.asarray(shift, np.int64).reshape(-1)
        if mult.size not in (1, channels) or shift.size not in (1, channels):
            raise CExportError(f"op {op['name']!r}: {mult.size} multipliers for {channels} channels")
        m = self.const("int64_t", f"op{i}_mult", mult)
        s = self.const("int64_t", f"op{i}_shift", shift)
        mc = f"{m}[c]" if mult.size > 1 else f"{m}[0]"
        sc = f"{s}[c]" if shift.size > 1 else f"{s}[0]"
        return mc, sc, str(self.split(mult, shift))

    # -- ops -------------------------------------------------------------------------------------------
    def emit(self, i: int, op: dict) -> None:
        kind = op["kind"]
        if kind in ALIASES or kind == "input":
            return
        self.body.append(
            f"    /* {i}: {kind} {op['name']} -> {list(self.env[op['name']].shape)} */\n"
            f"    if (lo <= {i} && {i} < hi) {{\n"
        )
        self.body.append(getattr(self, "_" + kind)(i, op, op["attrs"]))
        self.body.append("    }\n")

    def _conv2d(self, i, op, a):
        x, y = self.env[op["inputs"][0]], self.env[op["name"]]
        w = self.arrays[op["arrays"]["weight"]]
        if x.ndim != 4 or a["channel_dim"] % 4 != 1:
            raise CExportError(
                f"op {op['name']!r}: conv2d on {x.ndim}-d input / channel_dim {a['channel_dim']}"
            )
        _, c, h, wd = x.shape
        _, cout, oh, ow = y.shape
        _, cg, kh, kw = w.shape
        (sh, sw), (ph, pw), (dh, dw), g = a["stride"], a["padding"], a["dilation"], a["groups"]
        wn = self.weight(i, op, w)
        mc, sc, sp = self.requant_consts(i, op, *self._ms(op), cout)
        bias = self._bias(i, op)
        xt, yt = self.ptr(op["inputs"][0]), self.ptr(op["name"], const=False)
        return f"""        const {self.ctype(op["inputs"][0])} *x = {xt};
        {self.ctype(op["name"])} *y = {yt};
        int c, oy, ox, ci, ky, kx;
        for (c = 0; c < {cout}; c++) {{
            const int cin0 = (c / {cout // g}) * {cg};
            for (oy = 0; oy < {oh}; oy++) for (ox = 0; ox < {ow}; ox++) {{
                int64_t acc = 0;
                for (ci = 0; ci < {cg}; ci++) for (ky = 0; ky < {kh}; ky++) {{
                    const int iy = oy * {sh} - {ph} + ky * {dh};
                    if (iy < 0 || iy >= {h}) continue;
                    for (kx = 0; kx < {kw}; kx++) {{
                        const int ix = ox * {sw} - {pw} + kx * {dw};
                        if (ix < 0 || ix >= {wd}) continue;
                        acc += ((int64_t)x[((cin0 + ci) * {h} + iy) * {wd} + ix] - {a["zp_in"]})
                            * {wn}[((c * {cg} + ci) * {kh} + ky) * {kw} + kx];
                    }}
                }}
                {bias}
                acc = fit_acc(acc);
                y[(c * {oh} + oy) * {ow} + ox] = {self.fin(op, mc, sc, sp)};
            }}
        }}
"""

    def weight(self, i: int, op: dict, w: np.ndarray) -> str:
        """The C name the op's kernel reads its weights through: a const array, or for a trainable tensor
        a pointer to its SRAM weights or (during a perturbed pass) its perturbed copy."""
        t = self.tidx.get(op["name"])
        if t is None:
            return self.const(CTYPES[w.dtype.name], f"op{i}_weight", w, op["name"])
        ct = CTYPES[w.dtype.name]
        self.trained.append((t, i, op, w))
        self.sram += 2 * w.nbytes
        self.consts.append(
            _array(ct, f"op{i}_weight", w, f"{op['name']}: trainable tensor {t}").replace(
                "static const", "static"
            )
            + f"static {ct} op{i}_pert[{w.size}];\nstatic const {ct} *op{i}_w = op{i}_weight;\n"
        )
        return f"op{i}_w"

    def fin(self, op: dict, mc: str, sc: str, sp: str) -> str:
        """The C expression of `runtime._finish` for `acc`, cast to the output's type."""
        a = op["attrs"]
        return f"({self.ctype(op['name'])})finish(acc, {mc}, {sc}, {sp}, {a['zp_out']}, {a['lo']}, {a['hi']})"

    def _ms(self, op):
        return self.arrays[op["arrays"]["mult"]], self.arrays[op["arrays"]["shift"]]

    def _linear(self, i, op, a):
        x, y = self.env[op["inputs"][0]], self.env[op["name"]]
        w = self.arrays[op["arrays"]["weight"]]
        if a["channel_dim"] % y.ndim != y.ndim - 1:
            raise CExportError(f"op {op['name']!r}: linear with channel_dim {a['channel_dim']}")
        cout, k = w.shape
        rows = x.size // k
        wn = self.weight(i, op, w)
        mc, sc, sp = self.requant_consts(i, op, *self._ms(op), cout)
        bias = self._bias(i, op)
        return f"""        const {self.ctype(op["inputs"][0])} *x = {self.ptr(op["inputs"][0])};
        {self.ctype(op["name"])} *y = {self.ptr(op["name"], const=False)};
        int r, c, j;
        for (r = 0; r < {rows}; r++) for (c = 0; c < {cout}; c++) {{
            int64_t acc = 0;
            for (j = 0; j < {k}; j++) acc += ((int64_t)x[r * {k} + j] - {a["zp_in"]}) * {wn}[c * {k} + j];
            {bias}
            acc = fit_acc(acc);
            y[r * {cout} + c] = {self.fin(op, mc, sc, sp)};
        }}
"""

    def _window(self, op, a):
        x = self.env[op["inputs"][0]]
        if x.ndim != 4:
            raise CExportError(f"op {op['name']!r}: pooling of a {x.ndim}-d input")
        if op["kind"] == "avgpool" and a["adaptive"]:
            (h, w), (oh, ow) = x.shape[-2:], a["output_size"]
            oh, ow = oh or h, ow or w
            if h % oh or w % ow:
                raise CExportError(f"op {op['name']!r}: adaptive pool {h}x{w}->{oh}x{ow} needs equal windows")
            return (h // oh, w // ow), (h // oh, w // ow), (0, 0), (1, 1)
        return a["kernel"], a["stride"], a["padding"], a.get("dilation", (1, 1))

    def _avgpool(self, i, op, a):
        (kh, kw), (sh, sw), (ph, pw), _ = self._window(op, a)
        _, c, h, wd = self.env[op["inputs"][0]].shape
        _, _, oh, ow = self.env[op["name"]].shape
        mult, shift = K.quantize_multiplier(a["scale_in"] / (kh * kw * a["scale_out"]))
        mc, sc, sp = self.requant_consts(i, op, mult, shift, c)
        yt = self.ctype(op["name"])
        return f"""        const {self.ctype(op["inputs"][0])} *x = {self.ptr(op["inputs"][0])};
        {yt} *y = {self.ptr(op["name"], const=False)};
        int c, oy, ox, ky, kx;
        for (c = 0; c < {c}; c++) for (oy = 0; oy < {oh}; oy++) for (ox = 0; ox < {ow}; ox++) {{
            int64_t acc = 0;
            for (ky = 0; ky < {kh}; ky++) for (kx = 0; kx < {kw}; kx++) {{
                const int iy = oy * {sh} - {ph} + ky, ix = ox * {sw} - {pw} + kx;
                if (iy >= 0 && iy < {h} && ix >= 0 && ix < {wd})
                    acc += (int64_t)x[(c * {h} + iy) * {wd} + ix] - {a["zp_in"]};
            }}
            y[(c * {oh} + oy) * {ow} + ox] = {self.fin(op, mc, sc, sp)};
        }}
"""

    def _maxpool(self, i, op, a):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._window(op, a)
        _, c, h, wd = self.env[op["inputs"][0]].shape
        _, _, oh, ow = self.env[op["name"]].shape
        yt = self.ctype(op["name"])
        return f"""        const {self.ctype(op["inputs"][0])} *x = {self.ptr(op["inputs"][0])};
        {yt} *y = {self.ptr(op["name"], const=False)};
        int c, oy, ox, ky, kx;
        for (c = 0; c < {c}; c++) for (oy = 0; oy < {oh}; oy++) for (ox = 0; ox < {ow}; ox++) {{
            int64_t best = INT32_MIN;
            for (ky = 0; ky < {kh}; ky++) for (kx = 0; kx < {kw}; kx++) {{
                const int iy = oy * {sh} - {ph} + ky * {dh}, ix = ox * {sw} - {pw} + kx * {dw};
                if (iy >= 0 && iy < {h} && ix >= 0 && ix < {wd} && x[(c * {h} + iy) * {wd} + ix] > best)
                    best = x[(c * {h} + iy) * {wd} + ix];
            }}
            y[(c * {oh} + oy) * {ow} + ox] = ({yt})best;
        }}
"""

    def _add(self, i, op, a):
        shapes = {self.env[n].shape for n in op["inputs"]}
        if len(shapes) != 1:
            raise CExportError(
                f"op {op['name']!r}: add of differently shaped inputs {sorted(shapes)} (broadcast)"
            )
        mults = self.arrays[op["arrays"]["mult"]]
        yt, n, s = self.ctype(op["name"]), self.env[op["name"]].size, a["shift"]
        decl = "".join(
            f"        const {self.ctype(x)} *x{j} = {self.ptr(x)};\n" for j, x in enumerate(op["inputs"])
        )
        terms = " + ".join(
            f"((int64_t)x{j}[e] - {zp}) * {_lit(m)}" for j, (zp, m) in enumerate(zip(a["zp_in"], mults))
        )
        return f"""{decl}        {yt} *y = {self.ptr(op["name"], const=False)};
        int e;
        for (e = 0; e < {n}; e++)
            y[e] = ({yt})round_sum({terms}, {s}, {a["zp_out"]}, {a["lo"]}, {a["hi"]});
"""

    def _concat(self, i, op, a):
        y = self.env[op["name"]]
        dim = a["dim"] % y.ndim
        outer, inner_out = int(np.prod(y.shape[:dim])), int(np.prod(y.shape[dim:]))
        yt, s = self.ctype(op["name"]), a["shift"]
        zp_out, lo, hi = a["zp_out"], a["lo"], a["hi"]
        mults = self.arrays[op["arrays"]["mult"]]
        code = f"        {yt} *y = {self.ptr(op['name'], const=False)};\n        int o, e;\n"
        base = 0
        for name, zp, m in zip(op["inputs"], a["zp_in"], mults):
            inner = int(np.prod(self.env[name].shape[dim:]))
            code += f"""        {{
            const {self.ctype(name)} *x = {self.ptr(name)};
            for (o = 0; o < {outer}; o++) for (e = 0; e < {inner}; e++)
                y[o * {inner_out} + {base} + e] =
                    ({yt})round_sum(((int64_t)x[o * {inner} + e] - {zp}) * {_lit(m)}, {s}, {zp_out}, {lo},
                                    {hi});
        }}
"""
            base += inner
        return code

    def _clamp(self, i, op, a):
        yt, n = self.ctype(op["name"]), self.env[op["name"]].size
        return f"""        const {self.ctype(op["inputs"][0])} *x = {self.ptr(op["inputs"][0])};
        {yt} *y = {self.ptr(op["name"], const=False)};
        int e;
        for (e = 0; e < {n}; e++) y[e] = ({yt})clip(x[e], {a["lo"]}, {a["hi"]});
"""

    def _lut(self, i, op, a):
        yt, n = self.ctype(op["name"]), self.env[op["name"]].size
        t = self.const("int32_t", f"op{i}_table", self.arrays[op["arrays"]["table"]], op["name"])
        return f"""        const {self.ctype(op["inputs"][0])} *x = {self.ptr(op["inputs"][0])};
        {yt} *y = {self.ptr(op["name"], const=False)};
        int e;
        for (e = 0; e < {n}; e++) y[e] = ({yt}){t}[(int64_t)x[e] - {a["qmin"]}];
"""

    # -- files -----------------------------------------------------------------------------------------
    def source(self, header_name: str) -> tuple[str, str]:
        for i, op in enumerate(self.b.ops):
            self.emit(i, op)
        inp = self.b.header["input"]
        in_t = CTYPES[np.dtype(K.storage(inp["qmin"], inp["qmax"])).name]
        out = self.env[self.output]
        classes = out.shape[-1]
        n_in = int(np.prod(self.env[self.b.ops[0]["name"]].shape))
        guard = re.sub(r"\W", "_", header_name).upper()
        in_shape = list(self.env[self.b.ops[0]["name"]].shape[1:])
        wrap = int(self.b.header["engine"]["overflow"] == "wrap")
        header = f"""/* Generated by fwdgrad.edge.cgen from a fwdgrad bundle: integer inference of one sample,
   integer loss, QZO-FF training (bundles with training settings). */
#ifndef {guard}
#define {guard}
#include <stdint.h>

#define MODEL_INPUT_SIZE {n_in}      /* input codes per sample, {in_shape} */
#define MODEL_OUTPUT_SIZE {out.size}  /* output codes per sample, {list(out.shape[1:])} */
#define MODEL_ARENA_BYTES {self.arena}  /* the static activation arena */
#define MODEL_INPUT_QMIN {inp["qmin"]}
#define MODEL_INPUT_QMAX {inp["qmax"]}
#define MODEL_LOSS_BITS {self.spec.loss_bits}  /* loss_q returns the loss on 2^-MODEL_LOSS_BITS nats */
typedef {in_t} model_input_t;

void infer(const model_input_t *input_codes, int32_t *logits_codes);
int64_t loss_q(const int32_t *logits_codes, int32_t label);

#endif
"""
        sp = self.spec
        self.flash += sp.table.size * 4  # T[k] <= 2^30
        loss = LOSS.format(
            q=sp.loss_bits,
            table=_array("uint32_t", "LOSS_TABLE", sp.table, "T[k] = round(2^P exp(-k s))"),
            classes=classes,
            last=len(sp.table) - 1,
            mant=MANT_BITS,
            k=sp.log_bits,
            p=sp.exp_bits,
            ln2=LN2_MULT,
            r=31 + sp.log_bits - sp.loss_bits,
            r1=30 + sp.log_bits - sp.loss_bits,
            sm=sp.scale_mult,
            sn=sp.scale_n,
            sn1=sp.scale_n - 1,
        )
        body = "".join(self.body)
        source = (
            f'/* Generated by fwdgrad.edge.cgen: do not edit. Requantization "{self.mode}". */\n'
            f'#include "{header_name}"\n\n'
            + PREAMBLE.format(acc_bits=self.acc_bits, wrap=wrap, gemmlowp=int(self.mode == "gemmlowp"))
            + "\n" + "".join(self.consts)
            + f"\nstatic union {{ int64_t align; unsigned char bytes[{max(ALIGN, self.arena)}]; }} arena;\n\n"
            + "/* ops lo <= i < hi of the graph on one sample (their outputs in the arena) */\n"
            + "static void run_ops(const model_input_t *input_codes, int lo, int hi) {\n"
            + body
            + "}\n\n"
            + "static void read_output(int32_t *logits_codes) {\n"
            + f"    const {self.ctype(self.output)} *out = {self.ptr(self.output)};\n"
            + "    int e;\n"
            + f"    for (e = 0; e < {out.size}; e++) logits_codes[e] = out[e];\n}}\n\n"
            + "void infer(const model_input_t *input_codes, int32_t *logits_codes) {\n"
            + f"    run_ops(input_codes, 0, {len(self.b.ops)});\n"
            + "    read_output(logits_codes);\n}\n"
            + loss
            + (self.training_source() if self.trained else "")
        )  # fmt: skip
        if self.trained:
            header = header.replace("\n#endif", TRAIN_DECL.format(m=self.b.training["m"]) + "\n#endif")
        return header, source

    def frontier(self) -> tuple[int, list[str]]:
        """(first, roots): the first trained op's index, and the arena buffers made before it that ops from
        it on read (the graph input is the caller's and never stored)."""
        index = {op["name"]: i for i, op in enumerate(self.b.ops)}
        first = min(i for _t, i, _op, _w in self.trained)
        roots = {
            self.root[n]
            for op in self.b.ops[first:]
            for n in op["inputs"]
            if index[self.root[n]] < first and self.root[n] not in self.inputs
        }
        return first, sorted(roots, key=lambda r: self.offsets[r])

    def training_source(self) -> str:
        """QZO-FF in C (fwdgrad.edge.train): Philox z, perturbation, signs from loss_q, update."""
        tr = self.b.training
        n0 = len(self.consts)
        consts = []
        if tr["distribution"] == "qgaussian":
            consts.append(_array("uint32_t", "GAUSS_T", rng.gaussian_thresholds(tr["z_max"]), "z thresholds"))
        cases_z, cases_p, cases_u, sizes = [], [], [], []
        for t, i, _op, w in sorted(self.trained, key=lambda r: r[0]):
            spec = self.b.training["tensors"][t]
            eps = self.const("int64_t", f"t{t}_eps_q", self.arrays[spec["eps_q"]])
            um = self.const("int64_t", f"t{t}_umult", self.arrays[spec["update_mult"]])
            us = self.const("int64_t", f"t{t}_ushift", self.arrays[spec["update_shift"]])
            mask = "1"
            if spec.get("mask"):
                mask = (
                    "(int64_t)"
                    + self.const("uint8_t", f"t{t}_mask", self.arrays[spec["mask"]].astype(np.uint8))
                    + "[e]"
                )
            ne, nc = w.size, w.size // max(1, self.arrays[spec["eps_q"]].size)
            nu = w.size // max(1, self.arrays[spec["update_mult"]].size)
            ch_e = "0" if self.arrays[spec["eps_q"]].size == 1 else f"e / {nc}"
            ch_u = "0" if self.arrays[spec["update_mult"]].size == 1 else f"e / {nu}"
            sizes.append(str(ne))
            cases_p.append(f"""    if (t == {t}) {{
        for (e = 0; e < {ne}; e++) {{
            int64_t z = z_q(step, sample, {t}, e) * {mask};
            int64_t acc = (int64_t)op{i}_weight[e] * ONE_Q + sign * {eps}[{ch_e}] * z;
            int64_t v = shift_round(acc * P_MULT, P_N, sr_word(step, {2 * t}, {t}, e));
            op{i}_pert[e] = clip(v, {spec["qmin"]}, {spec["qmax"]});
        }}
        op{i}_w = op{i}_pert;
    }}
""")
            cases_u.append(f"""    if (t == {t}) {{
        for (e = 0; e < {ne}; e++) {{
            int64_t sum = 0, g, upd;
            int i;
            for (i = 0; i < M_SAMPLES; i++) if (coeffs[i]) sum += coeffs[i] * z_q(step, i, {t}, e) * {mask};
            g = (sum < 0 ? -1 : sum > 0) * (((sum < 0 ? -sum : sum) * 2 + M_SAMPLES) / (2 * M_SAMPLES));
            g = clip(g, -127, 127);
            upd = shift_round(g * {um}[{ch_u}], 31 + {us}[{ch_u}], sr_word(step, {2 * t + 1}, {t}, e));
            op{i}_weight[e] = clip((int64_t)op{i}_weight[e] - upd, {spec["qmin"]}, {spec["qmax"]});
        }}
    }}
""")
            cases_z.append(f"    if (t == {t}) {{ op{i}_w = op{i}_weight; return; }}\n")
        ptrs = ", ".join(f"op{i}_weight" for _t, i, _op, _w in sorted(self.trained, key=lambda r: r[0]))
        seed = tr["seed"]
        first, roots = self.frontier()
        frontier_sizes = [self.env[r].nbytes for r in roots]
        self.prefix_bytes = self.prefix_samples * sum(frontier_sizes)
        self.sram += self.prefix_bytes
        return "#include <string.h>\n" + TRAIN.format(
            first=first,
            n_ops=len(self.b.ops),
            frontier_bytes=sum(frontier_sizes),
            prefix_samples=self.prefix_samples,
            frontier_offsets=", ".join(str(self.offsets[r]) for r in roots) or "0",
            frontier_sizes=", ".join(map(str, frontier_sizes)) or "0",
            consts="".join(consts) + "".join(self.consts[n0:]),
            seed_lo=seed & 0xFFFFFFFF,
            seed_hi=seed >> 32,
            one_q=tr["one_q"],
            z_max=tr["z_max"],
            gaussian=int(tr["distribution"] == "qgaussian"),
            rounding={"nearest": 0, "floor": 1, "stochastic": 2}[tr["rounding"]],
            p_mult=tr["perturb"]["mult"],
            p_n=tr["perturb"]["n"],
            m=tr["m"],
            step=tr["step"],
            sr=SR_STREAM,
            n_t=len(self.trained),
            perturb="".join(cases_p),
            restore="".join(cases_z),
            update="".join(cases_u),
            ptrs=ptrs,
            sizes=", ".join(sizes),
        )


def generate_c(
    bundle: Bundle, out_dir, input_shape=None, name: str = "model", prefix_samples: int = 32
) -> dict:
    """Write ``<name>.h`` and ``<name>.c`` for `bundle` into `out_dir`; returns {"header", "source",
    "arena_bytes", "flash_bytes", "sram_bytes", "prefix_bytes"} (flash: the const arrays' payload; SRAM: the
    arena, the trainable weights and their perturbed copy, the prefix store). `input_shape`: one sample's
    shape (C, H, W), needed when the bundle declares none (``preprocessing.shape``). `prefix_samples`: how
    many samples' frontier (the values the frozen layers before the first trained one leave) the prefix
    store of `train_step` holds; a larger batch runs in chunks of that many."""
    if not (isinstance(prefix_samples, int) and prefix_samples >= 1):
        raise CExportError(f"prefix_samples={prefix_samples!r} is invalid; allowed: an integer >= 1")
    unsupported = sorted({f"{op['name']} ({op['kind']})" for op in bundle.ops if op["kind"] not in SUPPORTED})
    if unsupported:
        raise CExportError(
            f"cannot export to C: unsupported op(s) {', '.join(unsupported)}; "
            f"the C runtime covers {', '.join(SUPPORTED)}"
        )
    difference = bundle.training.get("difference", "sign")
    if difference != "sign":
        raise CExportError(
            f"cannot export to C: training.difference={difference!r}; the C runtime decides sign-m-SPSA's "
            "signs; allowed: 'sign' (the numpy runtime runs the median difference)"
        )
    target = bundle.training.get("target", "weights")
    if target != "weights":
        raise CExportError(
            f"cannot export to C: training.target={target!r}; the C runtime perturbs weights; allowed: "
            "'weights' (the numpy runtime runs perturbed outputs)"
        )
    layerwise = bundle.training.get("layerwise", "off")
    if layerwise != "off":
        raise CExportError(
            f"cannot export to C: training.layerwise={layerwise!r}; the C runtime trains every tensor each "
            "step; allowed: 'off' (the numpy runtime runs layer-wise training)"
        )
    shape = input_shape or (bundle.header.get("preprocessing") or {}).get("shape")
    if shape is None:
        raise CExportError(
            "cannot export to C: the bundle declares no input shape; pass input_shape=(C, H, W)"
        )
    gen = _Gen(bundle, tuple(shape))
    gen.spec = output_spec(bundle.header, bundle.ops)
    gen.prefix_samples = prefix_samples
    header, source = gen.source(f"{name}.h")
    os.makedirs(out_dir, exist_ok=True)
    paths = {"header": os.path.join(out_dir, f"{name}.h"), "source": os.path.join(out_dir, f"{name}.c")}
    for key, text in (("header", header), ("source", source)):
        with open(paths[key], "w") as f:
            f.write(text)
    return {
        **paths,
        "arena_bytes": gen.arena,
        "flash_bytes": gen.flash,
        "sram_bytes": gen.arena + gen.sram,
        "prefix_bytes": gen.prefix_bytes,
    }
