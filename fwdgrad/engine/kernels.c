/* fwdgrad's fused integer epilogues: one pass over the data where the eager torch path makes five to ten.
 *
 * Built at first use by fwdgrad/engine/kernels.py (cc -O3 -fno-trapping-math, no FP contraction) and called
 * through ctypes on contiguous buffers. Every function computes exactly the integers of the int64
 * reference in fwdgrad/quant.py and fwdgrad/engine/nodes.py; tests/test_kernels.py compares them bit for
 * bit. Values arrive as float32 (or float64) tensors holding exact integers: the accumulators of a
 * certified float kernel (fwdgrad/engine/intops.py) or stored activations.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef int64_t i64;
typedef __int128 i128;

enum { REQ_SINGLE = 0, REQ_GEMMLOWP = 1, REQ_FLOAT = 2 };

/* Fit an exact accumulator into `bits` (saturate or two's-complement wrap), counting misfits. */
static inline i64 fit(i64 a, i64 lo, i64 hi, int bits, int wrap, i64 *bad) {
    if (a >= lo && a <= hi) return a;
    (*bad)++;
    if (!wrap) return a < lo ? lo : hi;
    i64 span = (i64)1 << bits, r = (a - lo) % span;
    return (r < 0 ? r + span : r) + lo;
}

/* "single": floor((a·M + 2^(n-1)) / 2^n), n = 31 + shift; a left shift first when n < 0. */
static inline i64 req_single(i64 a, i64 m, int n) {
    if (n <= 0) return (i64)(((i128)a << -n) * m);
    return (i64)((((i128)a * m) + ((i128)1 << (n - 1))) >> n);
}

/* "gemmlowp": SaturatingRoundingDoublingHighMul then RoundingDivideByPOT (shift = n - 31). */
static inline i64 req_gemmlowp(i64 a, i64 m, int n) {
    int shift = n - 31, left = shift < 0 ? -shift : 0, right = shift > 0 ? shift : 0;
    i128 b = (i128)a << left;
    if (b > INT32_MAX) b = INT32_MAX;
    if (b < INT32_MIN) b = INT32_MIN;
    i64 prod = (i64)b * m;
    i64 nudge = prod >= 0 ? ((i64)1 << 30) : (1 - ((i64)1 << 30));
    i64 high = (prod + nudge) / ((i64)1 << 31); /* C division truncates toward zero */
    i64 mask = ((i64)1 << right) - 1, rem = high & mask, thr = (mask >> 1) + (high < 0);
    return (high >> right) + (rem > thr);
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Accumulators of one output row (one channel), planes recombined (Horner, top plane first). They are
 * exact integers in double: the kernel's certificate bounds them below 2^53. */
#define GATHER(T)                                                                                           \
    static inline void gather_##T(const T *src, i64 pstride, int planes, int bits, i64 inner, double *a) { \
        double base = (double)((i64)1 << bits);                                                            \
        for (i64 i = 0; i < inner; i++) a[i] = (double)src[(i64)(planes - 1) * pstride + i];                \
        for (int p = planes - 2; p >= 0; p--)                                                               \
            for (i64 i = 0; i < inner; i++) a[i] = a[i] * base + (double)src[p * pstride + i];             \
    }
GATHER(float)
GATHER(double)
GATHER(int32_t) /* int32 GEMMs: the int16 GEMM (one plane), _int_mm (planes) */

/* Bias, accumulator fit, requantization, zero point and clamp of one row of exact accumulators `a`. The
 * integer bias `b` joins the accumulator in every mode (with requant "float" the caller passes only a
 * kernel's own integer terms there, the layer's bias goes in float as `fbias`). */
static i64 finish_row(double *a, float *dst, i64 inner, i64 b, i64 m, int n, float fscale, const float *fbias,
                      float fout, i64 zp, i64 lo, i64 hi, int acc_bits, int wrap, int mode) {
    i64 alo = -((i64)1 << (acc_bits - 1)), ahi = ((i64)1 << (acc_bits - 1)) - 1, bad = 0;
    double dlo = (double)alo, dhi = (double)ahi, db = (double)b;
    for (i64 i = 0; i < inner; i++) {
        double v = a[i] + db;
        bad += (v < dlo) | (v > dhi);
        a[i] = v;
    }
    if (bad) { /* rare: refit the misfits exactly in int64 */
        i64 unused = 0;
        for (i64 i = 0; i < inner; i++)
            if (a[i] < dlo || a[i] > dhi) a[i] = (double)fit((i64)a[i], alo, ahi, acc_bits, wrap, &unused);
    }
    float flo = (float)lo, fhi = (float)hi, fzp = (float)zp;
    if (mode == REQ_FLOAT) { /* PyTorch x86: float32(acc)·s_acc + float bias, / s_out, half to even */
        for (i64 i = 0; i < inner; i++) {
            float v = (float)a[i] * fscale;
            if (fbias) v = v + *fbias;
            dst[i] = clampf(rintf(v / fout) + fzp, flo, fhi);
        }
        return bad;
    }
    /* "single" in float64 with M = M_hi·2^16 + M_lo: q = floor((a·M_lo + 2^(n-1)) / 2^16),
     * y = floor((a·M_hi + q) / 2^(n-16)); every intermediate is an integer below 2^52, hence exact. */
    if (mode == REQ_SINGLE && n >= 16 && n <= 52 && acc_bits <= 36 &&
        ldexp(1.0, acc_bits - 1 + 16) + ldexp(1.0, n - 1) < ldexp(1.0, 52)) {
        double mhi = (double)(m >> 16), mlo = (double)(m & 0xFFFF), half = ldexp(1.0, n - 1);
        double inv16 = ldexp(1.0, -16), inv = ldexp(1.0, -(n - 16)), dzp = (double)zp;
        double ylo = (double)lo, yhi = (double)hi;
        for (i64 i = 0; i < inner; i++) {
            double q = floor((a[i] * mlo + half) * inv16);
            double y = floor((a[i] * mhi + q) * inv) + dzp;
            dst[i] = (float)(y < ylo ? ylo : (y > yhi ? yhi : y));
        }
        return bad;
    }
    for (i64 i = 0; i < inner; i++) {
        i64 v = (i64)a[i];
        i64 y = (mode == REQ_SINGLE ? req_single(v, m, n) : req_gemmlowp(v, m, n)) + zp;
        dst[i] = (float)(y < lo ? lo : (y > hi ? hi : y));
    }
    return bad;
}

/* Output codes of a row as bytes (`out_u8`: an unsigned format of at most 8 bits, lo >= 0, hi <= 255):
 * the float32 codes the epilogue computed in a staging buffer, converted exactly. */
static inline void store_u8(const float *restrict y, uint8_t *restrict dst, i64 len) {
    for (i64 i = 0; i < len; i++) dst[i] = (uint8_t)(int32_t)y[i];
}

/* Epilogue of a conv/linear/avg-pool: recombine digit planes, add the int32 bias, fit the accumulator,
 * requantize, add the output zero point and clamp (fused activation). Layout of `acc`:
 * [outer][groups][planes][C/groups][inner] (planes stacked per group as extra output channels); `out` is
 * [outer][C][inner], float32 codes or with `out_u8` bytes. Per-channel constants have C entries. Returns
 * the number of accumulator misfits. */
#define EPILOGUE(NAME, T)                                                                                   \
    i64 NAME(const T *acc, void *out, i64 outer, int groups, int planes, int C, i64 inner, int digit_bits,  \
             const i64 *bias, const i64 *mult, const int *n, const float *fscale, const float *fbias,      \
             float fout, i64 zp, i64 lo, i64 hi, int acc_bits, int wrap, int mode, int out_u8,             \
             int nthreads) {                                                                                \
        int cg = C / groups;                                                                                \
        i64 bad = 0, rows = outer * C, block = 4096;                                                        \
        _Pragma("omp parallel for num_threads(nthreads) reduction(+ : bad) schedule(static) if(rows * inner > 65536)") \
        for (i64 r = 0; r < rows; r++) {                                                                    \
            double a[4096];                                                                                    \
            float yb[4096]; /* out_u8: the row's codes before they go out as bytes */                          \
            i64 o = r / C;                                                                                  \
            int c = (int)(r % C), g = c / cg, cc = c % cg;                                                  \
            const T *src = acc + (((o * groups + g) * planes) * cg + cc) * inner;                           \
            for (i64 i0 = 0; i0 < inner; i0 += block) {                                                    \
                i64 len = inner - i0 < block ? inner - i0 : block;                                          \
                float *dst = out_u8 ? yb : (float *)out + r * inner + i0;                                   \
                gather_##T(src + i0, (i64)cg * inner, planes, digit_bits, len, a);                         \
                bad += finish_row(a, dst, len, bias ? bias[c] : 0, mult[c], n[c], fscale[c],                \
                                  fbias ? fbias + c : 0, fout, zp, lo, hi, acc_bits, wrap, mode);           \
                if (out_u8) store_u8(yb, (uint8_t *)out + r * inner + i0, len);                             \
            }                                                                                               \
        }                                                                                                   \
        return bad;                                                                                         \
    }

