// W4A8 linear layer for CPUs: int4 weights (a bf16 scale and zero per group of input values)
// times activations rounded per token to int8 (absmax / 127), multiplied in integers.
//
// What llama.cpp does for Q4 x Q8 (ggml's vec_dot_q4_1_q8_1): 32 weights and 32 activation
// bytes per block, an unsigned x signed byte dot product (AVX2 maddubs + madd, or one AVX-512
// VNNI / AVX-VNNI dpbusd), a float multiply-add by the block's scale. Written for ryzlab, not
// copied: the weight layout, the zero handling and the threading are ours.
//
// y[m, n] = sx[m] * sum_g ( s[n, g] * sum_{k in g} q[n, k] xq[m, k]  +  (z[n, g] - 8 s[n, g]) * sum_{k in g} xq[m, k] )
// which is exactly  dequant(W) @ (sx * xq)  with  w = (q - 8) s + z  (torch's int4 convention),
// up to float32 rounding of the sums.
//
// Layout: output rows in tiles of 4 (rows padded to a multiple of 4), each tile one sequential
// stream: qw [N / 4, K / 2 * 4] uint8 holds, per block of 32 inputs, the 4 rows' 16 bytes one
// after the other (byte j: input j in the low nibble, input j + 16 in the high one);
// sz [N / 4, G, 4, 2] bf16 the 4 rows' (scale, zero) per group. (Four rows read side by side
// from a row-major layout were four streams, and ran 2x slower from DRAM at K = 1536.)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX2__)
inline __m256i unpack_block(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  return _mm256_set_m128i(hi, lo);  // inputs 0..15, then 16..31
}

// 8 int32 partial sums of q (unsigned, 0..15) x x (signed int8) over 32 bytes
inline __m256i dot_block(__m256i q, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, x);
#else
  // pairs of u8 x s8 products: at most 2 x 15 x 127 = 3810, no int16 saturation
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// NT weight rows (n .. n + NT - 1, row stride K / 2) x MT activation rows: out[nt * MT + mt] =
// sum over groups of s * (q . xq) + (z - 8 s) * sum(xq), before the activation row's scale.
// NT x MT independent accumulators keep the multiply-add chains apart (one chain at batch 1
// would wait on the fma latency every block).
template <int NT, int MT>
inline void tile(const uint8_t* wrow, const uint16_t* sz, const int8_t* xq, const float* xsum,
                 int64_t K, int64_t G, int64_t bpg, float* mz, float* out) {
#if defined(__AVX2__)
  __m256 acc[NT][MT];
  for (int a = 0; a < NT; ++a)
    for (int i = 0; i < MT; ++i) acc[a][i] = _mm256_setzero_ps();
#else
  float acc[NT][MT] = {};
#endif
  float zacc[NT] = {};  // MT == 1: the zero terms summed as they come (cheaper than a second pass)
  for (int64_t g = 0; g < G; ++g) {
    float sc[NT];
    for (int a = 0; a < NT; ++a) {
      const uint16_t* p = sz + g * 8 + a * 2;
      sc[a] = bf16_to_f32(p[0]);
      const float m = bf16_to_f32(p[1]) - 8.0f * sc[a];
      if constexpr (MT == 1) {
        zacc[a] += m * xsum[g];
      } else {
        mz[a * G + g] = m;
      }
    }
    for (int64_t bb = 0; bb < bpg; ++bb) {
      const int64_t b = g * bpg + bb;
#if defined(__AVX2__)
      __m256i xv[MT];
      for (int i = 0; i < MT; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + b * 32));
      for (int a = 0; a < NT; ++a) {
        const __m256i qv = unpack_block(wrow + b * 64 + a * 16);
        const __m256 scv = _mm256_set1_ps(sc[a]);
        for (int i = 0; i < MT; ++i)
          acc[a][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(qv, xv[i])), scv, acc[a][i]);
      }
#else
      for (int a = 0; a < NT; ++a) {
        const uint8_t* p = wrow + b * 64 + a * 16;
        for (int i = 0; i < MT; ++i) {
          const int8_t* x = xq + i * K + b * 32;
          int32_t d = 0;
          for (int j = 0; j < 16; ++j) d += (p[j] & 15) * x[j] + (p[j] >> 4) * x[j + 16];
          acc[a][i] += sc[a] * static_cast<float>(d);
        }
      }
#endif
    }
  }
  // the zero terms: one dot over the groups per (weight row, activation row)
  for (int a = 0; a < NT; ++a)
    for (int i = 0; i < MT; ++i) {
      const float* m = mz + a * G;
      const float* xs = xsum + i * G;
      float z = zacc[a];
      if constexpr (MT > 1) {
#pragma omp simd reduction(+ : z)
        for (int64_t g = 0; g < G; ++g) z += m[g] * xs[g];
      }
#if defined(__AVX2__)
      out[a * MT + i] = hsum(acc[a][i]) + z;
#else
      out[a * MT + i] = acc[a][i] + z;
#endif
    }
}

