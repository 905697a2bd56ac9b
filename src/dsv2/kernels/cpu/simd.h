// The vector operations dsv2's CPU kernels are written in: AVX-512 or AVX2 code by what the machine has
// (-march=native), portable scalar code elsewhere. W is the number of floats per vector V.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

static inline float bf16(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
constexpr int W = 16, REGS = 32;  // floats per vector, vector registers
typedef __m512 V;
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vset(float a) { return _mm512_set1_ps(a); }
static inline V vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
static inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
static inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
static inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(V a) { return _mm512_reduce_max_ps(a); }
static inline V vfloor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline V vpow2i(V i) {  // 2^i for whole i in [-126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(i), _mm512_set1_epi32(127)), 23));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
constexpr int W = 8, REGS = 16;
typedef __m256 V;
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vset(float a) { return _mm256_set1_ps(a); }
static inline V vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
static inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
static inline float vsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vhmax(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline V vfloor(V a) { return _mm256_floor_ps(a); }
static inline V vpow2i(V i) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23));
}
#else
constexpr int W = 1, REGS = 16;
typedef float V;
static inline V vzero() { return 0.f; }
static inline V vset(float a) { return a; }
static inline V vload(const float* p) { return *p; }
static inline void vstore(float* p, V a) { *p = a; }
static inline V vfma(V a, V b, V c) { return a * b + c; }
static inline V vadd(V a, V b) { return a + b; }
static inline V vsub(V a, V b) { return a - b; }
static inline V vmul(V a, V b) { return a * b; }
static inline V vmax(V a, V b) { return a > b ? a : b; }
static inline float vsum(V a) { return a; }
static inline float vhmax(V a) { return a; }
static inline V vfloor(V a) { return std::floor(a); }
static inline V vpow2i(V i) { return std::ldexp(1.f, static_cast<int>(i)); }
#endif

// 2^x for x <= 0 (softmax weights after the running max is subtracted); below -126 it is 0. 2^frac(x) by a
// degree-5 polynomial fitted for relative error (at most 8e-8, under fp32's half-ulp), times 2^floor(x) built
// in the exponent bits.
static inline V vexp2_nonpos(V x) {
    x = vmax(x, vset(-127.f));
    const V i = vfloor(x), f = vadd(x, vmul(i, vset(-1.f)));
    V p = vset(1.8762329e-3f);
    p = vfma(p, f, vset(8.9925844e-3f));
    p = vfma(p, f, vset(5.5823606e-2f));
    p = vfma(p, f, vset(2.4015453e-1f));
    p = vfma(p, f, vset(6.9315296e-1f));
    p = vfma(p, f, vset(9.9999994e-1f));
    return vmul(p, vpow2i(i));  // i = -127: exponent bits 0, i.e. +0
}

// Lanes in aligned groups of F (1, 2 or 4; F = 1 only in the portable code): vbcast<F>(p) repeats p[0 .. F-1]
// over the vector (one broadcast load: F floats as one 32-, 64- or 128-bit element); vgroupsum<F>(x) puts in every
// lane the sum of its group. A vector then holds W / F heads, each over F consecutive elements of a dot product,
// so that heads fewer than W still fill it (cpu/mla_decode.cpp).
template <int F>
static inline V vbcast(const float* p) {
    static_assert(F == 1 || (W % F == 0 && (F == 2 || F == 4)), "groups of 1, 2 or 4 lanes");
    if constexpr (F == 1) {
        return vset(*p);
#if defined(__AVX512F__)
    } else if constexpr (F == 2) {
        double d;
        std::memcpy(&d, p, sizeof d);
        return _mm512_castpd_ps(_mm512_set1_pd(d));
    } else {
        return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
#elif defined(__AVX2__) && defined(__FMA__)
    } else if constexpr (F == 2) {
        double d;
        std::memcpy(&d, p, sizeof d);
        return _mm256_castpd_ps(_mm256_set1_pd(d));
    } else {
        return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
#endif
    }
}

template <int F>
static inline V vgroupsum(V x) {
    if constexpr (F == 1) {
        return x;
#if defined(__AVX512F__)
    } else if constexpr (F == 2) {
        return _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));  // lanes [1, 0, 3, 2] within each 128 bits
    } else {
        x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));
        return _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));  // [2, 3, 0, 1]
#elif defined(__AVX2__) && defined(__FMA__)
    } else if constexpr (F == 2) {
        return _mm256_add_ps(x, _mm256_permute_ps(x, 0xB1));
    } else {
        x = _mm256_add_ps(x, _mm256_permute_ps(x, 0xB1));
        return _mm256_add_ps(x, _mm256_permute_ps(x, 0x4E));
#endif
    }
}