EPILOGUE(fw_epilogue_f32, float)
EPILOGUE(fw_epilogue_f64, double)
EPILOGUE(fw_epilogue_i32, int32_t)

/* The same epilogue for channels-last accumulators (NHWC conv outputs, linear layers): `acc` is
 * [outer][groups][planes][C/groups] (groups 1 with a nonzero `offset`: [outer][planes·C + 1], the last entry
 * Σ_k (x_k - zp) of a ones channel, added offset times to every channel), `out` is [outer][C]. Work goes in
 * segments of at most SEG elements: SEG/C whole rows when C < SEG (so short rows of 16-64 channels still fill
 * the vector loops), else one row's SEG-channel chunk; per-channel constants are tiled over the segment.
 * `f64` says the float64 form of "single" is exact for every channel (n in 16..52, acc_bits small enough;
 * checked by the caller), with constants mhi/mlo/half/inv. */
#define SEG 1024

/* The vector loops of the channels-last epilogue, as functions so the compiler sees plain restrict loops. */
static inline i64 cl_bias_fit(double *restrict a, const double *restrict tb, int cnt, double dlo, double dhi) {
    i64 nbad = 0;
    for (int e = 0; e < cnt; e++) {
        double v = a[e] + tb[e];
        nbad += (v < dlo) | (v > dhi);
        a[e] = v;
    }
    return nbad;
}

static inline void cl_single_f64(const double *restrict a, const double *restrict ml, const double *restrict mh,
                                 const double *restrict hf, const double *restrict iv, float *restrict dst, int len,
                                 double dzp, double ylo, double yhi) {
    const double inv16 = 1.0 / 65536.0;
    for (int j = 0; j < len; j++) {
        double q = floor((a[j] * ml[j] + hf[j]) * inv16);
        double y = floor((a[j] * mh[j] + q) * iv[j]) + dzp;
        y = y < ylo ? ylo : y;
        y = y > yhi ? yhi : y;
        dst[j] = (float)y;
    }
}

/* PyTorch x86's output stage over a run: float32(acc)·s_acc + float bias, / s_out, half to even, clamped.
 * From the float64 accumulators, or straight from a kernel's values (float32(double(v)) == float32(v)). */
#define CL_FLOAT(T)                                                                                         \
    static inline void cl_float_##T(const T *restrict a, const float *restrict fs, const float *restrict fb, \
                                    float *restrict dst, int len, float fout, float fzp, float flo, float fhi) { \
        if (fb)                                                                                             \
            for (int j = 0; j < len; j++) dst[j] = clampf(rintf(((float)a[j] * fs[j] + fb[j]) / fout) + fzp, flo, fhi); \
        else                                                                                                \
            for (int j = 0; j < len; j++) dst[j] = clampf(rintf(((float)a[j] * fs[j]) / fout) + fzp, flo, fhi); \
    }
CL_FLOAT(float)
CL_FLOAT(double)
CL_FLOAT(int32_t)

#define CL_GATHER(T)                                                                                        \
    static inline void cl_gather_##T(const T *restrict src, i64 stride, int planes, int len, double base,  \
                                     double *restrict a) {                                                  \
        for (int j = 0; j < len; j++) a[j] = (double)src[(i64)(planes - 1) * stride + j];                   \
        for (int p = planes - 2; p >= 0; p--)                                                               \
            for (int j = 0; j < len; j++) a[j] = a[j] * base + (double)src[(i64)p * stride + j];            \
    }
