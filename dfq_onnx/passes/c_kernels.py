"""Kernel families of the generated C library, chosen by the preprocessor when it is compiled.

    DFQ_SIMD 3  x86 AVX512-VNNI (with AVX512BW/VL): vpdpbusd on 512-bit vectors, 16 pixels a vector
    DFQ_SIMD 2  x86 AVX2: 256-bit vectors, 8 pixels; vpdpbusd where AVX-VNNI is there, else the codes
                widened to int16 pairs and vpmaddwd (exact: no int16 saturation, unlike vpmaddubsw)
    DFQ_SIMD 1  ARM NEON with the dot product extension (sdot): 128-bit vectors, 4 pixels
    DFQ_SIMD 0  portable C99 (the per-layer kernels of emit_c.py); forced by -D<PREFIX>_PORTABLE, and
                by -D<PREFIX>_SMALL (DFQ_SMALL: convolutions and Gemm by one shared kernel, dfq_conv)

The SIMD families share one matrix-product microkernel (dfq_mm) for pointwise convolutions and
convolutions by patch rows: out[c, p] = bias[c] + sum_k w[c, k] x[k, p] over a tile of MT output
channels x NV vectors of pixels, K consumed 4 codes at a time (one 32-bit lane holds a pixel's 4
consecutive codes; one dot-product instruction adds 4 products per lane), then requantized in
registers (the rounding shift of emit_c's runtime, lane-wise) and stored as codes.

Operand layouts, written by the generator (weights, static const) or by the kernel (activations):
  weights  [C/8][K/4][8][4] int8 (channels and K padded with zero codes);
  codes    [K/4][Ppad][4], gathered per step from the NCHW tensor (or from patch rows) into the
           scratch; or, for a direct convolution, [cin/4][phases][Q][4] phase planes of the padded
           input that each K step reads at its own offset (dfq_mm_t.koff); x86 takes them unsigned (int8 codes + 128, the weight sums times 128 taken off
           the bias), ARM signed (uint8 codes - 128, the weight sums times 128 added to the bias) --
           the offset trick of XNNPACK; the int32 sums are exact: the dot products wrap like the
           portable path's additions would not, and the true sum is proven to fit int32 (quantized.py),
           so the wrapped sums are the true sums.
"""
from __future__ import annotations

import numpy as np

MB = 8   # output channels of the packed weight blocks


