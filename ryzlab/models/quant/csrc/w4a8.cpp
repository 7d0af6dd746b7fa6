// W4A8 linear layer for CPUs: int4 weights (a bf16 scale and zero per group of input values)
// times activations rounded to int8 per block of 32 (absmax / 127, as llama.cpp's Q8_0),
// multiplied in integers.
//
// What llama.cpp does for Q4 x Q8: unsigned x signed byte products (AVX2 maddubs + madd, or VNNI
// dpbusd), a float multiply-add by each block's scale. Written for ryzlab, not copied: the
// weight layout, the zero handling, the tiling and the threading are ours.
//
// y[m, n] = sum_g ( s[n, g] * sum_{b in g} sx[m, b] sum_{k in b} q[n, k] xq[m, k]
//                   + (z[n, g] - 8 s[n, g]) * sum_{b in g} sx[m, b] sum_{k in b} xq[m, k] )
// which is exactly  dequant(W) @ (sx * xq)  with  w = (q - 8) s + z  (torch's int4 convention) and
// sx the activation scale of each block, up to float32 rounding of the sums.
//
// Layout: output rows in tiles of 8 (rows padded to a multiple of 8), one vector lane per row.
// qw [N / 8, K / 2 x 8] uint8: per block of 32 inputs, 4 chunks of 32 bytes; chunk c byte j holds
// row j / 4's inputs 4c + j % 4 (low nibble) and 16 + 4c + j % 4 (high nibble). So one chunk,
// masked or shifted, is 4 inputs of each of the 8 rows, multiplied by those 4 activation bytes
// broadcast to every lane: the 8 lanes end as the 8 rows' sums, and a block needs one float
// convert and one multiply-add for its 8 rows (not one per row, as with one row per vector).
// The 8 maddubs of a block sum in int16 (at most 8 x 2 x 15 x 127 = 30480 < 32767).
// sz [N / 8, G, 2, 8] bf16: per group, the 8 rows' scales, then their zeros.

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

constexpr int kTile = 8;  // output rows per tile (one 256-bit vector of float32 lanes)

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX2__)
constexpr int kMT = 4;  // activation rows per pass over a tile

inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256i bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// one activation block of 32 floats -> int8 codes, as the scalar loop in w4a8_linear (absmax
// floored at 1e-5, 127 / a, round half to even, clamp): the same operations, 8 lanes at a time.
// False (nothing written) for a block holding a NaN or an infinity: the scalar loop handles it.
inline bool quantize_block(const float* r, int8_t* q, float* scale, int32_t* sum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(r + 8 * i);
    m = _mm256_max_ps(m, _mm256_and_ps(v[i], absmask));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return false;
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  const float a = std::max(_mm_cvtss_f32(h), 1e-5f);
  if (!std::isfinite(a)) return false;  // an infinite input: the scalar loop's clamping, not cvtps' INT_MIN
  const __m256 inv = _mm256_set1_ps(127.0f / a), top = _mm256_set1_ps(127.0f), bottom = _mm256_set1_ps(-127.0f);
  __m256i qi[4], s = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 x = _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    qi[i] = _mm256_cvtps_epi32(_mm256_min_ps(top, _mm256_max_ps(bottom, x)));
    s = _mm256_add_epi32(s, qi[i]);
  }
  // packs interleave 128-bit lanes: 32-bit groups come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] ...
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  *sum = _mm_cvtsi128_si32(t);
  *scale = a / 127.0f;
  return true;
}

// int32 sums of one block (32 inputs) for the tile's 8 rows x MT activation rows (stride K)
template <int MT>
inline void block_dots(const uint8_t* w, const int8_t* x, int64_t K, __m256i* d) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
  // high nibbles used in place (v & 0xF0 = 16 q): one op less per chunk, and a second chain of
  // sums (exact: 240 x 127 x 4 per lane and dpbusd, far from int32's range; a multiple of 16)
  const __m256i himask = _mm256_set1_epi8(static_cast<char>(0xF0));
  __m256i h[MT];
  for (int i = 0; i < MT; ++i) d[i] = h[i] = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(v, himask);
    for (int i = 0; i < MT; ++i) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
      d[i] = _mm256_dpbusd_epi32(d[i], lo, bcast4(x + i * K + 4 * c));
      h[i] = _mm256_dpbusd_epi32(h[i], hi, bcast4(x + i * K + 16 + 4 * c));
#else
      d[i] = _mm256_dpbusd_avx_epi32(d[i], lo, bcast4(x + i * K + 4 * c));
      h[i] = _mm256_dpbusd_avx_epi32(h[i], hi, bcast4(x + i * K + 16 + 4 * c));