CL_GATHER(float)
CL_GATHER(double)
CL_GATHER(int32_t) /* int32 GEMMs: the int16 GEMM (one plane), _int_mm (planes) */
#define EPILOGUE_CL(NAME, T)                                                                                \
    i64 NAME(const T *acc, void *out, i64 outer, int groups, int planes, int C, int digit_bits,            \
             const i64 *bias, const i64 *mult, const int *n, const double *mhi, const double *mlo,          \
             const double *half, const double *inv, const float *fscale, const float *fbias, float fout,    \
             i64 zp, i64 lo, i64 hi, int acc_bits, int wrap, int mode, int f64, int chunks, i64 offset,      \
             int out_u8, int fits, int nthreads) {                                                          \
        int cg = C / groups, chunk = C < SEG ? C : SEG, k = C < SEG ? SEG / C : 1;                         \
        i64 ld = (i64)planes * C + (offset != 0); /* a row: the planes, then the ones channel (offset) */  \
        i64 nchunks = (C + chunk - 1) / chunk, nblocks = ((outer + k - 1) / k) * nchunks, bad = 0;         \
        i64 alo = -((i64)1 << (acc_bits - 1)), ahi = ((i64)1 << (acc_bits - 1)) - 1;                       \
        double dlo = (double)alo, dhi = (double)ahi, base = (double)((i64)1 << digit_bits);                \
        double ylo = (double)lo, yhi = (double)hi, dzp = (double)zp;                                        \
        _Pragma("omp parallel num_threads(nthreads) reduction(+ : bad) if(outer * C > 65536)")             \
        {                                                                                                   \
            double a[SEG], tb[SEG], tmh[SEG], tml[SEG], thf[SEG], tiv[SEG];                                 \
            float tfs[SEG], tfb[SEG], ys[SEG]; /* ys (out_u8): the segment's codes before they go out as bytes */ \
            i64 off[SEG];                                                                                   \
            int tiled = -1; /* the chunk start c0 the tiled constants hold */                               \
            _Pragma("omp for schedule(static)")                                                             \
            for (i64 blk = 0; blk < nblocks; blk++) {                                                       \
                i64 o0 = (blk / nchunks) * k;                                                               \
                int c0 = (int)(blk % nchunks) * chunk;                                                      \
                int len = C - c0 < chunk ? C - c0 : chunk;                                                  \
                int rows = outer - o0 < k ? (int)(outer - o0) : k, cnt = rows * len;                        \
                if (tiled != c0) {                                                                          \
                    for (int e = 0; e < k * len; e++) {                                                     \
                        int c = c0 + e % len;                                                               \
                        tb[e] = bias ? (double)bias[c] : 0.0;                                               \
                        tmh[e] = mhi[c], tml[e] = mlo[c], thf[e] = half[c], tiv[e] = inv[c];                \
                        tfs[e] = fscale[c], tfb[e] = fbias ? fbias[c] : 0.0f;                               \
                    }                                                                                       \
                    for (int j = 0; j < len; j++) {                                                         \
                        int c = c0 + j, g = c / cg;                                                         \
                        off[j] = (i64)g * planes * cg + (c - g * cg);                                       \
                    }                                                                                       \
                    tiled = c0;                                                                             \
                }                                                                                           \
                int whole = len == C && planes == 1 && chunks == 1 && offset == 0; /* one run of input too */ \
                if (whole && fits && !bias && mode == REQ_FLOAT) { /* no misfit possible, no integer term */ \
                    float *dst = out_u8 ? ys : (float *)out + o0 * C;                                       \
                    cl_float_##T(acc + o0 * C, tfs, fbias ? tfb : 0, dst, cnt, fout, (float)zp, (float)lo, (float)hi); \
                    if (out_u8) store_u8(ys, (uint8_t *)out + o0 * C, cnt);                                 \
                    continue;                                                                               \
                }                                                                                           \
                if (whole) cl_gather_##T(acc + o0 * C, C, 1, cnt, base, a);                                  \
                for (int r = 0; r < rows * !whole; r++) {                                                   \
                    i64 o = o0 + r;                                                                         \
                    double *ar = a + r * len;                                                               \
                    if (chunks > 1) { /* fan-in chunks (groups 1): [chunks][planes][C], summed */          \
                        double tmp[SEG];                                                                    \
                        const T *row = acc + o * chunks * planes * C + c0;                                  \
                        cl_gather_##T(row, C, planes, len, base, ar);                                       \
                        for (int g = 1; g < chunks; g++) {                                                  \
                            cl_gather_##T(row + (i64)g * planes * C, C, planes, len, base, tmp);            \
                            for (int j = 0; j < len; j++) ar[j] += tmp[j];                                  \
                        }                                                                                   \
                    } else if (groups == 1 || planes == 1) {                                                \
                        cl_gather_##T(acc + o * ld + c0, C, planes, len, base, ar);                         \
                        if (offset) {                                                                       \
                            double s = (double)offset * (double)acc[o * ld + (i64)planes * C];              \
                            for (int j = 0; j < len; j++) ar[j] += s;                                       \
                        }                                                                                   \
                    } else { /* planes stacked per group: precomputed offsets of each channel's plane 0 */ \
                        const T *src = acc + o * ld;                                                        \
                        for (int j = 0; j < len; j++) ar[j] = (double)src[off[j] + (i64)(planes - 1) * cg]; \
                        for (int p = planes - 2; p >= 0; p--)                                               \
                            for (int j = 0; j < len; j++) ar[j] = ar[j] * base + (double)src[off[j] + (i64)p * cg]; \
                    }                                                                                       \
                }                                                                                           \
                i64 nbad = cl_bias_fit(a, tb, cnt, dlo, dhi);                                               \
                if (nbad) { /* rare: refit the misfits exactly in int64 */                                  \
                    i64 unused = 0;                                                                         \
                    for (int e = 0; e < cnt; e++)                                                           \
                        if (a[e] < dlo || a[e] > dhi) a[e] = (double)fit((i64)a[e], alo, ahi, acc_bits, wrap, &unused); \
                    bad += nbad;                                                                            \
                }                                                                                           \
                int fused = mode == REQ_FLOAT || (f64 && mode == REQ_SINGLE);                               \
                if (len == C && fused) { /* whole rows: the block is one run of `cnt` outputs */            \
                    float *dst = out_u8 ? ys : (float *)out + o0 * C;                                       \
                    if (mode == REQ_FLOAT)                                                                  \
                        cl_float_double(a, tfs, fbias ? tfb : 0, dst, cnt, fout, (float)zp, (float)lo, (float)hi); \
                    else                                                                                    \
                        cl_single_f64(a, tml, tmh, thf, tiv, dst, cnt, dzp, ylo, yhi);                      \
                    if (out_u8) store_u8(ys, (uint8_t *)out + o0 * C, cnt);                                 \
                } else {                                                                                    \
                    for (int r = 0; r < rows; r++) {                                                        \
                        const double *ar = a + r * len;                                                     \
                        float *dr = out_u8 ? ys : (float *)out + (o0 + r) * C + c0;                         \
                        if (mode == REQ_FLOAT) {                                                            \
                            cl_float_double(ar, tfs, fbias ? tfb : 0, dr, len, fout, (float)zp, (float)lo, (float)hi); \
                        } else if (f64 && mode == REQ_SINGLE) {                                             \
                            cl_single_f64(ar, tml, tmh, thf, tiv, dr, len, dzp, ylo, yhi);                  \
                        } else {                                                                            \
                            for (int j = 0; j < len; j++) {                                                 \
                                int c = c0 + j;                                                             \
                                i64 v = (i64)ar[j];                                                         \
                                i64 y = (mode == REQ_SINGLE ? req_single(v, mult[c], n[c])                  \
                                                            : req_gemmlowp(v, mult[c], n[c])) + zp;         \
                                dr[j] = (float)(y < lo ? lo : (y > hi ? hi : y));                           \
                            }                                                                               \
                        }                                                                                   \
                        if (out_u8) store_u8(dr, (uint8_t *)out + (o0 + r) * C + c0, len);                  \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        return bad;                                                                                         \
    }

EPILOGUE_CL(fw_epilogue_cl_f32, float)
EPILOGUE_CL(fw_epilogue_cl_f64, double)
EPILOGUE_CL(fw_epilogue_cl_i32, int32_t)

/* Residual add / one concat input: y = sat(((Σ_i (x_i - zp_i)·M_i) + 2^(S-1)) >> S) + zp_out). In float64
 * when every partial sum is an integer below 2^52 (`exact_f64`, checked by the caller), else in int64. With
 * k = 2 the second input may repeat with period `period` (a broadcast over leading dims, e.g. a ViT's
 * position embedding); otherwise period = count. Inputs are float32 codes, or all bytes (`in_u8`); the
 * output float32 codes, or bytes (`out_u8`: lo >= 0, hi <= 255). */
#define RESCALE_SEG 4096
#define RESCALE2(TI, TO)                                                                                    \
    static void rescale2_##TI##_##TO(const TI *x0, const TI *x1, double z0, double m0, double z1, double m1, \
                                     double dhalf, double inv, double dzp, double dlo, double dhi, TO *out, \
                                     i64 count, i64 period, int nthreads) {                                 \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (count > 65536)")              \
        for (i64 s = 0; s < count; s += RESCALE_SEG) {                                                      \
            i64 end = count - s < RESCALE_SEG ? count : s + RESCALE_SEG;                                    \
            for (i64 i = s; i < end;) { /* runs of x1 within one period */                                  \
                i64 j = i % period, run = end - i < period - j ? end - i : period - j;                      \
                const TI *a = x0 + i, *b = x1 + j;                                                          \
                TO *o = out + i;                                                                            \
                for (i64 t = 0; t < run; t++) {                                                             \
                    double v = (dhalf + ((double)a[t] - z0) * m0) + ((double)b[t] - z1) * m1;               \
                    double y = floor(v * inv) + dzp;                                                        \
                    o[t] = (TO)(y < dlo ? dlo : (y > dhi ? dhi : y));                                       \
                }                                                                                           \
                i += run;                                                                                   \
            }                                                                                               \
        }                                                                                                   \
    }
typedef uint8_t u8;
RESCALE2(float, float)
RESCALE2(float, u8)
RESCALE2(u8, float)
RESCALE2(u8, u8)

static inline double load_code(const void *x, int u8in, i64 i) {
    return u8in ? (double)((const uint8_t *)x)[i] : (double)((const float *)x)[i];
}

static inline void store_code(void *out, int u8out, i64 i, double y) {
    if (u8out)
        ((uint8_t *)out)[i] = (uint8_t)y;
    else
        ((float *)out)[i] = (float)y;
}

void fw_rescale_sum(const void **xs, int k, const i64 *zps, const i64 *mults, int shift, i64 zp_out, i64 lo,
                    i64 hi, void *out, i64 count, i64 period, int exact_f64, int in_u8, int out_u8,
                    int nthreads) {
    i64 half = (i64)1 << (shift - 1);
    double dhalf = (double)half, inv = ldexp(1.0, -shift), dzp = (double)zp_out, dlo = (double)lo,
           dhi = (double)hi;
    if (exact_f64 && k <= 2) { /* one or two inputs: loops without an inner one vectorize */
        double m0 = (double)mults[0], z0 = (double)zps[0];
        double m1 = k == 2 ? (double)mults[1] : 0.0, z1 = k == 2 ? (double)zps[1] : 0.0; /* k = 1: adds 0 */
        const void *x0 = xs[0], *x1 = xs[k - 1];
#define RESCALE2_CALL(TI, TO)                                                                                \
    rescale2_##TI##_##TO((const TI *)x0, (const TI *)x1, z0, m0, z1, m1, dhalf, inv, dzp, dlo, dhi, (TO *)out, \
                         count, period, nthreads)
        if (in_u8)
            out_u8 ? RESCALE2_CALL(u8, u8) : RESCALE2_CALL(u8, float);
        else
            out_u8 ? RESCALE2_CALL(float, u8) : RESCALE2_CALL(float, float);
        return;
    }
    if (exact_f64) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count > 65536)
        for (i64 i = 0; i < count; i++) {
            double a = dhalf;
            for (int j = 0; j < k; j++) a += (load_code(xs[j], in_u8, i) - (double)zps[j]) * (double)mults[j];
            double y = floor(a * inv) + dzp;
            store_code(out, out_u8, i, y < dlo ? dlo : (y > dhi ? dhi : y));
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count > 65536)
    for (i64 i = 0; i < count; i++) {
        i64 a = 0;
        for (int j = 0; j < k; j++) a += ((i64)load_code(xs[j], in_u8, i) - zps[j]) * mults[j];
        i64 y = ((a + half) >> shift) + zp_out;
        store_code(out, out_u8, i, (double)(y < lo ? lo : (y > hi ? hi : y)));
    }
}

/* Quantization of float32 inputs, as fwdgrad/quant.py quantize with round half to even and saturation:
 * sat((i64)rint((double)x / s) + zp) (the same float64 division and rounding; float32 codes out). */
void fw_quantize(const float *x, float *out, i64 count, double s, i64 zp, i64 qmin, i64 qmax, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count > 65536)
    for (i64 i = 0; i < count; i++) {
        i64 q = (i64)rint((double)x[i] / s) + zp;
        out[i] = (float)(q < qmin ? qmin : (q > qmax ? qmax : q));
    }
}

/* float32 codes (integers in [0, 255]) as bytes, element by element, each XORed with `flip` (128: the int8
 * u = x - 128 of `_int_mm`'s signed operand): exact, and one pass instead of torch's conversion. */
void fw_codes_u8(const float *x, uint8_t *out, i64 count, int flip, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count > 262144)
    for (i64 i = 0; i < count; i++) out[i] = (uint8_t)((int32_t)x[i] ^ flip);
}

