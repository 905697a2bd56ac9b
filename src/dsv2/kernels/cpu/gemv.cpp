// Few-row products with weight-only int8 / int4 matrices on the CPU: y (R, N) = x (R, K) @ W.T, for the R <= 16
// rows of a decode step. Each weight row is read from memory once for all R activation rows (torch's own
// kernels stream the whole weight again for every row), and the work is split over output rows with OpenMP.
//
// Built at first use by dsv2/kernels/native.py with the system compiler and -march=native: AVX-512 or AVX2 code
// by what the machine has, portable scalar code elsewhere. (GCC 12 turns vector-extension int8 -> float
// conversions into scalar code, hence the intrinsics.)
//
// Formats (see native.py for the conversions from the portable form):
// - int8: q (N, K) int8, scale (N,) bf16: W[n, k] = q[n, k] * scale[n].
// - int4: q (N, K / 2) uint8 in blocks of 32 weights: byte i of a block holds weight i (low nibble) and weight
//   i + 16 (high nibble), llama.cpp Q4_0's order; scale and zero (N, K / G) bf16 per group of G weights:
//   W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], torch's convention.

#include <vector>

#include "simd.h"

// The int8 and int4 weight conversions, per instruction set.
#if defined(__AVX512F__)
static inline V from_i8(const int8_t* p) {  // W int8 -> W floats
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// int4: a group's 16 levels ((q - 8) * scale + zero for q = 0..15) in one register, and each nibble dequantized by a
// permute that reads the low 4 bits of its index: no conversion, no FMA per weight.
typedef __m512 Levels;
static inline Levels levels(float scale, float zero) {
    const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return _mm512_fmadd_ps(q, _mm512_set1_ps(scale), _mm512_set1_ps(zero));
}
static inline void dequant(const uint8_t* p, const Levels& t, V& lo, V& hi) {  // W bytes -> 2 W weights
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(b, t);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline V from_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
struct Levels {
    V scale, bias;  // q * scale + bias, bias = zero - 8 * scale
};
static inline Levels levels(float scale, float zero) { return {vset(scale), vset(zero - 8 * scale)}; }
static inline void dequant(const uint8_t* p, const Levels& t, V& lo, V& hi) {  // W bytes -> 2 W weights
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = vfma(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))), t.scale, t.bias);
    hi = vfma(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), t.scale, t.bias);
}
#else  // portable scalar code: correct everywhere, fast nowhere
static inline V from_i8(const int8_t* p) { return static_cast<float>(*p); }
struct Levels {
    float scale, bias;
};
static inline Levels levels(float scale, float zero) { return {scale, zero - 8 * scale}; }
static inline void dequant(const uint8_t* p, const Levels& t, V& lo, V& hi) {
    lo = (*p & 15) * t.scale + t.bias;
    hi = (*p >> 4) * t.scale + t.bias;
}
#endif

// The micro-kernel: MR weight rows against NR activation rows, MR * NR accumulators held in registers over the
// whole of K. Each converted weight vector feeds NR FMAs and each activation vector MR, and the MR * NR chains of
// dependent FMAs hide an FMA's 4-cycle latency. (One weight row against all rows, the first version, was
// latency-bound at 1 row and spent its time reloading activations at 16.)
#if defined(__AVX512F__)
constexpr int MR = 4, NR_MAX = 4;  // 16 accumulators of 32 registers
#else
constexpr int MR = 4, NR_MAX = 2;  // 8 of 16
#endif

// Weight rows per block: MR, or 1 for at most 4 activation rows. One row at a time reads each thread's share of
// the matrix as one sequential stream, which the hardware prefetchers follow to the full bandwidth (a 2816 x 2048
// int8 product at one row: 0.22-0.23 ms against 0.29 with four interleaved rows per block, on a Zen 4; int4 0.13
// against 0.18); past 4 rows the MR rows' reuse of each activation vector wins (16 rows: 1.02 against 1.32 ms).
static inline int block_rows(int64_t R) { return R <= 4 ? 1 : MR; }

// How many tiles ahead the kernels prefetch (1: 2 and 4 measured no better, nor prefetching into L2 only). The
// last tiles prefetch past the end of their matrix: a prefetch never faults, so that is only a wasted hint.
constexpr int PF_TILES = 1;