#endif
    }
  }
  for (int i = 0; i < MT; ++i) d[i] = _mm256_add_epi32(d[i], _mm256_srai_epi32(h[i], 4));
#else
  __m256i s[MT];
  for (int i = 0; i < MT; ++i) s[i] = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    for (int i = 0; i < MT; ++i) {
      s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(lo, bcast4(x + i * K + 4 * c)));
      s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(hi, bcast4(x + i * K + 16 + 4 * c)));
    }
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < MT; ++i) d[i] = _mm256_madd_epi16(s[i], ones);
#endif
}

// one tile (8 output rows) x MT activation rows -> y[m, n .. n + 7]
// xs [M, B]: each activation block's scale; xz [M, G]: sum over a group's blocks of scale x sum(xq)
template <int MT>
inline void tile(const uint8_t* wt, const uint16_t* sz, const int8_t* xq, const float* xs, const float* xz,
                 float* y, int64_t N, int64_t K, int64_t G, int64_t bpg) {
  const int64_t B = G * bpg;
  __m256 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t g = 0; g < G; ++g) {
    const __m256 s = load_bf16x8(sz + g * 16);
    const __m256 mz = _mm256_fnmadd_ps(eight, s, load_bf16x8(sz + g * 16 + 8));  // z - 8 s
    __m256 dg[MT];
    for (int64_t bb = 0; bb < bpg; ++bb) {  // a group's blocks, each times its activation scale
      const int64_t b = g * bpg + bb;
      __m256i d[MT];
      block_dots<MT>(wt + b * 128, xq + b * 32, K, d);
      for (int i = 0; i < MT; ++i) {
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(d[i]), _mm256_set1_ps(xs[i * B + b]));
        dg[i] = bb ? _mm256_add_ps(dg[i], f) : f;
      }
    }
    for (int i = 0; i < MT; ++i) {
      acc[i] = _mm256_fmadd_ps(dg[i], s, acc[i]);
      acc[i] = _mm256_fmadd_ps(mz, _mm256_set1_ps(xz[i * G + g]), acc[i]);
    }
  }
  for (int i = 0; i < MT; ++i) _mm256_storeu_ps(y + i * N, acc[i]);
}
#else
constexpr int kMT = 1;

template <int MT>
inline void tile(const uint8_t* wt, const uint16_t* sz, const int8_t* xq, const float* xs, const float* xz,
                 float* y, int64_t N, int64_t K, int64_t G, int64_t bpg) {
  for (int r = 0; r < kTile; ++r) {
    float acc = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      const float s = bf16_to_f32(sz[g * 16 + r]), z = bf16_to_f32(sz[g * 16 + 8 + r]);
      float dg = 0.0f;
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        int32_t d = 0;
        for (int c = 0; c < 4; ++c)
          for (int j = 0; j < 4; ++j) {
            const uint8_t q = wt[b * 128 + c * 32 + r * 4 + j];
            d += (q & 15) * xq[b * 32 + 4 * c + j] + (q >> 4) * xq[b * 32 + 16 + 4 * c + j];
          }
        dg += static_cast<float>(d) * xs[b];
      }
      acc += s * dg + (z - 8.0f * s) * xz[g];
    }
    y[r] = acc;
  }
}
#endif

}  // namespace

// x [M, K] float32 -> y [M, N] float32
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor sz, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x: float32 [M, K]");
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == torch::kUInt8 && qw.is_contiguous(), "qw: uint8 [N / 8, K / 2 x 8]");
  TORCH_CHECK(sz.dim() == 4 && sz.scalar_type() == torch::kBFloat16 && sz.is_contiguous(), "sz: bf16 [N / 8, G, 2, 8]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0) * kTile;
  TORCH_CHECK(qw.size(1) == K * kTile / 2, "qw holds ", qw.size(1) * 2 / kTile, " inputs per row, x has ", K);
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "group ", group, " must be a multiple of 32 dividing K=", K);
  const int64_t G = K / group, bpg = group / 32;
  TORCH_CHECK(sz.size(0) * kTile == N && sz.size(1) == G && sz.size(2) == 2 && sz.size(3) == kTile,
              "sz must be [N / 8, G, 2, 8]");

  const int64_t B = K / 32;
  // the rounded activations live in per-thread scratch (no allocation per call)
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs, xz;  // each block's scale; per group: sum of scale x sum(xq) over its blocks
  xq.resize(M * K);
  xs.resize(M * B);
  xz.resize(M * G);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data();
  float* xsp = xs.data();
  float* xzp = xz.data();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      float zg = 0.0f;
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        const float* r = xp + m * K + b * 32;
        int32_t sum = 0;