/* Fake quantization (quantize-dequantize) in float32: ((clamp(rint(x / s) + z, lo, hi)) - z) · s. */
void fw_fake_quant(const float *x, float *out, i64 count, float s, float z, float lo, float hi, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count > 65536)
    for (i64 i = 0; i < count; i++) out[i] = (clampf(rintf(x[i] / s) + z, lo, hi) - z) * s;
}

/* ------------------------------------------------------------------------------------------ transformers */
static inline i64 isqrt64(i64 n) { /* floor(sqrt(n)), n < 2^52 (as fwdgrad/engine/transformer.py isqrt) */
    i64 r = (i64)floor(sqrt((double)n));
    if (r * r > n) r--;
    if ((r + 1) * (r + 1) <= n) r++;
    return r;
}

static inline i64 floor_div(i64 a, i64 b) { /* b > 0 */
    i64 q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* LayerNorm's integer normalisation per row of `dim` codes (QLayerNorm.normalized):
 * mu = floor((2*sum(q) + D) / 2D), c = q - mu, r = isqrt((sum(c^2) + v_eps) * D),
 * xhat = floor((2*c*D*2^frac + r) / 2r), written as exact float64 integers (times gamma[j] where given). */
void fw_ln_normalize(const float *x, double *out, i64 rows, int dim, i64 zp, int frac, i64 v_eps, const double *gamma,
                     int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 256)
    for (i64 row = 0; row < rows; row++) {
        const float *xr = x + row * dim;
        double *o = out + row * dim;
        i64 sum = 0, var = 0;
        for (int j = 0; j < dim; j++) sum += (i64)xr[j] - zp;
        i64 mu = floor_div(2 * sum + dim, 2 * (i64)dim);
        for (int j = 0; j < dim; j++) {
            i64 c = (i64)xr[j] - zp - mu;
            var += c * c;
        }
        i64 r = isqrt64((var + v_eps) * dim);
        /* |2*c*D*2^frac + r| < 2^52 (checked at conversion): float64 holds it, and the floor of the
         * correctly rounded quotient of two such integers is the exact floor division */
        double scale = (double)((i64)dim << frac) * 2.0, dr = (double)r, den = 2.0 * (double)r;
        double dmu = (double)(zp + mu);
        for (int j = 0; j < dim; j++) o[j] = floor((((double)xr[j] - dmu) * scale + dr) / den);
        if (gamma) /* γ_q·x̂: an integer below 2^31 (checked at conversion), exact */
            for (int j = 0; j < dim; j++) o[j] *= gamma[j];
    }
}

/* Integer softmax per row of n codes (QSoftmax): e = table[min(max - q, len - 1)], p = floor((2*e*levels +
 * sum e) / (2 * sum e)). */
void fw_softmax(const float *x, float *out, i64 rows, int n, const i64 *table, i64 len, i64 levels,
                int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 256)
    for (i64 row = 0; row < rows; row++) {
        const float *xr = x + row * n;
        float *o = out + row * n;
        float mx = xr[0];
        for (int j = 1; j < n; j++) mx = xr[j] > mx ? xr[j] : mx;
        i64 total = 0;
        for (int j = 0; j < n; j++) {
            i64 d = (i64)(mx - xr[j]);
            total += table[d < len - 1 ? d : len - 1];
        }
        /* 2*e*levels + total < 2^52 for P <= 30 and rows under 2^20 entries: exact as float64 (see
         * fw_ln_normalize) */
        double dl = 2.0 * (double)levels, dt = (double)total, den = 2.0 * (double)total;
        for (int j = 0; j < n; j++) {
            i64 d = (i64)(mx - xr[j]);
            o[j] = (float)floor(((double)table[d < len - 1 ? d : len - 1] * dl + dt) / den);
        }
    }
}

/* Lookup table over input codes (QLut): out = table[x - qmin]. */
void fw_lut(const float *x, float *out, i64 count, const float *table, i64 qmin, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count > 65536)
    for (i64 i = 0; i < count; i++) out[i] = table[(i64)x[i] - qmin];
}

/* ---------------------------------------------------------------------------------------------- weights */
static inline i64 load_int(const void *p, int bytes, i64 i) {
    return bytes == 1 ? ((const int8_t *)p)[i] : bytes == 2 ? ((const int16_t *)p)[i] : ((const int32_t *)p)[i];
}

static inline void store_int(void *p, int bytes, i64 i, i64 v) {
    if (bytes == 1) ((int8_t *)p)[i] = (int8_t)v;
    else if (bytes == 2) ((int16_t *)p)[i] = (int16_t)v;
    else ((int32_t *)p)[i] = (int32_t)v;
}

/* Digit d_q (q < planes-1) or top plane of v in base 2^b with digits in [-2^(b-1), 2^(b-1)):
 * d = ((rest + half) mod base) - half, rest = (rest - d) >> b. */
static inline void digits(i64 v, int planes, int b, i64 *d) {
    i64 mask = ((i64)1 << b) - 1, half = (i64)1 << (b - 1), rest = v;
    for (int q = 0; q < planes - 1; q++) { /* (rest + half) mod 2^b, two's complement */
        d[q] = ((rest + half) & mask) - half;
        rest = (rest - d[q]) >> b;
    }
    d[planes - 1] = rest;
}

/* The low digit of `digits` with two planes, in int32 (8/16-bit weights: |w - offset| < 2^17); the high one
 * is (v - d0) >> b. One expression, so the loops below that use it still vectorize. */
static inline int32_t low_digit(int32_t v, int32_t half, int32_t mask) { return ((v + half) & mask) - half; }

/* The two-plane digits of 8/16-bit weights, vectorizable (int32 lanes: |w - offset| < 2^17 and the digits
 * are those of `digits`): whether every digit lies in [lo, hi] and x_bound·Σ|d| < limit per plane, per
 * channel and fan-in chunk (the per-plane check of fw_plan_planes for p = 2). */
#define TWO_PLANES_OK(T)                                                                                      \
    static int two_planes_ok_##T(const T *w, i64 C, i64 K, int chunks, int b, i64 offset, i64 lo, i64 hi,    \
                                 i64 x_bound, i64 limit) {                                                    \
        i64 kg = K / chunks;                                                                                  \
        int32_t mask = (1 << b) - 1, half = 1 << (b - 1), off = (int32_t)offset;                             \
        int32_t lo32 = lo < -(1 << 20) ? -(1 << 20) : (int32_t)lo, hi32 = hi > (1 << 20) ? 1 << 20 : (int32_t)hi; \
        for (i64 c = 0; c < C; c++)                                                                           \
            for (int g = 0; g < chunks; g++) {                                                                \
                const T *row = w + c * K + g * kg;                                                            \
                i64 s0 = 0, s1 = 0;                                                                           \
                int32_t bad = 0;                                                                              \
                for (i64 k = 0; k < kg; k++) {                                                                \
                    int32_t v = (int32_t)row[k] - off, d0 = low_digit(v, half, mask), d1 = (v - d0) >> b;     \
                    s0 += d0 < 0 ? -d0 : d0;                                                                  \
                    s1 += d1 < 0 ? -d1 : d1;                                                                  \
                    bad |= (d0 < lo32) | (d0 > hi32) | (d1 < lo32) | (d1 > hi32);                             \
                }                                                                                             \
                if (bad || x_bound * s0 >= limit || x_bound * s1 >= limit) return 0;                          \
            }                                                                                                 \
        return 1;                                                                                             \
    }