// int8 weights multiply int8 activations: each activation row is quantized per block of 32 by llama.cpp's Q8_0
// rule (d = max|x| / 127, q = x / d rounded to nearest, ties to even), and the products are integer dot products,
// scaled per block in fp32. Widening every weight to fp32 for an FMA, the first version, left the kernel
// compute-bound below the memory bandwidth on a Zen 4 (3 vector ops per 16 weights against ~5 per 64 here with
// AVX512-VNNI, ~4 per 32 with AVX2).
//
// The block scales, per activation row (stride xd_stride(K)): with VNNI, one 16-float vector per 64 weights
// whose lanes are the scales of the products that lane sums (lanes 0-7 the first block of 32, 8-15 the second;
// 0 past the end of a row); otherwise one float per block.
constexpr int64_t Q8_BLOCK = 32;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define DSV2_VNNI 1
constexpr int64_t XD_PER_64 = 16;
#else
constexpr int64_t XD_PER_64 = 2;
#endif
static inline int64_t xd_stride(int64_t K) { return (K + 63) / 64 * XD_PER_64; }

// One row of K floats (K a multiple of 32) -> xq (K) int8 and its block scales xd (xd_stride(K) floats); dsx
// (K / G, int4 only): each group of G's sum of d * sum(q) over its blocks, for the int4 weights' offsets. int4 on VNNI builds: every whole 64
// values stored in the order the int4 tile unpacks its two blocks of nibbles (the low nibbles of both blocks, then
// the high ones: values 0-15, 32-47, 16-31, 48-63), the lanes of xd to match; a last lone block in order.
static void quantize_row(const float* x, int64_t K, int8_t* xq, float* xd, float* dsx = nullptr, bool int4 = false,
                         int64_t G = 32) {
    const int64_t C = K / Q8_BLOCK;
    if (dsx)
        for (int64_t g = 0; g < K / G; ++g) dsx[g] = 0.f;
    for (int64_t c = 0; c < C; ++c) {
        const float* xc = x + c * Q8_BLOCK;
        float amax = 0.f;
        for (int j = 0; j < Q8_BLOCK; ++j) amax = std::fmax(amax, std::fabs(xc[j]));
        const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
#ifdef DSV2_VNNI
        const bool paired = int4 && (c | 1) < C;  // in a whole 64
#else
        const bool paired = false;
#endif
        int32_t sum = 0;
        for (int j = 0; j < Q8_BLOCK; ++j) {
            const int v = static_cast<int>(std::nearbyint(xc[j] * id));
            sum += v;
            const int64_t at = paired ? (c / 2) * 64 + (j < 16 ? 0 : 32) + (c % 2) * 16 + j % 16 : c * Q8_BLOCK + j;
            xq[at] = static_cast<int8_t>(v);
        }
        if (dsx) dsx[c * Q8_BLOCK / G] += d * static_cast<float>(sum);
#ifdef DSV2_VNNI
        float* lanes = xd + (c / 2) * 16;
        if (paired) {
            for (int l = 0; l < 4; ++l) lanes[(c % 2) * 4 + l] = lanes[8 + (c % 2) * 4 + l] = d;
        } else {
            for (int l = 0; l < 8; ++l) lanes[(c % 2) * 8 + l] = d;
        }
#else
        xd[c] = d;
#endif
    }
#ifdef DSV2_VNNI
    if (C % 2)
        for (int l = 8; l < 16; ++l) xd[(C / 2) * 16 + l] = 0.f;
#endif
}