#if defined(__AVX2__)
        if (quantize_block(r, qp + m * K + b * 32, xsp + m * B + b, &sum)) {
          zg += xsp[m * B + b] * static_cast<float>(sum);
          continue;
        }
#endif
        float a = 0.0f;
        // a NaN input makes its block's scale NaN, so the row's outputs are NaN (as in torch), not hidden
        for (int k = 0; k < 32; ++k) a = (std::fabs(r[k]) > a || std::isnan(r[k])) ? std::fabs(r[k]) : a;
        a = std::isnan(a) ? a : std::max(a, 1e-5f);
        const float inv = 127.0f / a, sc = a / 127.0f;
        for (int k = 0; k < 32; ++k) {
          // round half to even, as torch.round
          const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(r[k] * inv)));
          qp[m * K + b * 32 + k] = static_cast<int8_t>(v);
          sum += static_cast<int32_t>(v);
        }
        xsp[m * B + b] = sc;
        zg += sc * static_cast<float>(sum);
      }
      xzp[m * G + g] = zg;
    }
  }

  auto y = torch::empty({M, N}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = qw.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  // threads split the output rows in whole tiles; each tile meets every activation row, kMT at a time
  at::parallel_for(0, N / kTile, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* wt = wp + t * (K * kTile / 2);
      const uint16_t* st = szp + t * G * 2 * kTile;
      int64_t m = 0;
      for (; m + kMT <= M; m += kMT)
        tile<kMT>(wt, st, qp + m * K, xsp + m * B, xzp + m * G, yp + m * N + t * kTile, N, K, G, bpg);
      for (; m < M; ++m) tile<1>(wt, st, qp + m * K, xsp + m * B, xzp + m * G, yp + m * N + t * kTile, N, K, G, bpg);
    }
  });
  return y;
}

// rows idx of the weight, float32 [R, K] (embedding lookups: (q - 8) s + z, as the torch reference)
torch::Tensor w4a8_rows(torch::Tensor qw, torch::Tensor sz, torch::Tensor idx) {
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == torch::kUInt8 && qw.is_contiguous(), "qw: uint8 [N / 8, K / 2 x 8]");
  TORCH_CHECK(sz.dim() == 4 && sz.scalar_type() == torch::kBFloat16 && sz.is_contiguous(), "sz: bf16 [N / 8, G, 2, 8]");
  TORCH_CHECK(idx.scalar_type() == torch::kLong, "idx: int64");
  const int64_t N = qw.size(0) * kTile, K = qw.size(1) * 2 / kTile, G = sz.size(1);
  TORCH_CHECK(sz.size(0) == qw.size(0) && G > 0 && K % G == 0 && (K / G) % 32 == 0, "sz does not fit qw");
  auto ix = idx.reshape({-1}).contiguous();
  const int64_t R = ix.numel(), group = K / G;
  const int64_t* ip = ix.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "row ", ip[i], " out of range [0, ", N, ")");
  auto out = torch::empty({R, K}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = qw.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < R; ++i) {
    const int64_t t = ip[i] / kTile, r = ip[i] % kTile;
    const uint8_t* wt = wp + t * (K * kTile / 2);
    const uint16_t* st = szp + t * G * 2 * kTile;
    float* o = op + i * K;
    for (int64_t b = 0; b < K / 32; ++b) {
      const int64_t g = b * 32 / group;
      const float s = bf16_to_f32(st[g * 16 + r]), z = bf16_to_f32(st[g * 16 + 8 + r]);
      for (int c = 0; c < 4; ++c)
        for (int j = 0; j < 4; ++j) {
          const uint8_t q = wt[b * 128 + c * 32 + r * 4 + j];
          o[b * 32 + 4 * c + j] = (static_cast<float>(q & 15) - 8.0f) * s + z;
          o[b * 32 + 16 + 4 * c + j] = (static_cast<float>(q >> 4) - 8.0f) * s + z;
        }
    }
  }
  return out;
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
  m.def("rows(Tensor qw, Tensor sz, Tensor idx) -> Tensor");
}
TORCH_LIBRARY_IMPL(ryzlab_w4a8, CPU, m) {
  m.impl("linear", &w4a8_linear);
  m.impl("rows", &w4a8_rows);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4a8_isa", &w4a8_isa, "the instruction set this build's inner loop uses");
}
