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

inline float dot(const float* x, const float* y, int64_t D) {
    V acc = vzero();
    int64_t k = 0;
    for (; k + W <= D; k += W) acc = vfma(vload(x + k), vload(y + k), acc);
    float s = vsum(acc);
    for (; k < D; ++k) s += x[k] * y[k];
    return s;
}

// Four tokens' scores against one query: each query vector loaded once for four rows.
inline void dot4(const float* q, const float* r, int64_t D, float* s) {
    V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t k = 0;
    for (; k + W <= D; k += W) {
        const V qv = vload(q + k);
        a0 = vfma(qv, vload(r + k), a0);
        a1 = vfma(qv, vload(r + D + k), a1);
        a2 = vfma(qv, vload(r + 2 * D + k), a2);
        a3 = vfma(qv, vload(r + 3 * D + k), a3);
    }
    s[0] = vsum(a0), s[1] = vsum(a1), s[2] = vsum(a2), s[3] = vsum(a3);
    for (; k < D; ++k) {
        s[0] += q[k] * r[k], s[1] += q[k] * r[D + k], s[2] += q[k] * r[2 * D + k], s[3] += q[k] * r[3 * D + k];
    }
}

// One part: m (H,) running max, l (H,) running sum, acc (H, R) unnormalised output; tile (bs, D), s and p (bs,).
void attend_part(const Args& a, const Part& part, float* m, float* l, float* acc, float* tile, float* s, float* p) {
    const int64_t H = a.H, D = a.D, R = a.R, bs = a.bs;
    const float* q = a.q + part.b * H * D;
    const int64_t* table = a.tables + part.b * a.max_blocks;
    std::fill(m, m + H, -std::numeric_limits<float>::infinity());
    std::fill(l, l + H, 0.f);
    std::fill(acc, acc + H * R, 0.f);
    for (int64_t t = part.t0; t < part.t1; t += bs) {
        const int64_t n = std::min(bs, part.t1 - t);
        const float* rows = block_rows(a, table[t / bs] * bs, n, tile);
        for (int64_t h = 0; h < H; ++h) {
            const float* qh = q + h * D;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) dot4(qh, rows + i * D, D, s + i);
            for (; i < n; ++i) s[i] = dot(qh, rows + i * D, D);
            float mx = m[h];
            for (i = 0; i < n; ++i) mx = std::max(mx, s[i]);
            const float alpha = std::exp2(m[h] - mx);  // 0 for the first block (m = -inf)
            m[h] = mx;
            float sum = 0.f;
            i = 0;
            for (; i + W <= n; i += W) {
                const V e = vexp2_nonpos(vadd(vload(s + i), vset(-mx)));
                vstore(p + i, e);
                sum += vsum(e);
            }
            for (; i < n; ++i) sum += (p[i] = std::exp2(s[i] - mx));
            l[h] = l[h] * alpha + sum;
            float* o = acc + h * R;
            int64_t k = 0;
            for (; k + W <= R; k += W) {
                V v = vmul(vload(o + k), vset(alpha));
                for (int64_t j = 0; j < n; ++j) v = vfma(vset(p[j]), vload(rows + j * D + k), v);
                vstore(o + k, v);
            }
            for (; k < R; ++k) {
                float v = o[k] * alpha;
                for (int64_t j = 0; j < n; ++j) v += p[j] * rows[j * D + k];
                o[k] = v;
            }
        }
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
        std::vector<float> tile(cache_type == F32 ? 0 : bs * D), s(bs), p(bs);
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < P; ++i)
            attend_part(a, parts[i], &ml[i * H * 2], &ml[i * H * 2 + H], &accs[i * H * R], tile.data(), s.data(),
                        p.data());
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