// q: MR rows of K int8 (row stride K); xq: NR quantized activation rows (stride K), xd their block scales (stride
// ldxd); y[i * ldy + m]: activation row i, weight row m. K a multiple of 32.
template <int M, int NR>
static inline void int8_tile(const int8_t* q, const uint16_t* scale, const int8_t* xq, const float* xd, int64_t ldxd,
                             int64_t K, float* y, int64_t ldy) {
    float out[M][NR];
#if defined(DSV2_VNNI)
    // vpdpbusd multiplies unsigned by signed bytes: |x| times the weight with x's sign (llama.cpp's trick)
    __m512 acc[M][NR];
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) acc[m][i] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
        // The next tile's rows (this thread's next block, read after this one) from memory a tile ahead: the
        // hardware prefetcher alone left the int4 kernel at ~60% of the bandwidth the int8 one reached.
        for (int m = 0; m < M; ++m) __builtin_prefetch(q + (PF_TILES * M + m) * K + k);
        const __mmask64 live = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;  // a last half vector
        __m512i ax[NR];
        __mmask64 neg[NR];
        __m512 d[NR];
        for (int i = 0; i < NR; ++i) {
            const __m512i xa = _mm512_maskz_loadu_epi8(live, xq + i * K + k);
            ax[i] = _mm512_abs_epi8(xa);
            neg[i] = _mm512_movepi8_mask(xa);
            d[i] = _mm512_loadu_ps(xd + i * ldxd + (k / 64) * 16);
        }
        for (int m = 0; m < M; ++m) {
            const __m512i w = _mm512_maskz_loadu_epi8(live, q + m * K + k);
            for (int i = 0; i < NR; ++i) {
                const __m512i dot = _mm512_dpbusd_epi32(zero, ax[i], _mm512_mask_sub_epi8(w, neg[i], zero, w));
                acc[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d[i], acc[m][i]);
            }
        }
    }
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) out[m][i] = _mm512_reduce_add_ps(acc[m][i]);
#elif defined(__AVX2__) && defined(__FMA__)
    // maddubs: |x| (unsigned) times the weight with x's sign, pairs summed to 16 bits (at most 2 * 127 * 127, no
    // saturation), then to 32
    __m256 acc[M][NR];
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) acc[m][i] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t k = 0; k < K; k += 32) {
        if (k % 64 == 0)
            for (int m = 0; m < M; ++m) __builtin_prefetch(q + (PF_TILES * M + m) * K + k);
        __m256i xa[NR], ax[NR];
        __m256 d[NR];
        for (int i = 0; i < NR; ++i) {
            xa[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + k));
            ax[i] = _mm256_sign_epi8(xa[i], xa[i]);
            d[i] = _mm256_set1_ps(xd[i * ldxd + k / 32]);
        }
        for (int m = 0; m < M; ++m) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + k));
            for (int i = 0; i < NR; ++i) {
                const __m256i p16 = _mm256_maddubs_epi16(ax[i], _mm256_sign_epi8(w, xa[i]));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                acc[m][i] = _mm256_fmadd_ps(p, d[i], acc[m][i]);
            }
        }
    }
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) out[m][i] = vsum(acc[m][i]);  // V is __m256 on this path
#else
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) out[m][i] = 0.f;
    for (int64_t c = 0; c < K / 32; ++c)
        for (int m = 0; m < M; ++m)
            for (int i = 0; i < NR; ++i) {
                int32_t dot = 0;
                for (int j = 0; j < 32; ++j) dot += int32_t(q[m * K + c * 32 + j]) * xq[i * K + c * 32 + j];
                out[m][i] += float(dot) * xd[i * ldxd + c];
            }
#endif
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) y[i * ldy + m] = out[m][i] * bf16(scale[m]);
}

// int4 weights multiply int8 activations too (quantized as for int8, in quantize_row's int4 order): with
// W = q * scale + bias per group (bias = zero - 8 * scale, q the nibble in [0, 15]), a row's product is
// sum over blocks of d * scale * dot(q, xq), integer dot products of unsigned nibbles and signed bytes, plus
// sum over groups of bias times the group's sum of d * sum(xq) (dsx), added once at the end as one dot product.
// scale and bias: fp32, M rows of K / G (converted per block of rows by the caller). GC: the group size when known at compile time, 0 for any other.
template <int M, int NR, int GC>
static inline void int4_tile(const uint8_t* q, const float* scale, const float* bias, const int8_t* xq,
                             const float* xd, const float* dsx, int64_t ldxd, int64_t K, int64_t G_, float* y,
                             int64_t ldy) {
    const int64_t G = GC ? GC : G_, groups = K / G;
    float out[M][NR];
#if defined(DSV2_VNNI)
    __m512 acc[M][NR];
    __m256 tail[M][NR];
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) acc[m][i] = _mm512_setzero_ps(), tail[m][i] = _mm256_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        if ((k / 2) % 64 == 0)  // the next tile's rows, a cache line at a time (see int8_tile)
            for (int m = 0; m < M; ++m) __builtin_prefetch(q + (PF_TILES * M + m) * (K / 2) + k / 2);
        __m512i xa[NR];
        __m512 d[NR];
        for (int i = 0; i < NR; ++i) {
            xa[i] = _mm512_loadu_si512(xq + i * K + k);
            d[i] = _mm512_loadu_ps(xd + i * ldxd + (k / 64) * 16);
        }
        for (int m = 0; m < M; ++m) {
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * (K / 2) + k / 2));
            const __m256i lo = _mm256_and_si256(b, low4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            // lanes 0-3 and 8-11 hold the first block's products, 4-7 and 12-15 the second's
            const float* sm = scale + m * groups;
            const __m512 sv = G >= 64 ? _mm512_set1_ps(sm[k / G])
                                      : _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(sm[k / G]),
                                                             _mm512_set1_ps(sm[(k + 32) / G]));
            for (int i = 0; i < NR; ++i) {
                const __m512i dot = _mm512_dpbusd_epi32(zero, w, xa[i]);
                acc[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d[i], sv), acc[m][i]);
            }
        }
    }
    if (k < K) {  // a last lone block of 32, in order
        for (int m = 0; m < M; ++m) {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + m * (K / 2) + k / 2));
            const __m128i m4 = _mm_set1_epi8(0x0F);
            const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
            for (int i = 0; i < NR; ++i) {
                const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + k));
                const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xa);
                const float ds = xd[i * ldxd + (k / 64) * 16] * scale[m * groups + k / G];
                tail[m][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ds), tail[m][i]);
            }
        }
    }
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) {
            const __m256 t = tail[m][i];
            __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            out[m][i] = _mm512_reduce_add_ps(acc[m][i]) + _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
        }