TWO_PLANES_OK(int8_t)
TWO_PLANES_OK(int16_t)

/* The range an int8 kernel's digits of `fixed_bits` bits must stay in: [-2^(b-1), 2^(b-1)] capped at 127
 * (7-bit digits within ±64, 8-bit ones within [-128, 127]); unbounded for fixed_bits 0 (float planes). */
static void digit_range(int fixed_bits, i64 *lo, i64 *hi) {
    *lo = fixed_bits > 0 ? -((i64)1 << (fixed_bits - 1)) : INT64_MIN;
    *hi = fixed_bits > 0 ? ((i64)1 << (fixed_bits - 1)) : INT64_MAX;
    if (fixed_bits > 0 && *hi > 127) *hi = 127;
}

/* The certified digit-plane split of integer weights [C][K] minus `offset` (see fwdgrad/engine/intops.py:
 * each plane's x_bound·max_c Σ_k |d[c,k]| < 2^limit_bits: 24 for float32 sums, 31 for int32 ones), trying
 * 1..max_planes planes with the same digit widths as the torch path. With chunks > 1 the fan-in K is cut into
 * that many contiguous chunks (of input channels), each summed separately by the kernel, and the bound holds
 * per chunk. With fixed_bits > 0 the digits have that width and every plane must also satisfy
 * -2^(fixed_bits-1) <= d <= 2^(fixed_bits-1), capped at 127 (an int8 kernel's operand limit: 7-bit digits
 * stay within ±64, 8-bit ones within [-128, 127]). A nonzero `offset` splits w - offset (the kernel adds
 * offset·Σ_k (x_k - zp) from a ones channel): 16-bit weights up to 32767 then fit two 8-bit digits, whose
 * balanced range is [-32896, 32639]. Returns the number of planes (0: none certifies), with the digit bits in
 * *bits and the whole bound x_bound·max_c Σ|w| (of w itself) in *bound. */
int fw_plan_planes(const void *w, int wbytes, i64 C, i64 K, int chunks, i64 x_bound, int max_planes, int fixed_bits,
                   i64 offset, int limit_bits, int *bits, i64 *bound) {
    i64 limit = (i64)1 << limit_bits;
    i64 smax = 0, cmax = 0, amax = 0, vmin = 0, vmax = 0, kg = K / chunks;
    for (i64 c = 0; c < C; c++) {
        i64 s = 0;
        for (int g = 0; g < chunks; g++) {
            i64 sg = 0;
            for (i64 k = g * kg; k < (g + 1) * kg; k++) {
                i64 wk = load_int(w, wbytes, c * K + k), v = wk - offset, a = v < 0 ? -v : v;
                s += wk < 0 ? -wk : wk;
                sg += a;
                amax = a > amax ? a : amax;
                vmin = v < vmin ? v : vmin;
                vmax = v > vmax ? v : vmax;
            }
            cmax = sg > cmax ? sg : cmax;
        }
        smax = s > smax ? s : smax;
    }
    *bound = x_bound * smax;
    *bits = 0;
    i64 lo, hi;
    digit_range(fixed_bits, &lo, &hi);
    if (x_bound * cmax < limit && vmin >= lo && vmax <= hi) return 1;
    int nbits = 1;
    while ((amax >> nbits) > 0) nbits++;
    nbits += 1; /* signed */
    for (int p = 2; p <= max_planes; p++) {
        int b = fixed_bits > 0 ? fixed_bits : (nbits + p - 1) / p + 1, ok = 1;
        if (p == 2 && wbytes <= 2) { /* the common split, in int32 lanes */
            ok = wbytes == 1 ? two_planes_ok_int8_t(w, C, K, chunks, b, offset, lo, hi, x_bound, limit)
                             : two_planes_ok_int16_t(w, C, K, chunks, b, offset, lo, hi, x_bound, limit);
            if (ok) {
                *bits = b;
                return p;
            }
            continue;
        }
        for (i64 c = 0; c < C && ok; c++) {
            for (int g = 0; g < chunks && ok; g++) {
                i64 s[8] = {0}, d[8];
                for (i64 k = g * kg; k < (g + 1) * kg && ok; k++) {
                    digits(load_int(w, wbytes, c * K + k) - offset, p, b, d);
                    for (int q = 0; q < p; q++) {
                        s[q] += d[q] < 0 ? -d[q] : d[q];
                        ok &= d[q] >= lo && d[q] <= hi;
                    }
                }
                for (int q = 0; q < p; q++) ok &= x_bound * s[q] < limit;
            }
        }
        if (ok) {
            *bits = b;
            return p;
        }
    }
    return 0;
}

/* The planes of w - offset stacked as float32 (out_bytes 4) or int8 (out_bytes 1):
 * [groups][planes][C/groups][K] (one
 * kernel call runs them all), or with chunks > 1 (groups 1) [chunks][planes][C][K/chunks], the weight of
 * a conv grouped by fan-in chunk. */
#define FILL_FAST(T, O)                                                                                       \
    static void fill_fast_##T##_##O(const T *w, i64 C, i64 K, int planes, int b, i64 offset, O *out) {          \
        int32_t mask = (1 << b) - 1, half = 1 << (b - 1), off = (int32_t)offset;                             \
        for (i64 c = 0; c < C; c++) {                                                                         \
            const T *row = w + c * K;                                                                         \
            O *o0 = out + c * K, *o1 = out + (C + c) * K;                                                     \
            if (planes == 1)                                                                                  \
                for (i64 k = 0; k < K; k++) o0[k] = (O)((int32_t)row[k] - off);                                \
            else                                                                                              \
                for (i64 k = 0; k < K; k++) {                                                                 \
                    int32_t v = (int32_t)row[k] - off, d0 = low_digit(v, half, mask);                         \
                    o0[k] = (O)d0;                                                                            \
                    o1[k] = (O)((v - d0) >> b);                                                               \
                }                                                                                             \
        }                                                                                                     \
    }
FILL_FAST(int8_t, int8_t)
FILL_FAST(int8_t, float)
FILL_FAST(int16_t, int8_t)
FILL_FAST(int16_t, float)

void fw_fill_planes(const void *w, int wbytes, i64 C, i64 K, int groups, int chunks, int planes, int b, i64 offset,
                    void *out, int out_bytes) {
    i64 cg = C / groups, kg = K / chunks;
    if (wbytes <= 2 && planes <= 2 && chunks == 1 && groups == 1) { /* the common layouts, vectorizable */
        if (wbytes == 1 && out_bytes == 1) fill_fast_int8_t_int8_t(w, C, K, planes, b, offset, out);
        else if (wbytes == 1) fill_fast_int8_t_float(w, C, K, planes, b, offset, out);
        else if (out_bytes == 1) fill_fast_int16_t_int8_t(w, C, K, planes, b, offset, out);
        else fill_fast_int16_t_float(w, C, K, planes, b, offset, out);
        return;
    }
    for (i64 c = 0; c < C; c++) {
        i64 g = c / cg, cc = c % cg, d[8];
        for (i64 k = 0; k < K; k++) {
            i64 v = load_int(w, wbytes, c * K + k) - offset, ch = k / kg, kk = k - ch * kg;
            if (planes == 1) d[0] = v;
            else digits(v, planes, b, d);
            for (int q = 0; q < planes; q++) {
                i64 at = chunks > 1 ? ((ch * planes + q) * C + c) * kg + kk : ((g * planes + q) * cg + cc) * K + k;
                if (out_bytes == 4) ((float *)out)[at] = (float)d[q];
                else ((int8_t *)out)[at] = (int8_t)d[q];
            }
        }
    }
}

/* The int8 planes of w - offset as the columns of a GEMM (fwdgrad/engine/intmm.py): out[k][q·C + c], row
 * stride planes·C + ones, for weights [C][cin][khw] whose fan-in the GEMM takes in (kh, kw, cin) order
 * (im2col's: k = s·cin + ci), with `ones` a last column of 1s (the offset's channel). */
