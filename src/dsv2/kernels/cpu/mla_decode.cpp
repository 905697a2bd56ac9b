// Absorbed MLA decode attention over the paged latent cache, on the CPU. For each decoding sequence b and head h,
//   out[b, h] = softmax_t(scale * q[b, h] . latent[t]) @ latent[t, :R]    over t < ctx[b],
// latent[t] being row block_tables[b][t / bs] * bs + t % bs of one layer's cache (slots, D), D = R + rope dim.
//
// The torch path gathers every context into one padded tensor first and then runs three ops over it; at 32K
// tokens of context the gather alone cost a third of the attention. Here each block of the cache is read where it
// lies, by an online softmax (flash decoding) over passes of a few blocks: every head scores a pass's rows and adds
// them into its output while they are in the caches, the heads spread over a vector's lanes (below). Long contexts are cut into parts of whole blocks that threads take one at a time, and
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

// The next pass's rows on their way to the caches while this one is computed, a few lines at each step of the
// work: a block of another sequence's blocks may lie anywhere, and the hardware prefetcher alone left 32K-token
// contexts at half the speed per token of 8K ones. Spread, not issued at once: hundreds of prefetches in a row
// wait for the few misses a core keeps in flight, and the work waits with them.
struct Prefetch {
    const char* blocks[64];
    int64_t n = 0, block_bytes = 0, line = 0, lines = 0, per_step = 0;
    void start(const Args& a, const int64_t* table, int64_t t0, int64_t t1, int64_t steps) {
        block_bytes = a.bs * a.D * (a.cache_type == F32 ? 4 : a.cache_type == BF16 ? 2 : 1);
        n = line = 0;
        for (int64_t t = t0; t < t1 && n < 64; t += a.bs)
            blocks[n++] = static_cast<const char*>(a.cache) + table[t / a.bs] * block_bytes;
        lines = n * ((block_bytes + 63) / 64);
        per_step = (lines + steps - 1) / std::max<int64_t>(steps, 1);
    }
    void step() {
        const int64_t per_block = (block_bytes + 63) / 64;
        for (int64_t end = std::min(lines, line + per_step); line < end; ++line)
            __builtin_prefetch(blocks[line / per_block] + (line % per_block) * 64, 0, 2);
    }
};

// The layout: heads across the lanes of a vector. Scores are q . row for every head, so a row element broadcast
// over the lanes (one load) meets a vector of the heads' query elements: no horizontal sums, and each row is read
// once for all the heads of a vector. The output is the same: a weight vector over the heads times a broadcast row
// element. With fewer heads than lanes (8 heads in 16 fp32 lanes), a vector holds W / F heads and each head F
// consecutive elements of the dot product (vbcast<F>, vgroupsum<F> in simd.h): its lanes stay full.
//   qT:   (D / F, HVt, W)  lane (h % Hl) * F + j of vector h / Hl at step kk holds q[h, kk * F + j], Hl = W / F
//   S:    (n, HVt, W)      score, then weight, of row t for head h in all F lanes of its group
//   accT: (R / F, HVt, W)  lane (h % Hl) * F + j at step kk: the unnormalised output o[h, kk * F + j]
// HVt vectors hold all the heads, a whole number of pairs (the last padded with zero queries, whose results are
// dropped); each pair is its own pass over the rows.

// The scores of TB rows for the HV head vectors from v0: S[t, v0 + v] = vgroupsum(sum_kk bcast(row) * qT).
template <int F, int HV, int TB>
inline void scores(const float* qT, int64_t ld, const float* const* rows, int64_t steps, float* S) {
    V acc[TB][HV];
    for (int t = 0; t < TB; ++t)
        for (int v = 0; v < HV; ++v) acc[t][v] = vzero();
    for (int64_t kk = 0; kk < steps; ++kk) {
        V qv[HV];
        for (int v = 0; v < HV; ++v) qv[v] = vload(qT + kk * ld + v * W);
        for (int t = 0; t < TB; ++t) {
            const V r = vbcast<F>(rows[t] + kk * F);
            for (int v = 0; v < HV; ++v) acc[t][v] = vfma(r, qv[v], acc[t][v]);
        }
    }
    for (int t = 0; t < TB; ++t)
        for (int v = 0; v < HV; ++v) vstore(S + t * ld + v * W, vgroupsum<F>(acc[t][v]));
}

