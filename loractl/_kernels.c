/* loractl's optional native kernels: a merge's element-wise pass and its receipt in one sweep.
 *
 * Built by setup.py as an optional extension (the package works without it: loractl/native.py falls
 * back to the same arithmetic in torch and numpy) and called through ctypes, which lets go of the GIL.
 * Nothing here decides a result the torch path would not: every function computes, bit for bit, what
 * the torch operations it replaces compute (tests/ops/test_native.py compares the two on every rounding
 * case). Compile without -ffast-math and without FMA contraction: the sums must be IEEE's, one rounding
 * each.
 *
 * The merge of one block, for a base block w (bfloat16 or float32) and a float32 update d:
 *   m = round(w + d)                         what torch's ``W += ΔW`` writes (promoted to float32,
 *                                            added, rounded once to W's dtype)
 *   r = round(m - d)                         what an unmerge without the receipt computes
 * with ``round_d`` the update is first rounded to W's dtype (PEFT's ParamWrapper: Δ.to(W.dtype)).
 * ``out`` receives m (it may be ``w`` itself: each element is read before it is written). With
 * ``diffs``, every position where r's bits differ from w's is listed (its index, w's bits and r's), for
 * the receipt (loractl/ops/residual.py). Returns the number of such positions, or -1 as soon as a merged
 * value is NaN or infinite (``out`` is then partly written: the caller redoes the tensor another way).
 */
#include <stdint.h>
#include <string.h>

#ifndef LORACTL_SOURCE_SHA256
#define LORACTL_SOURCE_SHA256 "unknown"
#endif

/* the sha256 of this file as setup.py compiled it (loractl/native.py compares it with the file beside it) */
const char *loractl_source_sha256(void) { return LORACTL_SOURCE_SHA256; }

#define SUB 512 /* elements per sub-block: the vector pass, then the scan of its flags */