#elif defined(__AVX2__) && defined(__FMA__)
    // maddubs: nibbles (unsigned) times bytes, pairs to 16 bits (at most 2 * 15 * 127: no saturation), then 32
    __m256 acc[M][NR];
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) acc[m][i] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int64_t k = 0; k < K; k += 32) {
        if ((k / 2) % 64 == 0)
            for (int m = 0; m < M; ++m) __builtin_prefetch(q + (PF_TILES * M + m) * (K / 2) + k / 2);
        __m256i xa[NR];
        for (int i = 0; i < NR; ++i) xa[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + k));
        for (int m = 0; m < M; ++m) {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + m * (K / 2) + k / 2));
            const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
            const float sg = scale[m * groups + k / G];
            for (int i = 0; i < NR; ++i) {
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, xa[i]), ones));
                acc[m][i] = _mm256_fmadd_ps(p, _mm256_set1_ps(xd[i * ldxd + k / 32] * sg), acc[m][i]);
            }
        }
    }
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) out[m][i] = vsum(acc[m][i]);  // V is __m256 on this path
#else
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) out[m][i] = 0.f;
    for (int64_t c = 0; c < K / 32; ++c)
        for (int m = 0; m < M; ++m)
            for (int i = 0; i < NR; ++i) {
                const uint8_t* qb = q + m * (K / 2) + c * 16;
                const int8_t* xb = xq + i * K + c * 32;
                int32_t dot = 0;
                for (int j = 0; j < 16; ++j) dot += (qb[j] & 15) * xb[j] + (qb[j] >> 4) * xb[16 + j];
                out[m][i] += float(dot) * xd[i * ldxd + c] * scale[m * groups + c * 32 / G];
            }
#endif
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < NR; ++i) {
            V b = vzero();
            int64_t g = 0;
            for (; g + W <= groups; g += W) b = vfma(vload(bias + m * groups + g), vload(dsx + i * groups + g), b);
            float t = vsum(b);
            for (; g < groups; ++g) t += bias[m * groups + g] * dsx[i * groups + g];
            y[i * ldy + m] = out[m][i] + t;
        }
}

// The tile's template instance by its size: rows of x in tiles of NR_MAX, the weight rows in blocks of MR (a
// last partial block one row at a time).
template <int M, typename Tile>
static inline void rows(int64_t R, Tile tile) {
    int64_t r = 0;
    for (; r + NR_MAX <= R; r += NR_MAX) tile.template run<M, NR_MAX>(r);
    switch (R - r) {
        case 0: break;
        case 1: tile.template run<M, 1>(r); break;
        case 2: tile.template run<M, 2>(r); break;
        default: tile.template run<M, 3>(r); break;
    }
}

struct Int8Args {
    const int8_t* q;
    const uint16_t* scale;
    const int8_t* xq;
    const float* xd;
    float* y;
    int64_t K, ldxd, ldy, n;
    template <int M, int NR>
    void run(int64_t r) const {
        int8_tile<M, NR>(q + n * K, scale + n, xq + r * K, xd + r * ldxd, ldxd, K, y + r * ldy + n, ldy);
    }
};