#define FILL_COLUMNS_FAST(T)                                                                                  \
    static void fill_columns_##T(const T *w, i64 C, i64 cin, i64 khw, int planes, int b, i64 offset, i64 ld,      \
                                 int8_t *out) {                                                               \
        int32_t mask = (1 << b) - 1, half = 1 << (b - 1), off = (int32_t)offset;                             \
        i64 K = cin * khw;                                                                                    \
        for (i64 sp = 0; sp < khw; sp++)                                                                      \
            for (i64 ci = 0; ci < cin; ci++) {                                                                \
                const T *src = w + ci * khw + sp;                                                             \
                int8_t *row = out + (sp * cin + ci) * ld;                                                     \
                for (i64 c = 0; c < C; c++) {                                                                 \
                    int32_t v = (int32_t)src[c * K] - off, d0 = planes == 1 ? v : low_digit(v, half, mask);   \
                    row[c] = (int8_t)d0;                                                                      \
                    if (planes == 2) row[C + c] = (int8_t)((v - d0) >> b);                                    \
                }                                                                                             \
            }                                                                                                 \
    }
FILL_COLUMNS_FAST(int8_t)
FILL_COLUMNS_FAST(int16_t)

void fw_fill_columns(const void *w, int wbytes, i64 C, i64 cin, i64 khw, int planes, int b, i64 offset, int ones,
                     int8_t *out) {
    i64 ld = planes * C + ones, K = cin * khw, d[8];
    if (ones)
        for (i64 k = 0; k < K; k++) out[k * ld + ld - 1] = 1;
    if (wbytes <= 2 && planes <= 2) { /* the common case, in int32 */
        if (wbytes == 1) fill_columns_int8_t(w, C, cin, khw, planes, b, offset, ld, out);
        else fill_columns_int16_t(w, C, cin, khw, planes, b, offset, ld, out);
        return;
    }
    for (i64 c = 0; c < C; c++)
        for (i64 ci = 0; ci < cin; ci++)
            for (i64 sp = 0; sp < khw; sp++) {
                digits(load_int(w, wbytes, c * K + ci * khw + sp) - offset, planes, b, d);
                int8_t *row = out + (sp * cin + ci) * ld + c;
                for (int q = 0; q < planes; q++) row[q * C] = (int8_t)d[q];
            }
}

/* round(prod / 2^n) as fwdgrad.ff.spaces.shift_round: rounding 0 nearest (half up), 1 floor, 2 stochastic
 * (adds the top n bits of the 32-bit hash word). */
static inline i64 shift_round(i64 prod, i64 n, int rounding, const i64 *words, i64 i) {
    if (rounding == 0) return (prod + ((i64)1 << (n - 1))) >> n;
    if (rounding == 1) return prod >> n;
    return (prod + (n <= 32 ? words[i] >> (32 - n) : words[i] << (n - 32))) >> n;
}

/* v clamped to [qmin, qmax], counting a clamp in *sat. */
static inline i64 saturate(i64 v, i64 qmin, i64 qmax, i64 *sat) {
    if (v >= qmin && v <= qmax) return v;
    ++*sat;
    return v < qmin ? qmin : qmax;
}

/* fw_perturb's one-term passes (nearest or floor rounding), in loops the compiler vectorizes. */
#define PERTURB_ONE(T)                                                                                        \
    static i64 perturb_one_##T(const T *w, i64 count, i64 per_channel, i64 one, const int8_t *z, const i64 *sizes, \
                               i64 mult, int n, int rounding, i64 qmin, i64 qmax, T *out) {                  \
        i64 sat = 0, channels = count / per_channel, half = rounding == 0 ? (i64)1 << (n - 1) : 0;           \
        for (i64 c = 0; c < channels; c++) {                                                                  \
            i64 sz = sizes[c];                                                                                \
            for (i64 i = c * per_channel; i < (c + 1) * per_channel; i++) {                                   \
                i64 r = (((i64)w[i] * one + sz * z[i]) * mult + half) >> n;                                   \
                sat += (r < qmin) | (r > qmax);                                                               \
                out[i] = (T)(r < qmin ? qmin : r > qmax ? qmax : r);                                          \
            }                                                                                                 \
        }                                                                                                     \
        return sat;                                                                                           \
    }
PERTURB_ONE(int8_t)
PERTURB_ONE(int16_t)

/* QZO-FF's perturbed weights of one pass: w± = sat(round((w·one + Σ_t size[t][c]·z_t) · M / 2^n)), channel
 * c = element / per_channel; rounding 0 nearest (half up), 1 floor, 2 stochastic (adds the top n bits of a
 * 32-bit hash word, as fwdgrad.ff.spaces.shift_round). Returns the number of saturated weights. */
static i64 perturb_pass(const void *w, int wbytes, i64 count, i64 per_channel, i64 one, int nterms, const int8_t **zs,
                        const i64 *sizes, i64 mult, int n, int rounding, const i64 *words, i64 qmin, i64 qmax,
                        void *out) {
    i64 sat = 0, channels = count / per_channel;
    if (nterms == 1 && rounding != 2 && wbytes <= 2) /* one term, nearest or floor: vectorizable */
        return wbytes == 1 ? perturb_one_int8_t(w, count, per_channel, one, zs[0], sizes, mult, n, rounding, qmin, qmax, out)
                           : perturb_one_int16_t(w, count, per_channel, one, zs[0], sizes, mult, n, rounding, qmin, qmax, out);
    for (i64 c = 0; c < channels; c++) {
        i64 sz[16];
        for (int t = 0; t < nterms; t++) sz[t] = sizes[t * channels + c];
        for (i64 i = c * per_channel; i < (c + 1) * per_channel; i++) {
            i64 acc = load_int(w, wbytes, i) * one;
            for (int t = 0; t < nterms; t++) acc += sz[t] * zs[t][i];
            i64 r = shift_round(acc * mult, n, rounding, words, i);
            store_int(out, wbytes, i, saturate(r, qmin, qmax, &sat));
        }
    }
    return sat;
}

/* perturb_pass for each of `passes` passes of one weight tensor (a step's 2m): pass p has nterms[p] terms,
 * whose z pointers follow those of the passes before it in zs, and the size table sizes[p] [terms][channels];
 * its weights go to outs[p], its saturations to sats[p]. */
void fw_perturb(const void *w, int wbytes, i64 count, i64 per_channel, i64 one, int passes, const int *nterms,
                const int8_t **zs, const i64 **sizes, i64 mult, int n, int rounding, const i64 *words, i64 qmin,
                i64 qmax, void **outs, i64 *sats) {
    for (int p = 0, first = 0; p < passes; first += nterms[p], p++)
        sats[p] = perturb_pass(w, wbytes, count, per_channel, one, nterms[p], zs + first, sizes[p], mult, n,
                               rounding, words, qmin, qmax, outs[p]);
}

/* Integer weights as float32 (fwdgrad.quant.dequantize with zero point 0): the float64 product
 * (double)w·scale[c] rounded once to float32, c = element / per_channel. */
#define DEQUANTIZE(T)                                                                                         \
    static void dequantize_##T(const T *w, i64 count, i64 per_channel, const double *scale, float *out) {   \
        for (i64 c = 0; c < count / per_channel; c++) {                                                       \
            double sc = scale[c];                                                                             \
            for (i64 i = c * per_channel; i < (c + 1) * per_channel; i++) out[i] = (float)((double)w[i] * sc); \
        }                                                                                                     \
    }
DEQUANTIZE(int8_t)
DEQUANTIZE(int16_t)
DEQUANTIZE(int32_t)

void fw_dequantize(const void *w, int wbytes, i64 count, i64 per_channel, const double *scale, float *out) {
    if (wbytes == 1) dequantize_int8_t(w, count, per_channel, scale, out);
    else if (wbytes == 2) dequantize_int16_t(w, count, per_channel, scale, out);
    else dequantize_int32_t(w, count, per_channel, scale, out);
}