def pack_weights(w: np.ndarray) -> tuple[np.ndarray, int]:
    """[C, K] int8 codes -> ([C/8][K/4][8][4] int8, K/4)."""
    c, k = w.shape
    cp, k4 = -(-c // MB) * MB, -(-k // 4)
    p = np.zeros((cp, k4 * 4), np.int64)
    p[:c, :k] = w
    return p.reshape(cp // MB, MB, k4, 4).transpose(0, 2, 1, 3).reshape(-1), k4


def offset_biases(w: np.ndarray, bias, signed_input: bool) -> tuple[np.ndarray, np.ndarray]:
    """Biases with the input offset of each family folded in, padded to whole blocks of 8 channels,
    as int32 (wrapped mod 2^32 like the dot products; see the module docstring):
    (x86: inputs taken as unsigned codes, ARM: inputs taken as signed codes)."""
    c = w.shape[0]
    cp = -(-c // MB) * MB
    b = np.zeros(cp, np.int64)
    if bias is not None:
        b[:c] = np.asarray(bias, np.int64)
    sums = np.zeros(cp, np.int64)
    sums[:c] = np.asarray(w, np.int64).reshape(c, -1).sum(axis=1)
    x86 = b - 128 * sums if signed_input else b
    arm = b if signed_input else b + 128 * sums
    wrap = lambda v: ((v + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int64)  # noqa: E731
    return wrap(x86), wrap(arm)


def select(prefix_upper: str) -> str:
    """The preprocessor lines choosing the family (before any constant that depends on it)."""
    P = prefix_upper
    return f"""/* Kernel family (see the header): -D{P}_PORTABLE forces the portable C99 kernels. */
#if defined({P}_SMALL)   /* -D{P}_SMALL: the portable family, layers sharing generic kernels */
#define DFQ_SMALL 1
#else
#define DFQ_SMALL 0
#endif
#if !defined({P}_PORTABLE) && !DFQ_SMALL && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DFQ_SIMD 3
#elif !defined({P}_PORTABLE) && !DFQ_SMALL && defined(__AVX2__)
#define DFQ_SIMD 2
#elif !defined({P}_PORTABLE) && !DFQ_SMALL && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define DFQ_SIMD 1
#else
#define DFQ_SIMD 0
#endif
#if DFQ_SIMD >= 2
#define DFQ_X86 1
#else
#define DFQ_X86 0
#endif
#if defined({P}_THREADS) && DFQ_SIMD && {P}_THREADS > 1
#define DFQ_THREADS {P}_THREADS   /* -D{P}_THREADS=N: big matrix products split over N pthreads */
#else
#define DFQ_THREADS 1
#endif
#ifdef {P}_THREAD_WORK
#define DFQ_THREAD_WORK {P}_THREAD_WORK  /* the least channels x K/4 x pixels worth threads */
#else
#define DFQ_THREAD_WORK 65536L
#endif
"""


# The shared SIMD runtime: inserted (under #if DFQ_SIMD) when a step uses dfq_mm.
SIMD_RUNTIME = r"""
#if DFQ_SIMD
#if DFQ_SIMD == 3
#include <immintrin.h>
typedef __m512i dfq_v;
#define DFQ_L 16
#define DFQ_MT 8
#define DFQ_NV 2   /* the microkernel is written for 2 */
#define dfq_zero() _mm512_setzero_si512()
#define dfq_set1(v) _mm512_set1_epi32(v)
#define dfq_loadx(p) _mm512_loadu_si512((const void *)(p))
#define dfq_add(a, b) _mm512_add_epi32(a, b)
#define dfq_and(a, b) _mm512_and_si512(a, b)
#define dfq_min(a, b) _mm512_min_epi32(a, b)
#define dfq_max(a, b) _mm512_max_epi32(a, b)
#define dfq_sra(a, s) _mm512_sra_epi32(a, _mm_cvtsi32_si128(s))
#define dfq_sll(a, s) _mm512_sll_epi32(a, _mm_cvtsi32_si128(s))
#define dfq_storei(p, v) _mm512_storeu_si512((void *)(p), v)
#define dfq_loadi(p) _mm512_loadu_si512((const void *)(p))
#define dfq_dot(a, x, w) _mm512_dpbusd_epi32(a, x, w)
static inline void dfq_store8(void *p, dfq_v v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(v)); }
static inline dfq_v dfq_load8(const void *p, int sgn) {
    __m128i t = _mm_loadu_si128((const __m128i *)p);
    return sgn ? _mm512_cvtepi8_epi32(t) : _mm512_cvtepu8_epi32(t);
}
#elif DFQ_SIMD == 2
#include <immintrin.h>
typedef __m256i dfq_v;
#define DFQ_L 8
#define DFQ_MT 4
#define DFQ_NV 2   /* the microkernel is written for 2 */
#define dfq_zero() _mm256_setzero_si256()
#define dfq_set1(v) _mm256_set1_epi32(v)
#define dfq_loadx(p) _mm256_loadu_si256((const __m256i *)(p))
#define dfq_add(a, b) _mm256_add_epi32(a, b)
#define dfq_and(a, b) _mm256_and_si256(a, b)
#define dfq_min(a, b) _mm256_min_epi32(a, b)
#define dfq_max(a, b) _mm256_max_epi32(a, b)
#define dfq_sra(a, s) _mm256_sra_epi32(a, _mm_cvtsi32_si128(s))
#define dfq_sll(a, s) _mm256_sll_epi32(a, _mm_cvtsi32_si128(s))
#define dfq_storei(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define dfq_loadi(p) _mm256_loadu_si256((const __m256i *)(p))
#if defined(__AVXVNNI__)
#define dfq_dot(a, x, w) _mm256_dpbusd_avx_epi32(a, x, w)
#else
/* u8 x s8, 4 per lane, exactly: even and odd codes widened to int16 (the u8 codes by masking or
   shifting, the s8 weights by sign-extending shifts), two vpmaddwd; no vpmaddubsw (its int16
   pair sums saturate) */
static inline dfq_v dfq_dot(dfq_v a, dfq_v x, dfq_v w) {
    const dfq_v lo = _mm256_set1_epi16(0xff);
    dfq_v xe = _mm256_and_si256(x, lo), xo = _mm256_srli_epi16(x, 8);
    dfq_v we = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8), wo = _mm256_srai_epi16(w, 8);
    return _mm256_add_epi32(a, _mm256_add_epi32(_mm256_madd_epi16(xe, we), _mm256_madd_epi16(xo, wo)));
}
#endif
static inline void dfq_store8(void *p, dfq_v v) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i t = _mm256_shuffle_epi8(v, pick);
    __m128i r = _mm_unpacklo_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    _mm_storel_epi64((__m128i *)p, r);
}
static inline dfq_v dfq_load8(const void *p, int sgn) {
    __m128i t = _mm_loadl_epi64((const __m128i *)p);
    return sgn ? _mm256_cvtepi8_epi32(t) : _mm256_cvtepu8_epi32(t);
}
#else
#include <arm_neon.h>
typedef int32x4_t dfq_v;
#define DFQ_L 4
#define DFQ_MT 8
#define DFQ_NV 2   /* the microkernel is written for 2 */
#define dfq_zero() vdupq_n_s32(0)
#define dfq_set1(v) vdupq_n_s32(v)
#define dfq_loadx(p) vreinterpretq_s32_s8(vld1q_s8((const int8_t *)(p)))
#define dfq_add(a, b) vaddq_s32(a, b)
#define dfq_and(a, b) vandq_s32(a, b)
#define dfq_min(a, b) vminq_s32(a, b)
#define dfq_max(a, b) vmaxq_s32(a, b)
#define dfq_sra(a, s) vshlq_s32(a, vdupq_n_s32(-(s)))
#define dfq_sll(a, s) vshlq_s32(a, vdupq_n_s32(s))
#define dfq_storei(p, v) vst1q_s32((int32_t *)(p), v)
#define dfq_loadi(p) vld1q_s32((const int32_t *)(p))
#define dfq_dot(a, x, w) vdotq_s32(a, vreinterpretq_s8_s32(x), vreinterpretq_s8_s32(w))
static inline void dfq_store8(void *p, dfq_v v) {
    int8x8_t t = vmovn_s16(vcombine_s16(vmovn_s32(v), vdup_n_s16(0)));
    int8_t b[8];
    vst1_s8(b, t);
    memcpy(p, b, 4);
}
static inline dfq_v dfq_load8(const void *p, int sgn) {
    unsigned char b[8] = {0};
    memcpy(b, p, 4);
    int16x8_t t = sgn ? vmovl_s8(vreinterpret_s8_u8(vld1_u8(b))) : vreinterpretq_s16_u16(vmovl_u8(vld1_u8(b)));
    return vmovl_s16(vget_low_s16(t));
}
#endif
#define DFQ_PT (DFQ_L * DFQ_NV)   /* pixels of a tile */
#if DFQ_X86
#define DFQ_FLIP(sgn) ((sgn) ? 0x80 : 0)    /* x86 reads codes unsigned */
#else
#define DFQ_FLIP(sgn) ((sgn) ? 0 : 0x80)    /* ARM reads codes signed */
#endif

/* One matrix-product step: the description the generator writes per layer. */
#if DFQ_X86
#define DFQ_MM_BIAS(x86, arm) (x86)
#else
#define DFQ_MM_BIAS(x86, arm) (arm)
#endif
#define DFQ_PPAD(P) (((P) + DFQ_PT - 1) / DFQ_PT * DFQ_PT)

typedef struct {
    int C, K4;                      /* output channels, K/4 */
    const int8_t *w;                /* [C/8][K4][8][4] */
    const int32_t *bias;            /* [C/8*8], the input offset folded in */
    const int8_t *shift;            /* [C] right shift (NULL: int32 sums out, unrounded) */
    const int8_t *acc_shift;        /* [C] or NULL */
    const int8_t *res_shift;        /* [C] or NULL (no residual) */
    int lo, hi;                     /* clamp */
    int out_signed, res_signed;     /* codes' types (1: int8, 0: uint8) */
    int ystride;                    /* elements between output (and residual) channels */
    int fast;                       /* every channel: shift > 0, res_shift >= 0 (requantized in registers) */
    const int32_t *koff;            /* NULL: K step k reads codes at k*Ppad*4; else at koff[k] (bytes, the
                                       direct convolution's tap and channel quad in its phase planes) */
    int wq, ow;                     /* wq > 0: pixel q is output (q / wq, q % wq), dropped where q % wq >= ow */
} dfq_mm_t;

/* A pixel's value past the fast path: emit_c's requantizer, element by element. */
static inline void dfq_mm_one(const dfq_mm_t *L, int c, int32_t v, const void *res, void *y) {
    if (L->res_shift) {
        if (L->acc_shift) v = v * (int32_t)(1u << L->acc_shift[c]);
        int32_t r = L->res_signed ? *(const int8_t *)res : *(const uint8_t *)res;
        v += dfq_align(r, L->res_shift[c]);
    }
    if (!L->shift) { memcpy(y, &v, 4); return; }
    v = dfq_requant(v, L->shift[c], L->lo, L->hi);
    if (L->out_signed) *(int8_t *)y = (int8_t)v; else *(uint8_t *)y = (uint8_t)v;
}

/* The segments of pixels [p, p + cnt) of a wide grid (L->wq > 0) that are outputs: calls
   f(i, n, o) for lanes [i, i + n) going to output pixels [o, o + n). */
#define DFQ_WIDE_SEGMENTS(L, p, cnt, BODY) { \
    int r_ = (p) / (L)->wq, col_ = (p) - r_ * (L)->wq, i_ = 0; \
    while (i_ < (cnt)) { \
        int n_ = (L)->wq - col_, m_ = (L)->ow - col_; \
        if (n_ > (cnt) - i_) n_ = (cnt) - i_; \
        if (m_ > n_) m_ = n_; \
        if (m_ > 0) { const int i = i_, n = m_; const size_t o = (size_t)r_ * (L)->ow + col_; BODY } \
        i_ += n_; col_ = 0; r_++; \
    } }

/* One vector of sums of channel c over pixels [p, p + cnt) of a wide grid: requantized (in
   registers where L->fast) and stored to the output pixels they are, the columns past ow dropped. */
static inline void dfq_mm_wide(const dfq_mm_t *L, int c, dfq_v v, int p, int cnt, const void *res, void *y) {
    const size_t cy = (size_t)c * L->ystride;
    unsigned char *yc = (unsigned char *)y;
    const unsigned char *rc = (const unsigned char *)res;
    if (L->fast) {
        unsigned char t[DFQ_L];
        if (L->res_shift) {
            unsigned char rb8[DFQ_L];
            memset(rb8, 0, sizeof rb8);
            DFQ_WIDE_SEGMENTS(L, p, cnt, memcpy(rb8 + i, rc + cy + o, (size_t)n);)
            if (L->acc_shift) v = dfq_sll(v, L->acc_shift[c]);
            v = dfq_add(v, dfq_sll(dfq_load8(rb8, L->res_signed), L->res_shift[c]));
        }
        const int s = L->shift[c];
        v = dfq_add(v, dfq_add(dfq_set1((int32_t)((1u << (s - 1)) - 1u)), dfq_and(dfq_sra(v, s), dfq_set1(1))));
        v = dfq_sra(v, s);
        v = dfq_min(dfq_max(v, dfq_set1(L->lo)), dfq_set1(L->hi));
        dfq_store8(t, v);
        DFQ_WIDE_SEGMENTS(L, p, cnt, memcpy(yc + cy + o, t + i, (size_t)n);)
    } else {
        int32_t t[DFQ_L];
        const int ob = L->shift ? 1 : 4;
        dfq_storei(t, v);
        DFQ_WIDE_SEGMENTS(L, p, cnt, for (int j = 0; j < n; j++)
            dfq_mm_one(L, c, t[i + j], res ? rc + cy + o + j : NULL, yc + (cy + o + j) * ob);)
    }
}

/* Output channels [c0, c1) (multiples of 8 but the last) of P pixels: xp the packed codes, y / res
   the output / residual (channel stride L->ystride, pixels contiguous). */
static inline void dfq_mm(const dfq_mm_t *L, const uint8_t *xp, int P, const void *res, void *y, int c0, int c1) {
    const int K4 = L->K4, Ppad = DFQ_PPAD(P), ys = L->ystride, ob = L->shift ? 1 : 4;
    for (int cb = c0; cb < c1; cb += DFQ_MT) {
        const int8_t *wb = L->w + (size_t)(cb / 8) * K4 * 32 + (cb % 8) * 4;
        const int mt = c1 - cb < DFQ_MT ? c1 - cb : DFQ_MT;
        for (int p0 = 0; p0 < P; p0 += DFQ_PT) {
            /* the tile's accumulators as named variables (kept in registers; gcc spills arrays) */
#define DFQ_INIT(m) dfq_v c##m##0 = dfq_set1(L->bias[cb + m]), c##m##1 = c##m##0;
#define DFQ_MAC(m) { int32_t w4_; memcpy(&w4_, wk + (m) * 4, 4); const dfq_v wv_ = dfq_set1(w4_); \
                     c##m##0 = dfq_dot(c##m##0, x0, wv_); c##m##1 = dfq_dot(c##m##1, x1, wv_); }
#if DFQ_SIMD == 2 && !defined(__AVXVNNI__)   /* codes split to even / odd int16 once per K step */
#undef DFQ_MAC
#define DFQ_MAC(m) { int32_t w4_; memcpy(&w4_, wk + (m) * 4, 4); const dfq_v wv_ = dfq_set1(w4_); \
                     const dfq_v we_ = _mm256_srai_epi16(_mm256_slli_epi16(wv_, 8), 8), wo_ = _mm256_srai_epi16(wv_, 8); \
                     c##m##0 = _mm256_add_epi32(c##m##0, _mm256_add_epi32(_mm256_madd_epi16(x0e, we_), _mm256_madd_epi16(x0o, wo_))); \
                     c##m##1 = _mm256_add_epi32(c##m##1, _mm256_add_epi32(_mm256_madd_epi16(x1e, we_), _mm256_madd_epi16(x1o, wo_))); }
#endif
#define DFQ_OUT(m) a[m][0] = c##m##0; a[m][1] = c##m##1;
            DFQ_INIT(0) DFQ_INIT(1) DFQ_INIT(2) DFQ_INIT(3)
#if DFQ_MT == 8
            DFQ_INIT(4) DFQ_INIT(5) DFQ_INIT(6) DFQ_INIT(7)
#endif
#if DFQ_SIMD == 2 && !defined(__AVXVNNI__)
#define DFQ_SPLIT const dfq_v lo8_ = _mm256_set1_epi16(0xff); \
                const dfq_v x0e = _mm256_and_si256(x0, lo8_), x0o = _mm256_srli_epi16(x0, 8); \
                const dfq_v x1e = _mm256_and_si256(x1, lo8_), x1o = _mm256_srli_epi16(x1, 8);
#else
#define DFQ_SPLIT
#endif
#if DFQ_MT == 8
#define DFQ_MACS DFQ_MAC(0) DFQ_MAC(1) DFQ_MAC(2) DFQ_MAC(3) DFQ_MAC(4) DFQ_MAC(5) DFQ_MAC(6) DFQ_MAC(7)
#else
#define DFQ_MACS DFQ_MAC(0) DFQ_MAC(1) DFQ_MAC(2) DFQ_MAC(3)
#endif
            const int8_t *wk = wb;
            if (L->koff) {   /* direct convolution: each K step at its own offset in the phase planes */
                const uint8_t *xq = xp + (size_t)p0 * 4;
                for (int k = 0; k < K4; k++, wk += 32) {
                    const uint8_t *xk = xq + L->koff[k];
                    const dfq_v x0 = dfq_loadx(xk), x1 = dfq_loadx(xk + DFQ_L * 4);
                    DFQ_SPLIT
                    DFQ_MACS
                }
            } else {
                const uint8_t *xk = xp + (size_t)p0 * 4;
                for (int k = 0; k < K4; k++, xk += (size_t)Ppad * 4, wk += 32) {
                    const dfq_v x0 = dfq_loadx(xk), x1 = dfq_loadx(xk + DFQ_L * 4);
                    DFQ_SPLIT
                    DFQ_MACS
                }
            }
            dfq_v a[DFQ_MT][DFQ_NV];
            DFQ_OUT(0) DFQ_OUT(1) DFQ_OUT(2) DFQ_OUT(3)
#if DFQ_MT == 8
            DFQ_OUT(4) DFQ_OUT(5) DFQ_OUT(6) DFQ_OUT(7)
#endif
            for (int m = 0; m < mt; m++) {
                const int c = cb + m;
                for (int n = 0; n < DFQ_NV; n++) {
                    const int p = p0 + n * DFQ_L;
                    if (p >= P) break;
                    const int cnt = P - p < DFQ_L ? P - p : DFQ_L;
                    const size_t at = (size_t)c * ys + p;
                    if (L->wq) {
                        dfq_mm_wide(L, c, a[m][n], p, cnt, res, y);
                    } else if (L->fast) {
                        dfq_v v = a[m][n];
                        if (L->res_shift) {
                            unsigned char rb8[DFQ_L];
                            const unsigned char *rp = (const unsigned char *)res + at;
                            if (cnt < DFQ_L) { memset(rb8, 0, sizeof rb8); memcpy(rb8, rp, (size_t)cnt); rp = rb8; }
                            if (L->acc_shift) v = dfq_sll(v, L->acc_shift[c]);
                            v = dfq_add(v, dfq_sll(dfq_load8(rp, L->res_signed), L->res_shift[c]));
                        }
                        const int s = L->shift[c];
                        v = dfq_add(v, dfq_add(dfq_set1((int32_t)((1u << (s - 1)) - 1u)),
                                               dfq_and(dfq_sra(v, s), dfq_set1(1))));
                        v = dfq_sra(v, s);
                        v = dfq_min(dfq_max(v, dfq_set1(L->lo)), dfq_set1(L->hi));
                        unsigned char *yp = (unsigned char *)y + at;
                        if (cnt == DFQ_L) {
                            dfq_store8(yp, v);
                        } else {
                            unsigned char t[DFQ_L];
                            dfq_store8(t, v);
                            memcpy(yp, t, (size_t)cnt);
                        }
                    } else {
                        int32_t t[DFQ_L];
                        dfq_storei(t, a[m][n]);
                        for (int i = 0; i < cnt; i++)
                            dfq_mm_one(L, c, t[i], res ? (const unsigned char *)res + at + i : NULL,
                                       (unsigned char *)y + (at + i) * ob);
                    }
                }
            }
        }
    }
}

#if DFQ_THREADS > 1
#include <pthread.h>
typedef struct { const dfq_mm_t *L; const uint8_t *xp; int P; const void *res; void *y; int c0, c1; } dfq_mm_job;
static void *dfq_mm_thread(void *a) {
    const dfq_mm_job *j = (const dfq_mm_job *)a;
    dfq_mm(j->L, j->xp, j->P, j->res, j->y, j->c0, j->c1);
    return NULL;
}
#endif

/* dfq_mm over all output channels: split by blocks of 8 channels over DFQ_THREADS threads (the
   calling one included) where the library is built with -D<PREFIX>_THREADS=N. */
static inline void dfq_mm_run(const dfq_mm_t *L, const uint8_t *xp, int P, const void *res, void *y) {
#if DFQ_THREADS > 1
    const int blocks = (L->C + 7) / 8;
    int nt = DFQ_THREADS < blocks ? DFQ_THREADS : blocks;
    if (nt > 1 && (long)L->C * L->K4 * P >= DFQ_THREAD_WORK) {
        pthread_t th[DFQ_THREADS];
        dfq_mm_job jobs[DFQ_THREADS];
        int started[DFQ_THREADS];
        for (int t = 0; t < nt; t++) {
            int c0 = blocks * t / nt * 8, c1 = blocks * (t + 1) / nt * 8;
            jobs[t].L = L; jobs[t].xp = xp; jobs[t].P = P; jobs[t].res = res; jobs[t].y = y;
            jobs[t].c0 = c0; jobs[t].c1 = c1 < L->C ? c1 : L->C;
            started[t] = t > 0 && pthread_create(&th[t], NULL, dfq_mm_thread, &jobs[t]) == 0;
            if (t > 0 && !started[t]) dfq_mm_thread(&jobs[t]);
        }
        dfq_mm_thread(&jobs[0]);
        for (int t = 1; t < nt; t++) if (started[t]) pthread_join(th[t], NULL);
        return;
    }
#endif
    dfq_mm(L, xp, P, res, y, 0, L->C);
}

/* 4 rows of n codes interleaved to [n][4] (xor f: the family's offset). */
static inline void dfq_interleave4(uint8_t *d, const unsigned char *r0, const unsigned char *r1,
                                   const unsigned char *r2, const unsigned char *r3, int n, unsigned char f) {
    int p = 0;
#if DFQ_X86
    const __m128i fv = _mm_set1_epi8((char)f);
    for (; p + 16 <= n; p += 16) {
        const __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r0 + p)), fv);
        const __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r1 + p)), fv);
        const __m128i c = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r2 + p)), fv);
        const __m128i e = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r3 + p)), fv);
        const __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
        const __m128i ce0 = _mm_unpacklo_epi8(c, e), ce1 = _mm_unpackhi_epi8(c, e);
        _mm_storeu_si128((__m128i *)(d + 4 * p), _mm_unpacklo_epi16(ab0, ce0));
        _mm_storeu_si128((__m128i *)(d + 4 * p + 16), _mm_unpackhi_epi16(ab0, ce0));
        _mm_storeu_si128((__m128i *)(d + 4 * p + 32), _mm_unpacklo_epi16(ab1, ce1));
        _mm_storeu_si128((__m128i *)(d + 4 * p + 48), _mm_unpackhi_epi16(ab1, ce1));
    }
#endif
    if (p < n) {  /* the tail (all of it without SSE2), written so gcc 12 sees no dead loop tail */
        uint8_t *dt = d + (size_t)4 * p;
        const int m = n - p;
        r0 += p; r1 += p; r2 += p; r3 += p;
        for (int i = 0; i < m; i++, dt += 4) {
            dt[0] = r0[i] ^ f; dt[1] = r1[i] ^ f; dt[2] = r2[i] ^ f; dt[3] = r3[i] ^ f;
        }
    }
}

/* The NCHW codes of one image, K rows of P pixels, packed to [K/4][Ppad][4] (offset per family). */
static inline void dfq_pack_rows(uint8_t *xp, const void *x, int sgn, int K, int P) {
    const int Ppad = DFQ_PPAD(P);
    const unsigned char *xb = (const unsigned char *)x;
    const unsigned char f = (unsigned char)DFQ_FLIP(sgn);
    const int K4 = (K + 3) / 4;
    for (int k4 = 0; k4 < K4; k4++) {
        uint8_t *d = xp + (size_t)k4 * Ppad * 4;
        if (4 * k4 + 3 < K) {
            const unsigned char *r0 = xb + (size_t)(4 * k4) * P;
            dfq_interleave4(d, r0, r0 + P, r0 + 2 * (size_t)P, r0 + 3 * (size_t)P, P, f);
        } else {
            for (int p = 0; p < P; p++) for (int j = 0; j < 4; j++) {
                const int k = 4 * k4 + j;
                d[4 * p + j] = k < K ? (uint8_t)(xb[(size_t)k * P + p] ^ f) : 0;
            }
        }
        memset(d + (size_t)P * 4, 0, (size_t)(Ppad - P) * 4);
    }
}

/* The patches of output rows [oy0, oy0 + nr) of one image (a convolution of one group), packed to
   [K/4][Ppad][4] with K = cin x kh x kw in the weights' order; padding is code 0. */
static inline void dfq_pack_patches(uint8_t *xp, const void *x, int sgn, int cin, int h, int w, int kh, int kw,
                             int sh, int sw, int dh, int dw, int pt, int pl, int ow, int oy0, int nr) {
    const unsigned char *xb = (const unsigned char *)x;
    const unsigned char f = (unsigned char)DFQ_FLIP(sgn);
    const int P = nr * ow, Ppad = DFQ_PPAD(P), K4 = (cin * kh * kw + 3) / 4;
    memset(xp, 0, (size_t)K4 * Ppad * 4);
    for (int ic = 0; ic < cin; ic++) for (int ky = 0; ky < kh; ky++) for (int kx = 0; kx < kw; kx++) {
        const int k = (ic * kh + ky) * kw + kx;
        uint8_t *d = xp + (size_t)(k >> 2) * Ppad * 4 + (k & 3);
        for (int r = 0; r < nr; r++) {
            const int iy = (oy0 + r) * sh + ky * dh - pt;
            uint8_t *dr = d + (size_t)r * ow * 4;
            if (iy < 0 || iy >= h) {
                for (int ox = 0; ox < ow; ox++) dr[4 * ox] = f;
                continue;
            }
            const unsigned char *row = xb + ((size_t)ic * h + iy) * w;
            for (int ox = 0; ox < ow; ox++) {
                const int ix = ox * sw + kx * dw - pl;
                dr[4 * ox] = (ix >= 0 && ix < w) ? (uint8_t)(row[ix] ^ f) : f;
            }
        }
    }
}


/* The direct convolution's operand (one image of a one-group convolution): the zero-padded input
   split into stride phase planes (phase (qy, qx) holds padded rows qy, qy + sh, ... and likewise
   columns), each plane hq x wq pixels of 4 channels' codes, laid out [cin/4][sh*sw][Q][4] (Q >= hq
   x wq pixels a plane, the rest padding); padding and the channels past cin are code 0. The
   generator's offsets koff then read every tap of a channel quad as one run of pixels. */
static inline void dfq_pack_planes(uint8_t *xp, const void *x, int sgn, int cin, int h, int w, int sh, int sw,
                                   int pt, int pl, int hq, int wq, int Q) {
    const unsigned char *xb = (const unsigned char *)x;
    const unsigned char f = (unsigned char)DFQ_FLIP(sgn);
    const int C4 = (cin + 3) / 4, phases = sh * sw;
    memset(xp, f, (size_t)C4 * phases * Q * 4);
    for (int c4 = 0; c4 < C4; c4++) for (int qy = 0; qy < sh; qy++) for (int qx = 0; qx < sw; qx++) {
        uint8_t *d = xp + ((size_t)(c4 * phases + qy * sw + qx) * Q) * 4;
        /* plane rows r: input row r * sh + qy - pt; plane columns c: input column c * sw + qx - pl */
        int r0 = pt - qy > 0 ? (pt - qy + sh - 1) / sh : 0, r1 = (h - 1 + pt - qy) / sh + 1;
        int c0 = pl - qx > 0 ? (pl - qx + sw - 1) / sw : 0, c1 = (w - 1 + pl - qx) / sw + 1;
        if (r1 > hq) r1 = hq;
        if (c1 > wq) c1 = wq;
        if (h - 1 + pt - qy < 0 || w - 1 + pl - qx < 0 || r1 <= r0 || c1 <= c0) continue;
        const unsigned char *rows[4];
        for (int r = r0; r < r1; r++) {
            const int iy = r * sh + qy - pt, ix0 = c0 * sw + qx - pl;
            for (int j = 0; j < 4; j++) {
                const int ic = 4 * c4 + j < cin ? 4 * c4 + j : cin - 1;  /* past cin: any codes (weights 0) */
                rows[j] = xb + ((size_t)ic * h + iy) * w + ix0;
            }
            uint8_t *dr = d + ((size_t)r * wq + c0) * 4;
            if (sw == 1) {
                dfq_interleave4(dr, rows[0], rows[1], rows[2], rows[3], c1 - c0, f);
            } else {
                for (int c = 0; c < c1 - c0; c++) for (int j = 0; j < 4; j++) dr[4 * c + j] = rows[j][c * sw] ^ f;
            }
        }
    }
}

#if DFQ_X86
/* Depthwise (one input plane per output channel, few terms): codes of stride phase planes (emit_c
   _planes) at tap offsets `offs`, 16 pixels of an output row at a time: two taps' codes widened to
   int16 and interleaved, vpmaddwd with the taps' weight pair (exact: products fit int16, sums
   int32), requantized in registers (shift > 0), packed to codes and stored. */
static inline __m256i dfq_dw_x16(const unsigned char *p, int sgn) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    return sgn ? _mm256_cvtepi8_epi16(t) : _mm256_cvtepu8_epi16(t);
}
static inline void dfq_dw(const void *xq, int sgn, const int8_t *w, const int32_t *offs, int taps, int32_t bias,
                          int s, int lo, int hi, int oh, int ow, int wq, void *y, int ysgn) {
    const unsigned char *xb = (const unsigned char *)xq;
    unsigned char *yb = (unsigned char *)y;
    __m256i wv[32];
    const int np = (taps + 1) / 2;
    for (int i = 0; i < np; i++) {
        const uint16_t a = (uint16_t)(int16_t)w[2 * i], b = (uint16_t)(int16_t)(2 * i + 1 < taps ? w[2 * i + 1] : 0);
        wv[i] = _mm256_set1_epi32((int32_t)((uint32_t)a | ((uint32_t)b << 16)));
    }
    const __m256i rnd = _mm256_set1_epi32((int32_t)((1u << (s - 1)) - 1u)), one = _mm256_set1_epi32(1);
    const __m256i vlo = _mm256_set1_epi32(lo), vhi = _mm256_set1_epi32(hi), b0 = _mm256_set1_epi32(bias);
    const __m128i cnt = _mm_cvtsi32_si128(s);
    for (int oy = 0; oy < oh; oy++) for (int ox = 0; ox < ow; ox += 16) {
        const int q = oy * wq + ox;
        __m256i a0 = b0, a1 = b0;
        for (int i = 0; i < np; i++) {
            const __m256i xa = dfq_dw_x16(xb + offs[2 * i] + q, sgn);
            const __m256i xc = 2 * i + 1 < taps ? dfq_dw_x16(xb + offs[2 * i + 1] + q, sgn) : _mm256_setzero_si256();
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_unpacklo_epi16(xa, xc), wv[i]));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_unpackhi_epi16(xa, xc), wv[i]));
        }
        a0 = _mm256_sra_epi32(_mm256_add_epi32(a0, _mm256_add_epi32(rnd, _mm256_and_si256(_mm256_sra_epi32(a0, cnt), one))), cnt);
        a1 = _mm256_sra_epi32(_mm256_add_epi32(a1, _mm256_add_epi32(rnd, _mm256_and_si256(_mm256_sra_epi32(a1, cnt), one))), cnt);
        a0 = _mm256_min_epi32(_mm256_max_epi32(a0, vlo), vhi);
        a1 = _mm256_min_epi32(_mm256_max_epi32(a1, vlo), vhi);
        const __m256i p16 = _mm256_packs_epi32(a0, a1);   /* pixels in order */
        const __m128i l = _mm256_castsi256_si128(p16), h = _mm256_extracti128_si256(p16, 1);
        const __m128i b8 = ysgn ? _mm_packs_epi16(l, h) : _mm_packus_epi16(l, h);
        unsigned char *yp = yb + (size_t)oy * ow + ox;
        if (ow - ox >= 16) {
            _mm_storeu_si128((__m128i *)yp, b8);
        } else {
            unsigned char t[16];
            _mm_storeu_si128((__m128i *)t, b8);
            memcpy(yp, t, (size_t)(ow - ox));
        }
    }
}
#endif
#endif
"""


# A lookup of 8-bit codes in a 256-entry table indexed by the code's byte: inserted when a step
# calls dfq_lut (table modules: activations).
LUT_RUNTIME = r"""
#if DFQ_SIMD == 3 && defined(__AVX512VBMI__)
#include <immintrin.h>
#elif DFQ_SIMD == 1
#include <arm_neon.h>
#endif
/* y[i] = t[x[i]] for n bytes: AVX512-VBMI by two 128-byte permutes chosen by the top bit, NEON by
   four 64-byte table lookups; a plain loop elsewhere and for the tail */
static inline void dfq_lut(const uint8_t *t, const uint8_t *x, uint8_t *y, int n) {
    int i = 0;
#if DFQ_SIMD == 3 && defined(__AVX512VBMI__)
    const __m512i t0 = _mm512_loadu_si512((const void *)t), t1 = _mm512_loadu_si512((const void *)(t + 64));
    const __m512i t2 = _mm512_loadu_si512((const void *)(t + 128)), t3 = _mm512_loadu_si512((const void *)(t + 192));
    for (; i + 64 <= n; i += 64) {
        const __m512i v = _mm512_loadu_si512((const void *)(x + i));
        const __m512i lo = _mm512_permutex2var_epi8(t0, v, t1), hi = _mm512_permutex2var_epi8(t2, v, t3);
        _mm512_storeu_si512((void *)(y + i), _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi));
    }
#elif DFQ_SIMD == 1
    const uint8x16x4_t q0 = {{vld1q_u8(t), vld1q_u8(t + 16), vld1q_u8(t + 32), vld1q_u8(t + 48)}};
    const uint8x16x4_t q1 = {{vld1q_u8(t + 64), vld1q_u8(t + 80), vld1q_u8(t + 96), vld1q_u8(t + 112)}};
    const uint8x16x4_t q2 = {{vld1q_u8(t + 128), vld1q_u8(t + 144), vld1q_u8(t + 160), vld1q_u8(t + 176)}};
    const uint8x16x4_t q3 = {{vld1q_u8(t + 192), vld1q_u8(t + 208), vld1q_u8(t + 224), vld1q_u8(t + 240)}};
    for (; i + 16 <= n; i += 16) {
        const uint8x16_t v = vld1q_u8(x + i);
        uint8x16_t r = vqtbl4q_u8(q0, v);   /* indices past 63 give 0; vqtbx leaves them as they are */
        r = vqtbx4q_u8(r, q1, vsubq_u8(v, vdupq_n_u8(64)));
        r = vqtbx4q_u8(r, q2, vsubq_u8(v, vdupq_n_u8(128)));
        r = vqtbx4q_u8(r, q3, vsubq_u8(v, vdupq_n_u8(192)));
        vst1q_u8(y + i, r);
    }
#endif
    for (; i < n; i++) y[i] = t[x[i]];
}
"""


# The small build (-D<PREFIX>_SMALL, for microcontrollers): every convolution and Gemm is one call
# of this kernel with its shapes in a constant descriptor, instead of a function specialized per layer.
SMALL_RUNTIME = r"""
#if DFQ_SMALL
typedef struct {
    int n, cin, h, iw, cout, oh, ow, group, kh, kw, sh, sw, dh, dw, pt, pl;
    int wstride;                          /* weight codes between output channels */
    const int8_t *wt;                     /* [cout][wstride], a channel's [cin/group][kh][kw] first */
    const int32_t *bias;                  /* [cout] or NULL */
    const int8_t *shift;                  /* [cout] (NULL: int32 sums out) */
    const int8_t *acc_shift, *res_shift;  /* [cout] or NULL */
    int lo, hi, in_signed, out_signed, res_signed;
} dfq_conv_t;

static int32_t dfq_code(const unsigned char *p, size_t i, int sgn) {
    return sgn ? (int32_t)((const signed char *)p)[i] : (int32_t)p[i];
}

/* y = requant(bias + sum x w [+ aligned residual]) at every output, shapes read at run time: the
   same sums and the same requantizer as the specialized kernels */
#if defined(__GNUC__)
#define DFQ_SHARED __attribute__((noinline))   /* one copy, whatever the optimization level */
#else
#define DFQ_SHARED
#endif
static DFQ_SHARED void dfq_conv(const dfq_conv_t *L, const void *x, const void *res, void *y) {
    const unsigned char *xb = (const unsigned char *)x, *rb = (const unsigned char *)res;
    const int cin_g = L->cin / L->group, cout_g = L->cout / L->group;
    for (int b = 0; b < L->n; b++) for (int oc = 0; oc < L->cout; oc++) {
        const int8_t *wo = L->wt + (size_t)oc * L->wstride;
        const int ic0 = oc / cout_g * cin_g;
        for (int oy = 0; oy < L->oh; oy++) for (int ox = 0; ox < L->ow; ox++) {
            int32_t v = L->bias ? L->bias[oc] : 0;
            for (int i = 0; i < cin_g; i++) {
                const size_t plane = ((size_t)b * L->cin + ic0 + i) * L->h;
                for (int ky = 0; ky < L->kh; ky++) {
                    const int iy = oy * L->sh + ky * L->dh - L->pt;
                    if (iy < 0 || iy >= L->h) continue;
                    for (int kx = 0; kx < L->kw; kx++) {
                        const int ix = ox * L->sw + kx * L->dw - L->pl;
                        if (ix >= 0 && ix < L->iw)
                            v += dfq_code(xb, (plane + iy) * L->iw + ix, L->in_signed) * wo[(i * L->kh + ky) * L->kw + kx];
                    }
                }
            }
            const size_t at = (((size_t)b * L->cout + oc) * L->oh + oy) * L->ow + ox;
            if (L->res_shift) {
                if (L->acc_shift) v = v * (int32_t)(1u << L->acc_shift[oc]);
                v += dfq_align(dfq_code(rb, at, L->res_signed), L->res_shift[oc]);
            }
            if (!L->shift) {
                ((int32_t *)y)[at] = v;
            } else {
                v = dfq_requant(v, L->shift[oc], L->lo, L->hi);
                if (L->out_signed) ((int8_t *)y)[at] = (int8_t)v; else ((uint8_t *)y)[at] = (uint8_t)v;
            }
        }
    }
}
#endif
"""