struct Int4Args {
    const uint8_t* q;
    const float *scale, *bias;  // fp32, this block's M rows
    const int8_t* xq;
    const float *xd, *dsx;
    float* y;
    int64_t K, G, ldxd, ldy, n;
    template <int M, int NR>
    void run(int64_t r) const {
        const uint8_t* qn = q + n * (K / 2);
        const int8_t* xr = xq + r * K;
        const float *dr = xd + r * ldxd, *sr = dsx + r * (K / G);
        float* yr = y + r * ldy + n;
        switch (G) {
            case 32: int4_tile<M, NR, 32>(qn, scale, bias, xr, dr, sr, ldxd, K, G, yr, ldy); break;
            case 64: int4_tile<M, NR, 64>(qn, scale, bias, xr, dr, sr, ldxd, K, G, yr, ldy); break;
            case 128: int4_tile<M, NR, 128>(qn, scale, bias, xr, dr, sr, ldxd, K, G, yr, ldy); break;
            default: int4_tile<M, NR, 0>(qn, scale, bias, xr, dr, sr, ldxd, K, G, yr, ldy); break;
        }
    }
};

// One block of mr weight rows (block b: rows b * mr onwards; mr 1 or MR) of y (R, ldy) = x (R, K) @ W.T, the unit the
// parallel loops share out. A last partial block runs one row at a time. int8: K a multiple of 32, the activation
// rows quantized by quantize_row (xq, and xd with row stride xd_stride(K)).
static inline void int8_block(const int8_t* q, const uint16_t* scale, const int8_t* xq, const float* xd, float* y,
                              int64_t R, int64_t N, int64_t K, int64_t ldy, int64_t b, int64_t mr) {
    const int64_t n0 = b * mr, ldxd = xd_stride(K);
    if (mr == 1) {
        rows<1>(R, Int8Args{q, scale, xq, xd, y, K, ldxd, ldy, n0});
    } else if (n0 + MR <= N) {
        rows<MR>(R, Int8Args{q, scale, xq, xd, y, K, ldxd, ldy, n0});
    } else {
        for (int64_t n = n0; n < N; ++n) rows<1>(R, Int8Args{q, scale, xq, xd, y, K, ldxd, ldy, n});
    }
}

// int4: K a multiple of G, G a multiple of 32; the activation rows quantized by
// quantize_row in its int4 order (xq, xd, dsx), K / G at most MAX_GROUPS. s, z: the calling thread's buffers of
// MR * MAX_GROUPS floats, which take this block's scales and biases in fp32.
constexpr int64_t MAX_GROUPS = 1024;
static inline void int4_block(const uint8_t* q, const uint16_t* scale, const uint16_t* zero, const int8_t* xq,
                              const float* xd, const float* dsx, float* y, int64_t R, int64_t N, int64_t K, int64_t G,
                              int64_t ldy, int64_t b, int64_t mr, float* s, float* z) {
    const int64_t groups = K / G, n0 = b * mr, rows_here = N - n0 < mr ? N - n0 : mr,
                  ldxd = xd_stride(K);
    for (int64_t j = 0; j < rows_here * groups; ++j) {
        s[j] = bf16(scale[n0 * groups + j]);
        z[j] = bf16(zero[n0 * groups + j]) - 8.f * s[j];
    }
    if (rows_here == MR) {
        rows<MR>(R, Int4Args{q, s, z, xq, xd, dsx, y, K, G, ldxd, ldy, n0});
    } else {
        for (int64_t i = 0; i < rows_here; ++i)
            rows<1>(R, Int4Args{q, s + i * groups, z + i * groups, xq, xd, dsx, y, K, G, ldxd, ldy, n0 + i});
    }
}

// B independent products of the same shape: y_b (R, ldy) = x_b (R, K) @ W_b.T for b < B, W_b at q + b * N * K
// (scales at scale + b * N), x_b at x + b * R * K, y_b at y + b * R * ldy; x fp32, y fp32 (y[r, n] for n < N). The
// (product, block) pairs share one parallel loop, so B small products (the absorbed attention's per-head blocks)
// fork the threads once. nthreads: the caller's (torch's) count.
static void int8_bmm(const int8_t* q, const uint16_t* scale, const float* x, float* y, int64_t B, int64_t R,
                     int64_t N, int64_t K, int64_t ldy, int nthreads) {
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> xd;
    const int64_t ldxd = xd_stride(K), mr = block_rows(R), blocks = (N + mr - 1) / mr;
    xq.resize(B * R * K);
    xd.resize(B * R * ldxd);
    for (int64_t r = 0; r < B * R; ++r) quantize_row(x + r * K, K, &xq[r * K], &xd[r * ldxd]);
    const int8_t* xq_ = xq.data();  // the workers' own thread_local names would be other vectors
    const float* xd_ = xd.data();
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < B * blocks; ++j) {
        const int64_t b = j / blocks;
        int8_block(q + b * N * K, scale + b * N, xq_ + b * R * K, xd_ + b * R * ldxd, y + b * R * ldy, R, N, K, ldy,
                   j % blocks, mr);
    }
}