/* fw_update (below) for nearest or floor rounding and 8/16-bit weights, in loops the compiler vectorizes. */
#define UPDATE_ROWS 1024 /* elements whose sums the vectorized update forms at a time */
#define UPDATE_FAST(T)                                                                                        \
    static i64 update_fast_##T(T *w, i64 count, i64 per_channel, int nz, const int8_t **zs,                \
                               const int8_t *signs, i64 m, const i64 *mult, const i64 *nshift, int rounding, \
                               i64 qmin, i64 qmax) {                                                          \
        i64 sat = 0, channels = count / per_channel;                                                          \
        double two_m = 2.0 * (double)m; /* floor((2a + m) / 2m) exactly: a quotient of small integers */     \
        int32_t s[UPDATE_ROWS];                                                                               \
        for (i64 c = 0; c < channels; c++) {                                                                  \
            i64 M = mult[channels > 1 ? c : 0], n = nshift[channels > 1 ? c : 0];                             \
            i64 half = rounding == 0 ? (i64)1 << (n - 1) : 0;                                                 \
            for (i64 i0 = c * per_channel; i0 < (c + 1) * per_channel; i0 += UPDATE_ROWS) {                   \
                i64 len = (c + 1) * per_channel - i0 < UPDATE_ROWS ? (c + 1) * per_channel - i0 : UPDATE_ROWS; \
                for (i64 i = 0; i < len; i++) s[i] = 0;                                                       \
                for (int j = 0; j < nz; j++) {                                                                \
                    const int8_t *z = zs[j] + i0;                                                             \
                    int32_t sg = signs[j];                                                                    \
                    for (i64 i = 0; i < len; i++) s[i] += sg * z[i];                                          \
                }                                                                                             \
                for (i64 i = 0; i < len; i++) {                                                               \
                    int32_t a = s[i] < 0 ? -s[i] : s[i];                                                      \
                    int32_t g = (int32_t)floor((double)(2 * a + m) / two_m);                                  \
                    g = g > 127 ? 127 : g;                                                                    \
                    g = s[i] < 0 ? -g : g;                                                                    \
                    i64 r = ((i64)g * M + half) >> n, v = (i64)w[i0 + i] - r;                                  \
                    sat += (v < qmin) | (v > qmax);                                                           \
                    w[i0 + i] = (T)(v < qmin ? qmin : v > qmax ? qmax : v);                                    \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        return sat;                                                                                           \
    }
UPDATE_FAST(int8_t)
UPDATE_FAST(int16_t)

/* QZO-FF's fixed-point update of integer weights w (in place) from the step's m perturbations: s = Σ_j c_j z_j
 * over the nz samples with c_j = signs[j] = ±1 (the others have c = 0), g = sign(s)·floor((2|s| + m) / 2m)
 * clamped to ±127, r = round(g·M_c / 2^n_c) (nearest: + 2^(n-1); floor; stochastic: + the word's top n
 * bits), w <- sat(w - r); as fwdgrad/ff/spaces.py FixedPointSpace.update (1 <= n_c <= 62). Returns the
 * number of saturated weights. */
i64 fw_update(void *w, int wbytes, i64 count, i64 per_channel, int nz, const int8_t **zs, const int8_t *signs, i64 m,
              const i64 *mult, const i64 *nshift, int rounding, const i64 *words, i64 qmin, i64 qmax) {
    if (wbytes <= 2 && rounding != 2 && nz <= 1 << 20) /* nearest or floor, 8/16-bit weights: vectorizable */
        return wbytes == 1 ? update_fast_int8_t(w, count, per_channel, nz, zs, signs, m, mult, nshift, rounding, qmin, qmax)
                           : update_fast_int16_t(w, count, per_channel, nz, zs, signs, m, mult, nshift, rounding, qmin, qmax);
    i64 sat = 0, channels = count / per_channel;
    for (i64 c = 0; c < channels; c++) {
        i64 M = mult[channels > 1 ? c : 0], n = nshift[channels > 1 ? c : 0];
        for (i64 i = c * per_channel; i < (c + 1) * per_channel; i++) {
            i64 sum = 0;
            for (int j = 0; j < nz; j++) sum += signs[j] * zs[j][i];
            i64 a = sum < 0 ? -sum : sum, g = (2 * a + m) / (2 * m);
            if (g > 127) g = 127;
            if (sum < 0) g = -g;
            i64 r = shift_round(g * M, n, rounding, words, i);
            store_int(w, wbytes, i, saturate(load_int(w, wbytes, i) - r, qmin, qmax, &sat));
        }
    }
    return sat;
}

/* ------------------------------------------------------------------------------------------ int16 GEMM */
/* acc[m][n] = sum_k (x[m][k] - zp)·w[n][k] in int32, for codes |x - zp| <= 32767 and int8/int16 weights whose
 * certificate x_bound·max_n sum_k |w[n][k]| < 2^31 the caller checked: every partial sum of integers is then
 * below 2^31, so int32 arithmetic (AVX2 vpmaddwd: two int16 products summed into an int32 lane; AVX-512
 * VNNI vpdpwssd: the same, accumulated) is exact whatever the order. Weights are packed once into panels of
 * NR columns, [N/NR][K/2][NR][2] (odd K and the last panel padded with zeros); rows go MR at a time, their
 * int16 pairs packed into int32 words [K/2][MR]. */
#define GEMM_MR 6
#define GEMM_NR 16

void fw_pack_s16(const void *w, int wbytes, i64 N, i64 K, int16_t *out) {
    i64 k2 = (K + 1) / 2, panels = (N + GEMM_NR - 1) / GEMM_NR;
    memset(out, 0, (size_t)(panels * k2 * GEMM_NR * 2) * sizeof(int16_t));
    for (i64 n = 0; n < N; n++)
        for (i64 k = 0; k < K; k++)
            out[(((n / GEMM_NR) * k2 + k / 2) * GEMM_NR + n % GEMM_NR) * 2 + k % 2] = (int16_t)load_int(w, wbytes, n * K + k);
}

/* One MR x NR block over the whole fan-in: a = packed rows [k2][MR], b = one weight panel [k2][NR][2]. */
static inline void gemm_block(const int32_t *restrict a, const int16_t *restrict b, i64 k2, int32_t *restrict c) {
#ifdef __AVX2__
    __m256i acc[GEMM_MR][2];
    for (int r = 0; r < GEMM_MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (i64 kk = 0; kk < k2; kk++) {
        __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + kk * 2 * GEMM_NR));
        __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + kk * 2 * GEMM_NR + 16));
        for (int r = 0; r < GEMM_MR; r++) {
            __m256i ar = _mm256_set1_epi32(a[kk * GEMM_MR + r]);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            acc[r][0] = _mm256_dpwssd_epi32(acc[r][0], ar, b0);
            acc[r][1] = _mm256_dpwssd_epi32(acc[r][1], ar, b1);
#else
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(ar, b0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(ar, b1));
#endif
        }
    }
    for (int r = 0; r < GEMM_MR; r++) {
        _mm256_storeu_si256((__m256i *)(c + r * GEMM_NR), acc[r][0]);
        _mm256_storeu_si256((__m256i *)(c + r * GEMM_NR + 8), acc[r][1]);
    }
#else
    for (int e = 0; e < GEMM_MR * GEMM_NR; e++) c[e] = 0;
    for (i64 kk = 0; kk < k2; kk++)
        for (int r = 0; r < GEMM_MR; r++) {
            int32_t pair = a[kk * GEMM_MR + r];
            int32_t a0 = (int16_t)(pair & 0xFFFF), a1 = (int16_t)((uint32_t)pair >> 16);
            for (int j = 0; j < GEMM_NR; j++)
                c[r * GEMM_NR + j] += a0 * b[(kk * GEMM_NR + j) * 2] + a1 * b[(kk * GEMM_NR + j) * 2 + 1];
        }
#endif
}

/* x: M rows of K float32 codes, row stride ldx; wp: fw_pack_s16's panels of N columns; acc: [M][N]. Rows go
 * MR at a time: (x − zp) packed as int16 pairs [K/2][MR] (rows past M and an odd K's last half are zeros),
 * then one MR x NR block per panel. */
