// Absorbed MLA decode attention over the paged latent cache, on the CPU. For each decoding sequence b and head h,
//   out[b, h] = softmax_t(scale * q[b, h] . latent[t]) @ latent[t, :R]    over t < ctx[b],
// latent[t] being row block_tables[b][t / bs] * bs + t % bs of one layer's cache (slots, D), D = R + rope dim.
//
// The torch path gathers every context into one padded tensor first and then runs three ops over it; at 32K
// tokens of context the gather alone cost a third of the attention. Here each block of the cache is read where it
// lies, once, by an online softmax (flash decoding): while a block's rows are in L1, all heads score them and add
// them into their outputs. Long contexts are cut into parts of whole blocks that threads take one at a time, and
// the parts' partial results (running max, sum, weighted latent) are merged at the end.
//
// The cache is fp32, bf16, or fp8 e4m3 (a 256-entry table of its values from the caller) with two fp32 scales
// per token: one for the first R values, one for the rest. Softmax runs in base 2 with q pre-scaled by log2(e).

#include <algorithm>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

enum Cache : int { F32 = 0, BF16 = 1, FP8 = 2 };

struct Args {
    const float* q;  // (B, H, D), pre-scaled by scale * log2(e)
    const void* cache;  // (slots, D)
    int cache_type;
    const float* scales;  // (slots, 2) for FP8
    const float* fp8_values;  // (256,) for FP8
    const int64_t* tables;  // (B, max_blocks)
    int64_t max_blocks, bs;
    int64_t H, D, R;
};

struct Part {
    int64_t b, t0, t1;  // tokens t0 .. t1 - 1 of sequence b; t0 a multiple of bs
};

// The n rows of one block as fp32: the cache itself when it is fp32 (a block's slots are consecutive), else
// converted into `tile`.
const float* block_rows(const Args& a, int64_t slot0, int64_t n, float* tile) {
    const int64_t D = a.D;
    if (a.cache_type == F32) return static_cast<const float*>(a.cache) + slot0 * D;
    if (a.cache_type == BF16) {
        const uint16_t* src = static_cast<const uint16_t*>(a.cache) + slot0 * D;
        for (int64_t i = 0; i < n * D; ++i) tile[i] = bf16(src[i]);
        return tile;
    }
    const uint8_t* src = static_cast<const uint8_t*>(a.cache) + slot0 * D;
    for (int64_t t = 0; t < n; ++t) {
        const float s0 = a.scales[2 * (slot0 + t)], s1 = a.scales[2 * (slot0 + t) + 1];
        for (int64_t k = 0; k < D; ++k) tile[t * D + k] = a.fp8_values[src[t * D + k]] * (k < a.R ? s0 : s1);
    }
    return tile;
}

// The next block's rows on their way to the caches while this one is computed: a block of another sequence's
// blocks may lie anywhere, and even in order, the hardware prefetcher alone left 32K-token contexts at half the
// speed per token of 8K ones.
inline void prefetch_block(const Args& a, int64_t slot0) {
    const int64_t bytes = a.bs * a.D * (a.cache_type == F32 ? 4 : a.cache_type == BF16 ? 2 : 1);
    const char* p = static_cast<const char*>(a.cache) + slot0 * (bytes / a.bs);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

// Four sums of vectors at once: a horizontal sum per vector cost as much as the FMAs that fill it.
inline void vsum4(V a, V b, V c, V d, float* out) {
#if defined(__AVX512F__)
    const auto half = [](V x) {
        return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    };
    const __m256 a8 = half(a), b8 = half(b), c8 = half(c), d8 = half(d);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 a8 = a, b8 = b, c8 = c, d8 = d;
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
    out[0] = a, out[1] = b, out[2] = c, out[3] = d;
#endif
}

// Scores of TB tokens (rows r, stride D) against HB heads (queries q, stride D) -> s[h * ld + t]: each query vector
// loaded once for TB rows and each row vector once for HB heads.
template <int HB, int TB>
inline void scores(const float* q, const float* r, int64_t D, float* s, int64_t ld) {
    V acc[HB][TB];
    for (int h = 0; h < HB; ++h)
        for (int t = 0; t < TB; ++t) acc[h][t] = vzero();
    int64_t k = 0;
    for (; k + W <= D; k += W) {
        V rv[TB];
        for (int t = 0; t < TB; ++t) rv[t] = vload(r + t * D + k);
        for (int h = 0; h < HB; ++h) {
            const V qv = vload(q + h * D + k);
            for (int t = 0; t < TB; ++t) acc[h][t] = vfma(qv, rv[t], acc[h][t]);
        }
    }
    for (int h = 0; h < HB; ++h) {
        if constexpr (TB == 4) {
            vsum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3], s + h * ld);
        } else {
            for (int t = 0; t < TB; ++t) s[h * ld + t] = vsum(acc[h][t]);
        }
        for (int64_t kk = k; kk < D; ++kk)
            for (int t = 0; t < TB; ++t) s[h * ld + t] += q[h * D + kk] * r[t * D + kk];
    }
}