static void int4_mm(const uint8_t* q, const uint16_t* scale, const uint16_t* zero, const float* x, float* y, int64_t R,
                    int64_t N, int64_t K, int64_t G, int64_t ldy, int nthreads) {
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> xd, dsx;
    const int64_t ldxd = xd_stride(K), blocks = (N + block_rows(R) - 1) / block_rows(R);
    xq.resize(R * K);
    xd.resize(R * ldxd);
    dsx.resize(R * (K / G));
    for (int64_t r = 0; r < R; ++r) quantize_row(x + r * K, K, &xq[r * K], &xd[r * ldxd], &dsx[r * (K / G)], true, G);
    const int8_t* xq_ = xq.data();  // the workers' own thread_local names would be other vectors
    const float *xd_ = xd.data(), *dsx_ = dsx.data();
#pragma omp parallel num_threads(nthreads)
    {
        alignas(64) float s[MR * MAX_GROUPS], z[MR * MAX_GROUPS];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) int4_block(q, scale, zero, xq_, xd_, dsx_, y, R, N, K, G, ldy, b, block_rows(R), s, z);
    }
}

// Activations and outputs in bf16 or fp32 (x_bf16, y_bf16): bf16 rows are widened into a per-thread buffer and
// fp32 results narrowed after the product, so the caller needs no conversions of its own (two torch ops per
// product were ~10 us each, ~600 products per V2-Lite token).
static const float* widen(const void* x, int x_bf16, int64_t n, std::vector<float>& buf) {
    if (!x_bf16) return static_cast<const float*>(x);
    buf.resize(n);
    const uint16_t* h = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16(h[i]);
    return buf.data();
}

static inline uint16_t to_bf16(float f) {  // round to nearest even
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static void narrow(const float* y, uint16_t* out, int64_t n, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) out[i] = to_bf16(y[i]);
}

// The routed experts of a decode step in one call (dsv2_experts below). An expert's two matrices, each as its
// kernel reads it: int8 (q, scale) or int4 (q, scale, zero) by `bits`.
struct QMat {
    const void* q;
    const uint16_t *scale, *zero;
};

// Activation rows for qblock, quantized by quantize_row (in its int4 order for int4 weights; dsx for int4 only).
struct Act {
    const int8_t* xq;
    const float *xd, *dsx;
    int64_t G;  // dsx's group size (rows of K / G)
    Act rows_from(int64_t j, int64_t K) const { return {xq + j * K, xd + j * xd_stride(K), dsx + j * (K / G), G}; }
};

static inline void qblock(int bits, const QMat& w, const Act& a, float* y, int64_t R, int64_t N, int64_t K, int64_t G,
                          int64_t ldy, int64_t b, int64_t mr, float* s, float* z) {
    if (bits == 8)
        int8_block(static_cast<const int8_t*>(w.q), w.scale, a.xq, a.xd, y, R, N, K, ldy, b, mr);
    else
        int4_block(static_cast<const uint8_t*>(w.q), w.scale, w.zero, a.xq, a.xd, a.dsx, y, R, N, K, G, ldy, b, mr, s,
                   z);
}