#if defined(__AVX512F__)
constexpr int kMT = 4;  // 32 vector registers: 4 x 4 accumulators fit
#else
constexpr int kMT = 2;  // 16 on AVX2: 4 x 2
#endif
constexpr int kNT = 4;

// rows n0 .. n1 of y for every activation row
template <int NT>
inline void rows(int64_t n, const uint8_t* wp, const uint16_t* szp, const int8_t* qp, const float* sp,
                 const float* sxp, float* yp, int64_t M, int64_t N, int64_t K, int64_t G, int64_t bpg, float* mz) {
  float out[NT * kMT];
  const uint8_t* w = wp + n * (K / 2);  // tile n / 4 starts at byte (n / 4) x (K / 2 x 4)
  const uint16_t* s = szp + n * G * 2;   // and its scales at (n / 4) x (G x 4 x 2)
  int64_t m = 0;
  for (; m + kMT <= M; m += kMT) {
    tile<NT, kMT>(w, s, qp + m * K, sp + m * G, K, G, bpg, mz, out);
    for (int a = 0; a < NT; ++a)
      for (int i = 0; i < kMT; ++i) yp[(m + i) * N + n + a] = sxp[m + i] * out[a * kMT + i];
  }
  for (; m < M; ++m) {
    tile<NT, 1>(w, s, qp + m * K, sp + m * G, K, G, bpg, mz, out);
    for (int a = 0; a < NT; ++a) yp[m * N + n + a] = sxp[m] * out[a];
  }
}

}  // namespace

// x [M, K] float32 -> y [M, N] float32
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor sz, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x: float32 [M, K]");
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == torch::kUInt8 && qw.is_contiguous(), "qw: uint8 [N / 4, K / 2 x 4]");
  TORCH_CHECK(sz.dim() == 4 && sz.scalar_type() == torch::kBFloat16 && sz.is_contiguous(), "sz: bf16 [N / 4, G, 4, 2]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0) * kNT;
  TORCH_CHECK(qw.size(1) == K * 2, "qw holds ", qw.size(1) / 2, " inputs per row, x has ", K);
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "group ", group, " must be a multiple of 32 dividing K=", K);
  const int64_t G = K / group, bpg = group / 32;
  TORCH_CHECK(sz.size(0) * kNT == N && sz.size(1) == G && sz.size(2) == kNT && sz.size(3) == 2, "sz must be [N / 4, G, 4, 2]");

  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xsum = torch::empty({M, G}, torch::kFloat32);  // exact: |sum| <= 127 x group
  auto sx = torch::empty({M}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sp = xsum.data_ptr<float>();
  float* sxp = sx.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * K;
    float a = 0.0f;
    // a NaN input makes the row's scale NaN, so the row's outputs are NaN (as in torch), not hidden
    for (int64_t k = 0; k < K; ++k) a = (std::fabs(r[k]) > a || std::isnan(r[k])) ? std::fabs(r[k]) : a;
    a = std::isnan(a) ? a : std::max(a, 1e-5f);
    const float inv = 127.0f / a;
    sxp[m] = a / 127.0f;
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        // round half to even, as torch.round
        const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(r[k] * inv)));
        qp[m * K + k] = static_cast<int8_t>(v);
        s += static_cast<int32_t>(v);
      }
      sp[m * G + g] = static_cast<float>(s);
    }
  }

  auto y = torch::empty({M, N}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = qw.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  // threads split the output rows in whole tiles
  at::parallel_for(0, N / kNT, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> mz(kNT * G);  // this tile's zero terms (z - 8 s) per row and group
    for (int64_t t = t0; t < t1; ++t) rows<kNT>(t * kNT, wp, szp, qp, sp, sxp, yp, M, N, K, G, bpg, mz.data());
  });
  return y;
}

std::string w4a8_isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

// a torch op (dispatched in C++: no Python between a compiled graph and the kernel)
TORCH_LIBRARY(ryzlab_w4a8, m) {
  m.def("linear(Tensor x, Tensor qw, Tensor sz, int group) -> Tensor");
}
TORCH_LIBRARY_IMPL(ryzlab_w4a8, CPU, m) {
  m.impl("linear", &w4a8_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4a8_isa", &w4a8_isa, "the instruction set this build's inner loop uses");
}