// o[h] = alpha[h] * o[h] + sum_j p[h * ld + j] * rows[j, k0 : k0 + KB * W] for HB heads (o stride R): each row
// vector loaded once for HB heads, KB * HB accumulators held over the block's n rows.
template <int HB, int KB>
inline void accumulate(float* o, int64_t R, const float* alpha, const float* p, int64_t ld, const float* rows,
                       int64_t D, int64_t n, int64_t k0) {
    V acc[HB][KB];
    for (int h = 0; h < HB; ++h)
        for (int c = 0; c < KB; ++c) acc[h][c] = vmul(vload(o + h * R + k0 + c * W), vset(alpha[h]));
    for (int64_t j = 0; j < n; ++j) {
        V rv[KB];
        for (int c = 0; c < KB; ++c) rv[c] = vload(rows + j * D + k0 + c * W);
        for (int h = 0; h < HB; ++h) {
            const V pv = vset(p[h * ld + j]);
            for (int c = 0; c < KB; ++c) acc[h][c] = vfma(pv, rv[c], acc[h][c]);
        }
    }
    for (int h = 0; h < HB; ++h)
        for (int c = 0; c < KB; ++c) vstore(o + h * R + k0 + c * W, acc[h][c]);
}

template <int HB>
void block_scores(const float* q, const float* rows, int64_t D, int64_t n, float* s, int64_t ld) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) scores<HB, 4>(q, rows + i * D, D, s + i, ld);
    for (; i < n; ++i) scores<HB, 1>(q, rows + i * D, D, s + i, ld);
}

template <int HB>
void block_accumulate(float* o, int64_t R, const float* alpha, const float* p, int64_t ld, const float* rows,
                      int64_t D, int64_t n) {
    constexpr int KB = 4;
    int64_t k = 0;
    for (; k + KB * W <= R; k += KB * W) accumulate<HB, KB>(o, R, alpha, p, ld, rows, D, n, k);
    for (; k + W <= R; k += W) accumulate<HB, 1>(o, R, alpha, p, ld, rows, D, n, k);
    for (; k < R; ++k)
        for (int h = 0; h < HB; ++h) {
            float v = o[h * R + k] * alpha[h];
            for (int64_t j = 0; j < n; ++j) v += p[h * ld + j] * rows[j * D + k];
            o[h * R + k] = v;
        }
}