static void experts(int bits, const int64_t* table, int64_t E, int64_t H, int64_t I, int64_t G, const float* x,
                    const int64_t* idx, const float* wts, int64_t T, int64_t K, float* y, int nthreads) {
    const int64_t P = T * K, I2 = 2 * I;
    // The (token, slot) pairs sorted by expert, tokens ascending within one (a counting sort), and each active
    // expert's run of them: an expert chosen by several tokens reads its weights once for all of them.
    thread_local std::vector<int64_t> start, order, act;
    thread_local std::vector<float> h13, h, out, xsd, hd, xss, hs;
    thread_local std::vector<int8_t> xsq, hq;
    start.assign(E + 1, 0);
    for (int64_t p = 0; p < P; ++p) ++start[idx[p] + 1];
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    order.resize(P);
    act.clear();
    {
        std::vector<int64_t> next(start.begin(), start.end() - 1);
        for (int64_t p = 0; p < P; ++p) order[next[idx[p]]++] = p;
    }
    for (int64_t e = 0; e < E; ++e)
        if (start[e + 1] > start[e]) act.push_back(e);
    const int64_t n_act = static_cast<int64_t>(act.size());
    int64_t most = 0;  // rows of the busiest expert: every expert's blocks have block_rows(most) weight rows
    for (int64_t e : act) most = start[e + 1] - start[e] > most ? start[e + 1] - start[e] : most;
    const int64_t mr = block_rows(most), blocks13 = (I2 + mr - 1) / mr, blocks2 = (H + mr - 1) / mr;
    const bool int4 = bits == 4;
    const int64_t gq = int4 ? G : Q8_BLOCK;  // dsx's group size (int8 does not read it)
    h13.resize(P * I2);
    h.resize(P * I);
    out.resize(P * H);
    xsq.resize(P * H);
    xsd.resize(P * xd_stride(H));
    xss.resize(P * (H / gq));
    hq.resize(P * I);
    hd.resize(P * xd_stride(I));
    hs.resize(P * (I / gq));
    // each pair's row: its token's, quantized (P <= 16 * K rows of H; a copy per pair keeps each expert's rows
    // contiguous for the tiles)
    for (int64_t j = 0; j < P; ++j)
        quantize_row(x + (order[j] / K) * H, H, &xsq[j * H], &xsd[j * xd_stride(H)], &xss[j * (H / gq)], int4, gq);
    // Plain pointers into this thread's buffers: inside the parallel region the thread_local names would be each
    // worker's own (empty) vectors.
    const int64_t *st = start.data(), *ord = order.data(), *ac = act.data();
    float *h13_ = h13.data(), *h_ = h.data(), *out_ = out.data(), *hd_ = hd.data(), *hs_ = hs.data();
    int8_t* hq_ = hq.data();
    const Act xa{xsq.data(), xsd.data(), xss.data(), gq}, ha{hq_, hd_, hs_, gq};
    auto mat = [table](int64_t e, int which) {  // which 0: w13, 1: w2
        const int64_t* t = table + e * 6 + which * 3;
        return QMat{reinterpret_cast<const void*>(t[0]), reinterpret_cast<const uint16_t*>(t[1]),
                    reinterpret_cast<const uint16_t*>(t[2])};
    };
#pragma omp parallel num_threads(nthreads)
    {
        alignas(64) float s[MR * MAX_GROUPS], z[MR * MAX_GROUPS];
        // gate and up rows of every active expert: one loop over all their blocks, so the threads split the
        // whole layer's work rather than each expert's
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_act * blocks13; ++i) {
            const int64_t e = ac[i / blocks13], j0 = st[e], rows = st[e + 1] - j0;
            qblock(bits, mat(e, 0), xa.rows_from(j0, H), h13_ + j0 * I2, rows, I2, H, G, I2, i % blocks13, mr, s, z);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < P; ++j) {
            for (int64_t n = 0; n < I; ++n) {
                const float g = h13_[j * I2 + n];
                h_[j * I + n] = g / (1.f + std::exp(-g)) * h13_[j * I2 + I + n];  // silu(gate) * up
            }
            quantize_row(h_ + j * I, I, hq_ + j * I, hd_ + j * xd_stride(I), hs_ + j * (I / gq), int4, gq);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_act * blocks2; ++i) {
            const int64_t e = ac[i / blocks2], j0 = st[e], rows = st[e + 1] - j0;
            qblock(bits, mat(e, 1), ha.rows_from(j0, I), out_ + j0 * H, rows, H, I, G, H, i % blocks2, mr, s, z);
        }
        // y[t] = sum of its pairs' weight * output, in ascending expert order (the pairs' sorted order), fp32
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < H; n0 += 64) {
            const int64_t n1 = n0 + 64 < H ? n0 + 64 : H;
            for (int64_t t = 0; t < T; ++t)
                for (int64_t n = n0; n < n1; ++n) y[t * H + n] = 0.f;
            for (int64_t j = 0; j < P; ++j) {
                const int64_t t = ord[j] / K;
                const float w = wts[ord[j]];
                for (int64_t n = n0; n < n1; ++n) y[t * H + n] += w * out_[j * H + n];
            }
        }
    }
}