// accT[kk0 .. kk0 + KC) = alpha * accT + sum_t S[t] * bcast(rows[t] + kk * F), for the HV head vectors from v0.
template <int F, int HV, int KC>
inline void accumulate(float* accT, int64_t ld, const V* alpha, const float* S, const float* const* rows, int64_t n,
                       int64_t kk0) {
    V acc[KC][HV];
    for (int c = 0; c < KC; ++c)
        for (int v = 0; v < HV; ++v) acc[c][v] = vmul(vload(accT + (kk0 + c) * ld + v * W), alpha[v]);
    for (int64_t t = 0; t < n; ++t) {
        V pv[HV];
        for (int v = 0; v < HV; ++v) pv[v] = vload(S + t * ld + v * W);
        const float* r = rows[t] + kk0 * F;
        for (int c = 0; c < KC; ++c) {
            const V b = vbcast<F>(r + c * F);
            for (int v = 0; v < HV; ++v) acc[c][v] = vfma(b, pv[v], acc[c][v]);
        }
    }
    for (int c = 0; c < KC; ++c)
        for (int v = 0; v < HV; ++v) vstore(accT + (kk0 + c) * ld + v * W, acc[c][v]);
}

// Rows of a score tile and row elements of an output tile: HV * TILE accumulators + HV + 1 registers.
constexpr int TILE = REGS >= 32 ? 8 : 6;

// A pair of head vectors over n rows: scores, the online softmax's update of m, l (per lane), accT. Pairs: a lone
// vector (one broadcast per FMA) ran at half the FMAs per second of a pair (one per two) on Zen 4.
template <int F>
void attend_rows(const float* qT, int64_t ld, const float* const* rows, int64_t n, int64_t D, int64_t R, float* S,
                 float* m, float* l, float* accT, Prefetch& pf) {
    constexpr int HV = 2, TB = TILE, KC = TILE;
    int64_t t = 0;
    for (; t + TB <= n; t += TB, pf.step()) scores<F, HV, TB>(qT, ld, rows + t, D / F, S + t * ld);
    for (; t < n; ++t) scores<F, HV, 1>(qT, ld, rows + t, D / F, S + t * ld);
    V alpha[HV];
    for (int v = 0; v < HV; ++v) {
        const V m0 = vload(m + v * W);
        V mx = m0;
        for (t = 0; t < n; ++t) mx = vmax(mx, vload(S + t * ld + v * W));
        alpha[v] = vexp2_nonpos(vsub(m0, mx));  // 0 for the first rows (m = -inf)
        V sum = vzero();
        for (t = 0; t < n; ++t) {
            const V e = vexp2_nonpos(vsub(vload(S + t * ld + v * W), mx));
            vstore(S + t * ld + v * W, e);
            sum = vadd(sum, e);
        }
        vstore(m + v * W, mx);
        vstore(l + v * W, vfma(vload(l + v * W), alpha[v], sum));
    }
    int64_t kk = 0;
    for (; kk + KC <= R / F; kk += KC, pf.step()) accumulate<F, HV, KC>(accT, ld, alpha, S, rows, n, kk);
    for (; kk < R / F; ++kk) accumulate<F, HV, 1>(accT, ld, alpha, S, rows, n, kk);
}

// Per-thread buffers of attend_part.
struct Work {
    std::vector<float> tile, S, m, l, accT;
    std::vector<const float*> rows;
};

// Rows per pass: whole blocks, about 64 rows, so that the accumulators' loads and stores are spread over many.
inline int64_t pass_blocks(int64_t bs) { return std::max<int64_t>(1, 64 / bs); }