// One part: m (H,) running max, l (H,) running sum, acc (H, R) unnormalised output; tile (bs, D); s, p (H, bs)
// scores and weights of the block; alpha (H,).
void attend_part(const Args& a, const Part& part, float* m, float* l, float* acc, float* tile, float* s, float* p,
                 float* alpha) {
    const int64_t H = a.H, D = a.D, R = a.R, bs = a.bs;
    const float* q = a.q + part.b * H * D;
    const int64_t* table = a.tables + part.b * a.max_blocks;
    std::fill(m, m + H, -std::numeric_limits<float>::infinity());
    std::fill(l, l + H, 0.f);
    std::fill(acc, acc + H * R, 0.f);
    for (int64_t t = part.t0; t < part.t1; t += bs) {
        const int64_t n = std::min(bs, part.t1 - t);
        if (t + bs < part.t1) prefetch_block(a, table[t / bs + 1] * bs);
        const float* rows = block_rows(a, table[t / bs] * bs, n, tile);
        int64_t h = 0;
        for (; h + 2 <= H; h += 2) block_scores<2>(q + h * D, rows, D, n, s + h * bs, bs);
        for (; h < H; ++h) block_scores<1>(q + h * D, rows, D, n, s + h * bs, bs);
        for (h = 0; h < H; ++h) {  // the online softmax's update
            const float* sh = s + h * bs;
            float* ph = p + h * bs;
            float mx = m[h];
            for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sh[i]);
            alpha[h] = std::exp2(m[h] - mx);  // 0 for the first block (m = -inf)
            m[h] = mx;
            float sum = 0.f;
            int64_t i = 0;
            for (; i + W <= n; i += W) {
                const V e = vexp2_nonpos(vadd(vload(sh + i), vset(-mx)));
                vstore(ph + i, e);
                sum += vsum(e);
            }
            for (; i < n; ++i) sum += (ph[i] = std::exp2(sh[i] - mx));
            l[h] = l[h] * alpha[h] + sum;
        }
        for (h = 0; h + 2 <= H; h += 2) block_accumulate<2>(acc + h * R, R, alpha + h, p + h * bs, bs, rows, D, n);
        for (; h < H; ++h) block_accumulate<1>(acc + h * R, R, alpha + h, p + h * bs, bs, rows, D, n);
    }
}

}  // namespace

extern "C" {

// out (B, H, R) fp32. q (B, H, D) fp32 unscaled; ctx_lens (B,), each >= 1; min_part_tokens: the shortest part a
// context is cut into (whole blocks), so that short contexts are not split for nothing.
void dsv2_mla_decode(const float* q, const void* cache, int cache_type, const float* scales, const float* fp8_values,
                     const int64_t* tables, const int64_t* ctx_lens, int64_t B, int64_t max_blocks, int64_t bs,
                     int64_t H, int64_t D, int64_t R, float softmax_scale, int64_t min_part_tokens, float* out,
                     int nthreads) {
    const float k2 = softmax_scale * 1.4426950408889634f;  // log2(e)
    std::vector<float> qs(q, q + B * H * D);
    for (float& x : qs) x *= k2;
    Args a{qs.data(), cache, cache_type, scales, fp8_values, tables, max_blocks, bs, H, D, R};

    // Parts of about total / (4 * threads) tokens, whole blocks, at least min_part_tokens.
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) total += ctx_lens[b];
    const int64_t target = std::max(min_part_tokens, total / (4 * std::max(nthreads, 1)));
    const int64_t part_len = std::max<int64_t>(1, (target + bs - 1) / bs) * bs;
    std::vector<Part> parts;
    std::vector<int64_t> first(B + 1);
    for (int64_t b = 0; b < B; ++b) {
        first[b] = static_cast<int64_t>(parts.size());
        for (int64_t t = 0; t < ctx_lens[b]; t += part_len) parts.push_back({b, t, std::min(ctx_lens[b], t + part_len)});
    }
    first[B] = static_cast<int64_t>(parts.size());
    const int64_t P = static_cast<int64_t>(parts.size());
    std::vector<float> ml(P * H * 2), accs(P * H * R);

#pragma omp parallel num_threads(nthreads) if (P > 1)
    {
        std::vector<float> tile(cache_type == F32 ? 0 : bs * D), s(H * bs), p(H * bs), alpha(H);
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < P; ++i)
            attend_part(a, parts[i], &ml[i * H * 2], &ml[i * H * 2 + H], &accs[i * H * R], tile.data(), s.data(),
                        p.data(), alpha.data());
    }

    // Merge a sequence's parts: out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i.
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            float* o = out + (b * H + h) * R;
            float M = -std::numeric_limits<float>::infinity(), L = 0.f;
            for (int64_t i = first[b]; i < first[b + 1]; ++i) M = std::max(M, ml[i * H * 2 + h]);
            std::fill(o, o + R, 0.f);
            for (int64_t i = first[b]; i < first[b + 1]; ++i) {
                const float w = std::exp2(ml[i * H * 2 + h] - M);
                L += w * ml[i * H * 2 + H + h];
                const float* ai = &accs[(i * H + h) * R];
                for (int64_t k = 0; k < R; ++k) o[k] += w * ai[k];
            }
            const float inv = first[b + 1] > first[b] ? 1.f / L : 0.f;
            for (int64_t k = 0; k < R; ++k) o[k] *= inv;
        }
    }
}

}  // extern "C"