extern "C" {

// Floats per vector of this build: 16 (AVX-512), 8 (AVX2), 1 (portable).
int dsv2_vector_width() { return W; }

// y (R, N) = x (R, K) @ W.T for R <= 16 (more rows work, each tile of rows reading the weight again).
void dsv2_int8_mm(const int8_t* q, const uint16_t* scale, const void* x, int x_bf16, void* y, int y_bf16, int64_t R,
                  int64_t N, int64_t K, int nthreads) {
    thread_local std::vector<float> xbuf, ybuf;
    const float* xf = widen(x, x_bf16, R * K, xbuf);
    if (y_bf16) ybuf.resize(R * N);
    float* yf = y_bf16 ? ybuf.data() : static_cast<float*>(y);
    int8_bmm(q, scale, xf, yf, 1, R, N, K, N, nthreads);
    if (y_bf16) narrow(yf, static_cast<uint16_t*>(y), R * N, nthreads);
}

// B products of the same shape at once (y (B, R, N) = x (B, R, K) @ W_b.T, W (B, N, K)), as int8_bmm.
void dsv2_int8_bmm(const int8_t* q, const uint16_t* scale, const void* x, int x_bf16, void* y, int y_bf16, int64_t B,
                   int64_t R, int64_t N, int64_t K, int nthreads) {
    thread_local std::vector<float> xbuf, ybuf;
    const float* xf = widen(x, x_bf16, B * R * K, xbuf);
    if (y_bf16) ybuf.resize(B * R * N);
    float* yf = y_bf16 ? ybuf.data() : static_cast<float*>(y);
    int8_bmm(q, scale, xf, yf, B, R, N, K, N, nthreads);
    if (y_bf16) narrow(yf, static_cast<uint16_t*>(y), B * R * N, nthreads);
}

void dsv2_int4_mm(const uint8_t* q, const uint16_t* scale, const uint16_t* zero, const void* x, int x_bf16, void* y,
                  int y_bf16, int64_t R, int64_t N, int64_t K, int64_t G, int nthreads) {
    thread_local std::vector<float> xbuf, ybuf;
    const float* xf = widen(x, x_bf16, R * K, xbuf);
    if (y_bf16) ybuf.resize(R * N);
    float* yf = y_bf16 ? ybuf.data() : static_cast<float*>(y);
    int4_mm(q, scale, zero, xf, yf, R, N, K, G, N, nthreads);
    if (y_bf16) narrow(yf, static_cast<uint16_t*>(y), R * N, nthreads);
}

// Dequantize to bf16 (rounded to nearest even), for the many-row path: the dense GEMM then multiplies. Plain
// loops over a row: the compiler vectorizes them, and they are bound by writing the output.

void dsv2_int8_dequant(const int8_t* q, const uint16_t* scale, uint16_t* out, int64_t N, int64_t K, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        const float s = bf16(scale[n]);
        const int8_t* qn = q + n * K;
        uint16_t* on = out + n * K;
        for (int64_t k = 0; k < K; ++k) on[k] = to_bf16(static_cast<float>(qn[k]) * s);
    }
}

void dsv2_int4_dequant(const uint8_t* q, const uint16_t* scale, const uint16_t* zero, uint16_t* out, int64_t N,
                       int64_t K, int64_t G, int nthreads) {
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* qn = q + n * (K / 2);
        uint16_t* on = out + n * K;
        for (int64_t g = 0; g < groups; ++g) {
            const float s = bf16(scale[n * groups + g]), b = bf16(zero[n * groups + g]) - 8 * s;
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                for (int j = 0; j < 16; ++j) {
                    on[k + j] = to_bf16(static_cast<float>(qn[k / 2 + j] & 15) * s + b);
                    on[k + 16 + j] = to_bf16(static_cast<float>(qn[k / 2 + j] >> 4) * s + b);
                }
            }
        }
    }
}


// The routed experts of a decode step: y (T, H) = sum over each token's K (expert, weight) pairs of
// weight * W2_e (silu(gate) * up), [gate; up] = W13_e x, W13_e (2I, H) gate rows then up rows, W2_e (H, I), all
// experts int8 or all int4 (bits 8 or 4; G the int4 group size). table (E, 6): per expert the addresses of w13's
// q, scale, zero then w2's (zero 0 for int8). idx, wts (T, K): the router's choices (ids < E) and weights (fp32).
// Intermediates stay fp32. One call per MoE layer in place of ~15 torch ops per expert.
void dsv2_experts(int bits, const int64_t* table, int64_t E, int64_t H, int64_t I, int64_t G, const void* x,
                  int x_bf16, const int64_t* idx, const float* wts, int64_t T, int64_t K, void* y, int y_bf16,
                  int nthreads) {
    thread_local std::vector<float> xbuf, ybuf;
    const float* xf = widen(x, x_bf16, T * H, xbuf);
    if (y_bf16) ybuf.resize(T * H);
    float* yf = y_bf16 ? ybuf.data() : static_cast<float*>(y);
    experts(bits, table, E, H, I, G, xf, idx, wts, T, K, yf, nthreads);
    if (y_bf16) narrow(yf, static_cast<uint16_t*>(y), T * H, nthreads);
}

}  // extern "C"
