// The softmax's exponentials for the C++ CPU attention: s[0..n) = e^(s - m) in place, returning the row sum
// (declared in attention_cpu.h; the forward's P tile and the backward's recomputed P both come from here, so
// P is bit for bit the same in both on a given machine).
//
// e^x in float32 to under 1 ulp, NaN kept NaN, e^-inf = 0, results below FLT_MIN flushed to 0 (x < -87), +inf
// above x = 88. Not torch's exp_u20 (what torch's own CPU flash attention uses): it reduces x with a one-word
// ln 2 (the error grows with |x|, 20 ulp) and clamps NaN to a finite value. Here: n = round(x log2 e),
// r = x - n ln2_hi - n ln2_lo (Cody-Waite, two FMAs, exact to float32), e^r by its degree-7 Taylor polynomial
// (|r| <= ln2 / 2: truncation 1.5e-8 relative), times 2^n. 12 vector operations per 8 or 16 lanes.
//
// Two builds of the same arithmetic, chosen once per process at run time:
//   avx512  16 lanes, masked tails, 2^n by scalef: on CPUs with AVX-512F (the whole extension is compiled
//           for AVX2; this one function carries target("avx512f") and runs only where the CPU has it).
//           Halves the softmax's share of the forward on this project's AMD EPYC (12% -> 6% of the time).
//   avx2    8 lanes, 2^n built in the exponent bits; everywhere else, or with MMKERN_CPU_ISA=avx2 (tests run
//           both paths).
// The lane values are identical in both; only the row sum's association differs (16 vs 8 partial sums).
// Memory traffic: one read and one write of the row (L1-resident: kBlockN floats).
#include "attention/attention_cpu.h"

#include <immintrin.h>

#include <cstdlib>
#include <cstring>

namespace mmkern::attention_cpu {
namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;        // 16 significant bits: n * kLn2Hi is exact for |n| < 2^8
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kHi = 88.0f, kLo = -87.0f;          // e^88 < FLT_MAX; e^-87 > FLT_MIN
constexpr float kC[8] = {1.f / 5040.f, 1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && (defined(__GNUC__) || defined(__clang__))
#define MMKERN_EXP_X86 1

inline __m256 exp_avx2(__m256 v) {
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(kHi)), _mm256_set1_ps(kLo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kC[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_set1_ps(kLo), _CMP_LT_OQ));
  e = _mm256_blendv_ps(e, _mm256_set1_ps(kInf), _mm256_cmp_ps(v, _mm256_set1_ps(kHi), _CMP_GT_OQ));
  return _mm256_blendv_ps(e, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));               // NaN stays NaN
}

float exp_and_sum_avx2(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  if (j < n) {   // the tail through one padded vector, so its lanes are computed exactly as the body's
    alignas(32) float tail[8];
    const int64_t t = n - j;
    for (int64_t i = 0; i < 8; ++i) tail[i] = i < t ? s[j + i] : kNegInf;
    _mm256_store_ps(tail, exp_avx2(_mm256_sub_ps(_mm256_load_ps(tail), vm)));
    for (int64_t i = 0; i < t; ++i) sum += (s[j + i] = tail[i]);
  }
  return sum;
}

__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 v) {
  const __m512 xc = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(kHi)), _mm512_set1_ps(kLo));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kC[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[i]));
  __m512 e = _mm512_scalef_ps(p, n);                                              // p * 2^n, n in [-126, 127]
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(v, _mm512_set1_ps(kLo), _CMP_LT_OQ), _mm512_setzero_ps());
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(v, _mm512_set1_ps(kHi), _CMP_GT_OQ), _mm512_set1_ps(kInf));
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);       // NaN stays NaN
}

__attribute__((target("avx512f"))) float exp_and_sum_avx512(float* s, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), vm));
    _mm512_mask_storeu_ps(s + j, lanes, e);
    acc = _mm512_mask_add_ps(acc, lanes, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// The portable build (no AVX2 at compile time): torch's vectorised exp (Sleef, 1 ulp; NaN and -inf handled).
float exp_and_sum_vec(float* s, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec e = (Vec::loadu(s + j) - vm).exp();
    e.store(s + j);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
  return sum;
}

using ExpAndSum = float (*)(float*, int64_t, float);

ExpAndSum choose() {
#ifdef MMKERN_EXP_X86
  const char* forced = std::getenv("MMKERN_CPU_ISA");
  const bool avx2_forced = forced != nullptr && std::strcmp(forced, "avx2") == 0;
  if (!avx2_forced && __builtin_cpu_supports("avx512f")) return exp_and_sum_avx512;
  return exp_and_sum_avx2;
#else
  return exp_and_sum_vec;
#endif
}

const ExpAndSum kExpAndSum = choose();   // once per process (MMKERN_CPU_ISA is read at load)

}  // namespace

float exp_and_sum(float* s, int64_t n, float m) { return kExpAndSum(s, n, m); }

}  // namespace mmkern::attention_cpu
