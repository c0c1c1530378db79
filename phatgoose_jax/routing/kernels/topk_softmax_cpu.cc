// Router softmax + top-k on CPU as one XLA FFI custom call; built and registered with the
// routed-LoRA kernel by phatgoose_jax/routing/cpu_kernel.py (see `top_k_softmax_et`).
//
// Input: logits [E, T] float32, expert-major (the router matmul written as gates . x^T, which
// XLA:CPU runs faster than x . gates^T for E of a few hundred). For every token t:
//   l[e]  = scale * logits[e, t]
//   p[e]  = exp(l[e] - max_e l) / sum_e exp(l[e] - max_e l)          (softmax over all E)
//   top-k of p, ties to the lowest expert index (as jax.lax.top_k)
//   w[k]  = p[k] / (sum_k p[k] + eps)    or p[k] when renormalize == 0
// Outputs: weights [T, K] float32, indices [T, K] int32. A token whose softmax is NaN (a NaN or
// +inf logit, or all -inf) gets NaN weights and indices 0..K-1, as lax.top_k on NaN probabilities.
//
// Letters: T tokens, E experts, K kept (1..4). Tokens are processed 16 at a time, one per vector
// lane, so every reduction over E is elementwise across lanes; the exp is a degree-7 polynomial
// after the usual ln2 range reduction (within ~2 ulp of expf; the JAX path's exp differs from it
// in the last bits, so weights agree to ~1e-7 relative, not bit for bit).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "run_parts.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using phatgoose_kernels::RunParts;

constexpr int64_t kLanes = 16;

// exp(x) for x <= 0 (or NaN): n = round(x / ln2), r = x - n ln2, 2^n * poly(r).
inline float ExpNonPositive(float x) {
  if (x < -87.33654f) return 0.0f;  // below FLT_MIN: flushed to zero, as XLA:CPU does
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = n * -0.693145751953125f + x;
  r = n * -1.428606765330187045e-06f + r;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  if (!(n >= -126.0f)) bits = 0;  // NaN: p is NaN already; tiny n: cannot happen above
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <int K>
void Block(const float* lg, int64_t t, int64_t e, int64_t t0, int64_t lanes, float scale,
           float eps, bool renormalize, float* ex, float* w_out, int32_t* i_out) {
  float m[kLanes], s[kLanes], val[K][kLanes];
  int32_t idx[K][kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    m[l] = -std::numeric_limits<float>::infinity();
    s[l] = 0.0f;
  }
  // 1. Row max with NaN propagating (once NaN, stays NaN).
  for (int64_t j = 0; j < e; ++j) {
    const float* row = lg + j * t + t0;
    for (int64_t l = 0; l < lanes; ++l) {
      const float v = row[l] * scale;
      m[l] = (v > m[l] || v != v) ? v : m[l];
    }
  }
  // 2. exp(l - max), kept for pass 3, and its sum.
  for (int64_t j = 0; j < e; ++j) {
    const float* row = lg + j * t + t0;
    float* er = ex + j * kLanes;
    for (int64_t l = 0; l < lanes; ++l) {
      const float v = ExpNonPositive(row[l] * scale - m[l]);
      er[l] = v;
      s[l] += v;
    }
  }
  // 3. Top-k of p = exp / sum: strict '>' keeps the lowest index among equal probabilities.
  for (int k = 0; k < K; ++k)
    for (int64_t l = 0; l < kLanes; ++l) {
      val[k][l] = -1.0f;
      idx[k][l] = 0;
    }
  for (int64_t j = 0; j < e; ++j) {
    const float* er = ex + j * kLanes;
    for (int64_t l = 0; l < lanes; ++l) {
      const float p = er[l] / s[l];
      bool gt[K];
      for (int k = 0; k < K; ++k) gt[k] = p > val[k][l];
      for (int k = K - 1; k > 0; --k) {
        val[k][l] = gt[k - 1] ? val[k - 1][l] : (gt[k] ? p : val[k][l]);
        idx[k][l] = gt[k - 1] ? idx[k - 1][l] : (gt[k] ? static_cast<int32_t>(j) : idx[k][l]);
      }
      val[0][l] = gt[0] ? p : val[0][l];
      idx[0][l] = gt[0] ? static_cast<int32_t>(j) : idx[0][l];
    }
  }
  for (int64_t l = 0; l < lanes; ++l) {
    float* wr = w_out + (t0 + l) * K;
    int32_t* ir = i_out + (t0 + l) * K;
    if (s[l] != s[l]) {  // NaN softmax: every probability NaN
      for (int k = 0; k < K; ++k) {
        wr[k] = std::numeric_limits<float>::quiet_NaN();
        ir[k] = k;
      }
      continue;
    }
    float kept = 0.0f;
    for (int k = 0; k < K; ++k) kept += val[k][l];
    const float denom = kept + eps;
    for (int k = 0; k < K; ++k) {
      wr[k] = renormalize ? val[k][l] / denom : val[k][l];
      ir[k] = idx[k][l];
    }
  }
}

ffi::Error TopKSoftmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                           ffi::ResultBuffer<ffi::F32> weights, ffi::ResultBuffer<ffi::S32> indices,
                           int64_t k, float scale, float eps, bool renormalize,
                           int64_t num_threads) {
  auto ld = logits.dimensions();
  if (ld.size() != 2)
    return ffi::Error::InvalidArgument("top_k_softmax_cpu: logits must be [E, T]");
  const int64_t e = ld[0], t = ld[1];
  if (k < 1 || k > 4 || k > e)
    return ffi::Error::InvalidArgument("top_k_softmax_cpu: need 1 <= k <= min(4, E)");
  auto wd = weights->dimensions(), id = indices->dimensions();
  if (wd.size() != 2 || wd[0] != t || wd[1] != k || id.size() != 2 || id[0] != t || id[1] != k)
    return ffi::Error::InvalidArgument("top_k_softmax_cpu: outputs must be [T, k]");
  const float* lg = logits.typed_data();
  float* wp = weights->typed_data();
  int32_t* ip = indices->typed_data();
  const int64_t blocks = (t + kLanes - 1) / kLanes;
  auto block_range = [=](int64_t b0, int64_t b1) {
    std::vector<float> buf(e * kLanes);  // the block's exp values
    float* ex = buf.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * kLanes, lanes = std::min<int64_t>(kLanes, t - t0);
      switch (k) {
        case 1: Block<1>(lg, t, e, t0, lanes, scale, eps, renormalize, ex, wp, ip); break;
        case 2: Block<2>(lg, t, e, t0, lanes, scale, eps, renormalize, ex, wp, ip); break;
        case 3: Block<3>(lg, t, e, t0, lanes, scale, eps, renormalize, ex, wp, ip); break;
        default: Block<4>(lg, t, e, t0, lanes, scale, eps, renormalize, ex, wp, ip); break;
      }
    }
  };
  // One part per thread when there is enough work (a task hand-off costs microseconds).
  const int64_t parts =
      t * e < (1 << 16) ? 1 : std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks));
  auto run = [&](int64_t p) { block_range(blocks * p / parts, blocks * (p + 1) / parts); };
  RunParts(pool, parts, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhatgooseTopKSoftmaxF32, TopKSoftmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<float>("scale")
                                  .Attr<float>("eps")
                                  .Attr<bool>("renormalize")
                                  .Attr<int64_t>("num_threads"));