void fw_gemm_s16(const float *x, i64 M, i64 K, i64 ldx, i64 zp, const int16_t *wp, i64 N, int32_t *acc,
                 int nthreads) {
    i64 k2 = (K + 1) / 2, panels = (N + GEMM_NR - 1) / GEMM_NR;
#pragma omp parallel num_threads(nthreads) if (M * N * K > (1 << 22))
    {
        int32_t *a = malloc((size_t)(k2 * GEMM_MR) * sizeof(int32_t)), c[GEMM_MR * GEMM_NR];
#pragma omp for schedule(static)
        for (i64 m0 = 0; m0 < M; m0 += GEMM_MR) {
            int rows = M - m0 < GEMM_MR ? (int)(M - m0) : GEMM_MR;
            for (int r = 0; r < GEMM_MR; r++) {
                const float *xr = x + (m0 + (r < rows ? r : 0)) * ldx;
                for (i64 kk = 0; kk < k2; kk++) {
                    int32_t lo = r < rows ? (int32_t)xr[2 * kk] - (int32_t)zp : 0;
                    int32_t hi = r < rows && 2 * kk + 1 < K ? (int32_t)xr[2 * kk + 1] - (int32_t)zp : 0;
                    a[kk * GEMM_MR + r] = (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
                }
            }
            for (i64 p = 0; p < panels; p++) {
                gemm_block(a, wp + p * k2 * GEMM_NR * 2, k2, c);
                int cols = N - p * GEMM_NR < GEMM_NR ? (int)(N - p * GEMM_NR) : GEMM_NR;
                for (int r = 0; r < rows; r++)
                    memcpy(acc + (m0 + r) * N + p * GEMM_NR, c + r * GEMM_NR, (size_t)cols * sizeof(int32_t));
            }
        }
        free(a);
    }
}

/* Int8 weights [rows][n / rows] into a packed buffer at their byte positions (`onednn.packed_layout`):
 * out[at[i]] = w[i]; with comp >= 0 also each row's -Σ w as an int32 at out + comp + 4·row (oneDNN's
 * zero-point compensation). */
void fw_scatter_i8(const int8_t *w, const int32_t *at, int8_t *out, i64 n, i64 rows, i64 comp) {
    for (i64 i = 0; i < n; i++) out[at[i]] = w[i];
    if (comp < 0) return;
    i64 k = n / rows;
    for (i64 r = 0; r < rows; r++) {
        int32_t sum = 0;
        for (i64 j = 0; j < k; j++) sum += w[r * k + j];
        sum = -sum;
        memcpy(out + comp + 4 * r, &sum, 4);
    }
}

/* The split of fw_fill_planes into one or two int8 planes (stacked [groups][planes][C/groups][K]) written
 * through an index: digit j of that stack goes to byte at[j] of dst (a kernel's packed weight layout, learnt
 * once per shape: fwdgrad/engine/onednn.py packed_layout, intmm.py columns_layout), with comp >= 0 each
 * stacked row's -Σ digits as int32 at byte comp + 4·row, and with rowsum each channel's Σ_k w (int64).
 * Certified as fw_plan_planes: every digit in [lo, hi] and x_bound·Σ_k |d| < 2^limit_bits per plane and
 * channel. Returns the bound x_bound·max_c Σ_k |w| (as fw_plan_planes), or -1 when the split does not
 * certify (dst then holds some of its digits: a later split rewrites them all). */
#define SPLIT_ROWS 16 /* rows split before their digits are written: the rows of one cache line of a blocked layout */
#define SPLIT_INTO(T, A) /* A: the accumulators' type (int32 while K < 2^16: |Σ w| < 2^31) */                 \
    static i64 split_into_##T##_##A(const T *w, i64 C, i64 K, int groups, int planes, int b, i64 offset,  \
                              i64 x_bound, i64 limit, i64 lo, i64 hi, const int32_t *at, int8_t *dst,         \
                              i64 comp, i64 *rowsum, int8_t *d0s, int8_t *d1s) {                              \
        int32_t mask = (1 << b) - 1, half = b > 0 ? 1 << (b - 1) : 0, off = (int32_t)offset;                 \
        int32_t lo32 = lo < -128 ? -128 : (int32_t)lo, hi32 = hi > 127 ? 127 : (int32_t)hi; /* int8 digits */ \
        i64 cg = C / groups, smax = 0, r0[SPLIT_ROWS];                                                        \
        for (i64 c0 = 0; c0 < C; c0 += SPLIT_ROWS) {                                                          \
            int rows = C - c0 < SPLIT_ROWS ? (int)(C - c0) : SPLIT_ROWS;                                      \
            for (int r = 0; r < rows; r++) {                                                                  \
                i64 c = c0 + r;                                                                               \
                const T *row = w + c * K;                                                                     \
                int8_t *e0 = d0s + r * K, *e1 = d1s + r * K;                                                  \
                int32_t bad = 0;                                                                              \
                A a0 = 0, a1 = 0, s0 = 0, s1 = 0, aw = 0, sw = 0;                                            \
                for (i64 k = 0; k < K; k++) { /* vectorizable: digits and sums */                             \
                    int32_t x = (int32_t)row[k], v = x - off;                                                 \
                    int32_t d0 = planes == 1 ? v : low_digit(v, half, mask), d1 = planes == 1 ? 0 : (v - d0) >> b; \
                    bad |= (d0 < lo32) | (d0 > hi32) | (d1 < lo32) | (d1 > hi32);                             \
                    e0[k] = (int8_t)d0;                                                                       \
                    e1[k] = (int8_t)d1;                                                                       \
                    a0 += d0 < 0 ? -d0 : d0;                                                                  \
                    a1 += d1 < 0 ? -d1 : d1;                                                                  \
                    s0 += d0;                                                                                 \
                    s1 += d1;                                                                                 \
                    aw += x < 0 ? -x : x;                                                                     \
                    sw += x;                                                                                  \
                }                                                                                             \
                if (bad || x_bound * (i64)a0 >= limit || x_bound * (i64)a1 >= limit) return -1;               \
                smax = aw > smax ? aw : smax;                                                                 \
                if (rowsum) rowsum[c] = sw;                                                                   \
                r0[r] = (c / cg) * planes * cg + c % cg; /* the stacked row of its low digit; + cg: high */   \
                if (comp >= 0) {                                                                              \
                    int32_t n0 = (int32_t)-s0, n1 = (int32_t)-s1;                                             \
                    memcpy(dst + comp + 4 * r0[r], &n0, 4);                                                   \
                    if (planes == 2) memcpy(dst + comp + 4 * (r0[r] + cg), &n1, 4);                           \
                }                                                                                             \
            }                                                                                                 \
            for (int q = 0; q < planes; q++) /* k outer: neighbouring rows' digits share cache lines */       \
                for (i64 k = 0; k < K; k++)                                                                   \
                    for (int r = 0; r < rows; r++)                                                            \
                        dst[at[(r0[r] + q * cg) * K + k]] = (q ? d1s : d0s)[r * K + k];                       \
        }                                                                                                     \
        return x_bound * smax;                                                                                \
    }
SPLIT_INTO(int8_t, int32_t)
SPLIT_INTO(int16_t, int32_t)
SPLIT_INTO(int8_t, i64)
SPLIT_INTO(int16_t, i64)

/* split_into of nw weight tensors of one shape ws[i] into dsts[i], digits of `fixed_bits` bits (digit_range):
 * bounds[i] the bound or -1, with rowsums [nw][C] each channel's Σ_k w. */
void fw_split_into(const void **ws, int nw, int wbytes, i64 C, i64 K, int groups, int planes, int b, i64 offset,
                   i64 x_bound, int limit_bits, int fixed_bits, const int32_t *at, int8_t **dsts, i64 comp,
                   i64 *rowsums, i64 *bounds) {
    int8_t *buf = (wbytes == 1 || wbytes == 2) && planes >= 1 && planes <= 2 && (planes == 1 || (b >= 1 && b <= 8))
                      ? malloc(2 * SPLIT_ROWS * K)
                      : NULL;
    i64 limit = (i64)1 << limit_bits, lo, hi;
    digit_range(fixed_bits, &lo, &hi);
    for (int i = 0; i < nw; i++) {
        i64 *rowsum = rowsums ? rowsums + i * C : NULL;
#define SPLIT_CALL(T, A) \
    split_into_##T##_##A(ws[i], C, K, groups, planes, b, offset, x_bound, limit, lo, hi, at, dsts[i], comp, rowsum, \
                         buf, buf + SPLIT_ROWS * K)
        if (!buf) bounds[i] = -1;
        else if (K < 1 << 16) bounds[i] = wbytes == 1 ? SPLIT_CALL(int8_t, int32_t) : SPLIT_CALL(int16_t, int32_t);
        else bounds[i] = wbytes == 1 ? SPLIT_CALL(int8_t, i64) : SPLIT_CALL(int16_t, i64);
#undef SPLIT_CALL
    }
    free(buf);
}