static inline float f_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t u_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* float32 -> bfloat16, round to nearest even, as c10::BFloat16 (NaN aside: a NaN result is refused) */
static inline uint16_t bf16_round(float f) {
    uint32_t u = u_of(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_widen(uint16_t h) { return f_of((uint32_t)h << 16); }

/* A receipt's corrections for the differences of one call, as loractl/ops/residual.py encodes them
 * (``encode_block``): for each difference after the first, the gap to the previous one (gap8; 255: the
 * gap is in gapbig), and for each the integer difference of the bits, original - reconstruction
 * (d8; -128: the original's bits are in valbig). info[0..3] receive the position of the first and of the
 * last difference and the sizes of gapbig and valbig; the number of differences is returned. gap8 has a
 * spare byte before it (gap8[-1] is written and ignored), gapbig and valbig room for one entry per
 * element. */

/* The flags ne[j .. j+63] (0 or 1 each) as the bits of one word: eight at a time by a multiplication that
 * moves byte b's low bit to bit 56+b, on little-endian machines; one at a time elsewhere. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define MASK64(NE, J, MASK)                                                                          \
    for (int b = 0; b < 64; b += 8) {                                                                \
        uint64_t word;                                                                               \
        memcpy(&word, (NE) + (J) + b, 8);                                                            \
        (MASK) |= ((word * 0x0102040810204080ull) >> 56) << b;                                       \
    }
#else
#define MASK64(NE, J, MASK)                                                                          \
    for (int b = 0; b < 64; b++) (MASK) |= (uint64_t)(NE)[(J) + b] << b;
#endif

/* The corrections of one sub-block, appended to the encoder's state (k, first, last, nbig, nval, kept in
 * locals). Its flags are visited 64 at a time, each set one by its lowest set bit, and encoded without a
 * branch that depends on the data (each value is stored unconditionally and its count raised by its
 * condition): at a few percent of positions differing, spread at random, a branch per flag or per
 * difference costs a misprediction each time and was most of the receipt's time. */
#define SCAN(NE, M, S, WL, RL, ITYPE)                                                                \
    for (int64_t j = 0; j < (M); j += 64) {                                                          \
        uint64_t mask = 0;                                                                           \
        MASK64(NE, j, mask)                                                                          \
        while (mask) {                                                                               \
            const int64_t t = j + __builtin_ctzll(mask), p = (S) + t;                                \
            mask &= mask - 1;                                                                        \
            const int64_t o = (ITYPE)(WL)[t], dd = o - (ITYPE)(RL)[t], g = p - last - 1;             \
            if (k == 0) first = p;                                                                   \
            gap8[k - 1] = (uint8_t)(g < 255 ? g : 255); /* k == 0: the spare byte gap8[-1] */         \
            gapbig[nbig] = g;                                                                        \
            nbig += (k > 0) & (g >= 255);                                                            \
            const int big = (dd < -127) | (dd > 127);                                                \
            d8[k] = (int8_t)(big ? -128 : dd);                                                       \
            valbig[nval] = (ITYPE)o;                                                                 \
            nval += big;                                                                             \
            last = p;                                                                                \
            k++;                                                                                     \
        }                                                                                            \
    }

static inline float f32_widen(uint32_t u) { return f_of(u); }
static inline uint32_t f32_round(float f) { return u_of(f); }

/* One merge loop per weight dtype, from its bits type T (ITYPE: signed, also valbig's type), its widening to
 * float32 and rounding back (WIDEN, ROUND), and its exponent mask (all ones: NaN or infinity). Per
 * sub-block: the vectorised pass, then the scan of its flags. The weights go through local copies: ``out``
 * may be ``w``, and the loop vectorises only without aliasing. */
#define MERGE_IMPL(NAME, T, ITYPE, WIDEN, ROUND, EXP)                                                \
    static inline __attribute__((always_inline)) int64_t NAME(                                        \
        const T *w, const float *d, T *out, int64_t n, const int round_d, const int diffs,            \
        uint8_t *gap8, int8_t *d8, int64_t *gapbig, ITYPE *valbig, int64_t *info) {                   \
        T wl[SUB], rl[SUB], ml[SUB];                                                                  \
        uint8_t ne[SUB + 64];                                                                         \
        int64_t k = 0, first = -1, last = -1, nbig = 0, nval = 0;                                     \
        for (int64_t s = 0; s < n; s += SUB) {                                                        \
            const int64_t m = n - s < SUB ? n - s : SUB;                                              \
            uint32_t bad = 0;                                                                         \
            memcpy(wl, w + s, (size_t)m * sizeof(T));                                                 \
            for (int64_t i = 0; i < m; i++) {                                                         \
                const T wi = wl[i];                                                                   \
                float di = d[s + i];                                                                  \
                if (round_d) di = WIDEN(ROUND(di));                                                   \
                const T mo = ROUND(WIDEN(wi) + di);                                                   \
                bad |= (uint32_t)((mo & EXP) == EXP);                                                 \
                const T r = ROUND(WIDEN(mo) - di);                                                    \
                rl[i] = r;                                                                            \
                ne[i] = (uint8_t)(r != wi);                                                           \
                ml[i] = mo;                                                                           \
            }                                                                                         \
            if (bad) return -1;                                                                       \
            memcpy(out + s, ml, (size_t)m * sizeof(T));                                               \
            if (diffs) {                                                                              \
                memset(ne + m, 0, 64); /* the last word of flags, past the sub-block */               \
                SCAN(ne, m, s, wl, rl, ITYPE)                                                         \
            }                                                                                         \
        }                                                                                             \
        info[0] = first;                                                                              \
        info[1] = last;                                                                               \
        info[2] = nbig;                                                                               \
        info[3] = nval;                                                                               \
        return k;                                                                                     \
    }

MERGE_IMPL(merge_bf16_impl, uint16_t, int16_t, bf16_widen, bf16_round, 0x7F80u)
MERGE_IMPL(merge_f32_impl, uint32_t, int32_t, f32_widen, f32_round, 0x7F800000u)

/* AVX-512 (x86-64-v4: F, BW, DQ, VL, CD; Skylake-SP and every later Xeon) needs GCC 12 to be named by its
 * level; "arch=skylake-avx512" would ask for that very model and not run on later ones */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && (defined(__x86_64__) || defined(__i386__))
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

CLONES int64_t loractl_merge_bf16(const uint16_t *w, const float *d, uint16_t *out, int64_t n, int32_t round_d,
                                  int32_t diffs, uint8_t *gap8, int8_t *d8, int64_t *gapbig, int16_t *valbig,
                                  int64_t *info) {
    /* the flags as constants, so each variant's loop is compiled (and vectorised) on its own */
    if (round_d)
        return diffs ? merge_bf16_impl(w, d, out, n, 1, 1, gap8, d8, gapbig, valbig, info)
                     : merge_bf16_impl(w, d, out, n, 1, 0, gap8, d8, gapbig, valbig, info);
    return diffs ? merge_bf16_impl(w, d, out, n, 0, 1, gap8, d8, gapbig, valbig, info)
                 : merge_bf16_impl(w, d, out, n, 0, 0, gap8, d8, gapbig, valbig, info);
}

CLONES int64_t loractl_merge_f32(const uint32_t *w, const float *d, uint32_t *out, int64_t n, int32_t diffs,
                                 uint8_t *gap8, int8_t *d8, int64_t *gapbig, int32_t *valbig, int64_t *info) {
    return diffs ? merge_f32_impl(w, d, out, n, 0, 1, gap8, d8, gapbig, valbig, info)
                 : merge_f32_impl(w, d, out, n, 0, 0, gap8, d8, gapbig, valbig, info);
}

/* tensor_sum64 (loractl/io/receipt.py) of n little-endian 64-bit words whose first has index ``first``
 * (0-based): s[0] += Σ wᵢ, s[1] += Σ (first+i+1)·wᵢ, both mod 2⁶⁴. */
CLONES void loractl_sum64(const uint64_t *words, int64_t n, uint64_t first, uint64_t *s) {
    uint64_t s1 = 0, s2 = 0;
    for (int64_t i = 0; i < n; i++) {
        s1 += words[i];
        s2 += (first + (uint64_t)i + 1u) * words[i];
    }
    s[0] += s1;
    s[1] += s2;
}