// One part -> m (H,) running max, l (H,) running sum, acc (H, R) unnormalised output.
template <int F>
void attend_part(const Args& a, const float* qT, int64_t HVt, const Part& part, Work& w, float* m_out, float* l_out,
                 float* acc_out) {
    const int64_t H = a.H, D = a.D, R = a.R, bs = a.bs, ld = HVt * W, Hl = W / F, nb = pass_blocks(bs);
    const int64_t* table = a.tables + part.b * a.max_blocks;
    std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
    std::fill(w.l.begin(), w.l.end(), 0.f);
    std::fill(w.accT.begin(), w.accT.end(), 0.f);
    // The steps of a pass at which the prefetcher runs: its score tiles and output tiles, for each pair of vectors.
    const int64_t steps = HVt / 2 * (nb * bs / TILE + R / F / TILE);
    Prefetch pf;
    for (int64_t t0 = part.t0; t0 < part.t1; t0 += nb * bs) {
        const int64_t t1 = std::min(part.t1, t0 + nb * bs);
        pf.start(a, table, t1, std::min(part.t1, t1 + nb * bs), steps);
        int64_t n = 0;
        for (int64_t t = t0; t < t1; t += bs) {
            const int64_t k = std::min(bs, t1 - t);
            const float* r = block_rows(a, table[t / bs] * bs, k, w.tile.data() + n * D);
            for (int64_t i = 0; i < k; ++i) w.rows[n++] = r + i * D;
        }
        for (int64_t v = 0; v < HVt; v += 2)
            attend_rows<F>(qT + v * W, ld, w.rows.data(), n, D, R, w.S.data() + v * W, w.m.data() + v * W,
                           w.l.data() + v * W, w.accT.data() + v * W, pf);
    }
    for (int64_t h = 0; h < H; ++h) {
        const int64_t lane = (h / Hl) * W + (h % Hl) * F;
        m_out[h] = w.m[lane];
        l_out[h] = w.l[lane];
        for (int64_t k = 0; k < R; ++k) acc_out[h * R + k] = w.accT[(k / F) * ld + lane + k % F];
    }
}

// The lanes per head: F doubled (up to 4) until the heads fill a pair of vectors, where F divides D and R.
int lanes_per_head(int64_t H, int64_t D, int64_t R) {
    int F = 1;
    while (F < 4 && F * H < 2 * W && D % (2 * F) == 0 && R % (2 * F) == 0) F *= 2;
    return F;
}

// q (B, H, D) -> qT (B, D / F, HVt, W), zero in the padding lanes.
std::vector<float> transpose_queries(const float* q, int64_t B, int64_t H, int64_t D, int F, int64_t HVt, float k2) {
    const int64_t ld = HVt * W, Hl = W / F;
    std::vector<float> qT(B * (D / F) * ld, 0.f);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t k = 0; k < D; ++k)
                qT[b * (D / F) * ld + (k / F) * ld + (h / Hl) * W + (h % Hl) * F + k % F] = k2 * q[(b * H + h) * D + k];
    return qT;
}

template <int F>
void attend_parts(const Args& a, const float* qT, int64_t HVt, const std::vector<Part>& parts, float* ml, float* accs,
                  int nthreads) {
    const int64_t P = static_cast<int64_t>(parts.size()), H = a.H, D = a.D, R = a.R, ld = HVt * W;
    const int64_t rows = pass_blocks(a.bs) * a.bs;
#pragma omp parallel num_threads(nthreads) if (P > 1)
    {
        Work w{std::vector<float>(rows * D), std::vector<float>(rows * ld),
               std::vector<float>(ld), std::vector<float>(ld), std::vector<float>(R / F * ld),
               std::vector<const float*>(rows)};
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < P; ++i)
            attend_part<F>(a, qT + parts[i].b * (D / F) * ld, HVt, parts[i], w, &ml[i * H * 2], &ml[i * H * 2 + H],
                           &accs[i * H * R]);
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
    const int F = lanes_per_head(H, D, R);
    const int64_t HVt = (H + 2 * W / F - 1) / (2 * W / F) * 2;  // head vectors, a whole number of pairs
    const std::vector<float> qT = transpose_queries(q, B, H, D, F, HVt, k2);
    Args a{cache, cache_type, scales, fp8_values, tables, max_blocks, bs, H, D, R};

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
    if constexpr (W >= 8) {
        if (F == 4) attend_parts<4>(a, qT.data(), HVt, parts, ml.data(), accs.data(), nthreads);
        if (F == 2) attend_parts<2>(a, qT.data(), HVt, parts, ml.data(), accs.data(), nthreads);
    }
    if (F == 1) attend_parts<1>(a, qT.data(), HVt, parts, ml.data(), accs.data(), nthreads);

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
