/* The counter-based perturbation sampler of fwdgrad.rng.reference in C, for the CPU: Philox4x32-10 keyed
 * by (seed, step, sample, tensor id), counter = (block index, tensor id, sample, step), four 32-bit words
 * per block in element order; then the 8-bit Gaussian threshold table, Rademacher or uniform levels.
 * Bit-identical with the numpy reference (tests/test_rng.py); built by fwdgrad/native.py. Blocks are
 * generated BATCH at a time in structure-of-arrays form so the compiler vectorizes the rounds. */
#include <stdint.h>

typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define BATCH 64

/* Words of blocks b0 .. b0+nb-1 (nb <= BATCH) into w[4*nb], element order. */
static void blocks(u64 b0, int nb, u32 c1, u32 c2, u32 c3, u32 key0, u32 key1, u32 *w) {
    u32 x0[BATCH], x1[BATCH], x2[BATCH], x3[BATCH];
    for (int i = 0; i < nb; i++) x0[i] = (u32)(b0 + i), x1[i] = c1, x2[i] = c2, x3[i] = c3;
    u32 k0 = key0, k1 = key1;
    for (int r = 0; r < 10; r++) {
        if (r) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
        for (int i = 0; i < nb; i++) {
            u64 p0 = (u64)0xD2511F53u * x0[i], p1 = (u64)0xCD9E8D57u * x2[i];
            u32 n0 = (u32)(p1 >> 32) ^ x1[i] ^ k0, n2 = (u32)(p0 >> 32) ^ x3[i] ^ k1;
            x1[i] = (u32)p1, x3[i] = (u32)p0, x0[i] = n0, x2[i] = n2;
        }
    }
    for (int i = 0; i < nb; i++) w[4 * i] = x0[i], w[4 * i + 1] = x1[i], w[4 * i + 2] = x2[i], w[4 * i + 3] = x3[i];
}

/* Run the statement `...` for every run of words: `ws`, the `cnt` words of elements offset+i .. (up to a
 * batch of Philox blocks at a time). */
#define WALK_RUNS(...)                                                                                     \
    u32 w[4 * BATCH];                                                                                      \
    i64 i = 0, last = offset + n - 1;                                                                      \
    while (i < n) {                                                                                        \
        i64 e = offset + i, b0 = e >> 2, nb_needed = (last >> 2) - b0 + 1;                                 \
        int nb = nb_needed < BATCH ? (int)nb_needed : BATCH, j0 = (int)(e & 3);                           \
        blocks((u64)b0, nb, c1, c2, c3, k0, k1, w);                                                        \
        i64 cnt = 4 * nb - j0 < n - i ? 4 * nb - j0 : n - i;                                               \
        const u32 *ws = w + j0;                                                                            \
        __VA_ARGS__;                                                                                       \
        i += cnt;                                                                                          \
    }

/* Run the statement `...` for every element offset .. offset+n-1 with its word `u` and output index `I`. */
#define WALK(...)                                                                                          \
    WALK_RUNS(for (i64 q = 0; q < cnt; q++) {                                                              \
        u32 u = ws[q];                                                                                     \
        i64 I = i + q;                                                                                     \
        __VA_ARGS__;                                                                                       \
    })

void fw_philox_words(u32 c1, u32 c2, u32 c3, u32 k0, u32 k1, i64 offset, i64 n, u32 *out) {
    WALK(out[I] = u)
}

/* z_q = (number of thresholds <= word) - 127 by the reference's two-level search, its bucket index as bytes
 * (64 KiB, where the int64 one is 512 KiB: it stays in cache between calls). Scalar on purpose: vectorized,
 * its table lookups become gathers, 2.5x slower here (AMD EPYC). */
__attribute__((optimize("no-tree-vectorize"))) static void gauss_words(const u32 *restrict ws, i64 cnt,
                                                                        const uint8_t *restrict base,
                                                                        const i64 *restrict padded, int span,
                                                                        int8_t *restrict o) {
    if (span == 1) { /* z_max up to about 4: one compare (2x faster than the loop below) */
        for (i64 q = 0; q < cnt; q++) {
            u32 u = ws[q];
            i64 b = base[u >> 16];
            o[q] = (int8_t)(b + (padded[b] <= (i64)u) - 127);
        }
        return;
    }
    for (i64 q = 0; q < cnt; q++) {
        u32 u = ws[q];
        i64 b = base[u >> 16], idx = b;
        for (int t = 0; t < span; t++) idx += padded[b + t] <= (i64)u;
        o[q] = (int8_t)(idx - 127);
    }
}

void fw_gaussian_q(u32 c1, u32 c2, u32 c3, u32 k0, u32 k1, i64 offset, i64 n, const uint8_t *base,
                   const i64 *padded, int span, int8_t *out) {
    WALK_RUNS(gauss_words(ws, cnt, base, padded, span, out + i)) /* the lookups in a loop of their own */
}

/* +one where bit 31 of the word is 0, -one where it is 1. */
void fw_rademacher_q(u32 c1, u32 c2, u32 c3, u32 k0, u32 k1, i64 offset, i64 n, int one, int8_t *out) {
    WALK(out[I] = (int8_t)((u >> 31) ? -one : one))
}

/* Uniform on -127..127: ((u * 255) >> 32) - 127. */
void fw_uniform_q(u32 c1, u32 c2, u32 c3, u32 k0, u32 k1, i64 offset, i64 n, int8_t *out) {
    WALK(out[I] = (int8_t)((i64)(((u64)u * 255u) >> 32) - 127))
}
