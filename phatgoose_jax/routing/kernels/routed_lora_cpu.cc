// Routed LoRA on CPU as one XLA FFI custom call; built and registered by
// phatgoose_jax/routing/cpu_kernel.py (see its docstring for the contract).
//
//   y[t] = y_in[t] + sum_k coef[t, k] * (x[t] . A[idx[t, k]]) . B[idx[t, k]]
//
// Letters: T tokens, D input, F output, E experts, R rank, K experts per token.
// Inputs: y_in [T, F] (aliased to the output by the caller, so the base projection is
// accumulated in place), x [T, D], A [E, D, R], B [E, R, F], idx [T, K] int32, coef [T, K];
// all float32 except idx. Attribute num_threads: the most token ranges run at once.
//
// Work split: the tokens are cut into up to num_threads contiguous ranges (at least 64 tokens
// each), one per task on XLA's intra-op thread pool; a range's assignments are counting-sorted
// by expert and each expert's rows are processed in blocks of kRowBlock: h = x . A_e with the
// block's rows in vector registers (R a multiple of 16: one to four 16-float vectors per row;
// other R: scalar loops), scaled by coef, then y += h . B_e sixteen output columns at a time.
// A token's K assignments fall in the same range, so no two tasks write the same row of y.
// The caller runs the first range itself and then waits only for ranges already claimed by
// pool threads, so the call cannot deadlock on a busy pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowBlock = 8;
constexpr int64_t kLanes = 16;
typedef float v16 __attribute__((vector_size(64), aligned(4)));

inline v16 Load(const float* p) { v16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline v16 Splat(float s) { return v16{} + s; }

// Counting sort of the assignments of tokens [t0, t1) by expert: order[start[e]..start[e+1]).
void SortByExpert(const int32_t* idx, int64_t e, int64_t k, int64_t t0, int64_t t1,
                  std::vector<int32_t>* start, std::vector<int32_t>* order) {
  start->assign(e + 1, 0);
  order->resize((t1 - t0) * k);
  for (int64_t i = t0 * k; i < t1 * k; ++i) (*start)[idx[i] + 1]++;
  for (int64_t j = 0; j < e; ++j) (*start)[j + 1] += (*start)[j];
  std::vector<int32_t> fill(start->begin(), start->end() - 1);
  for (int64_t i = t0 * k; i < t1 * k; ++i) (*order)[fill[idx[i]]++] = static_cast<int32_t>(i);
}

// NV = R / 16 vectors per LoRA row (R a multiple of 16); NV = 0: any R, scalar loops.
template <int NV>
void Block(const float* const* xr, float* const* yr, const float* c, int64_t m,
           const float* ae, const float* be, int64_t d, int64_t f, int64_t r) {
  float h[kRowBlock][NV > 0 ? NV * kLanes : 1];
  std::vector<float> hbuf;
  if constexpr (NV > 0) {
    v16 acc[kRowBlock][NV];
    for (int64_t j = 0; j < kRowBlock; ++j)
      for (int v = 0; v < NV; ++v) acc[j][v] = v16{};
    for (int64_t q = 0; q < d; ++q) {
      v16 av[NV];
      for (int v = 0; v < NV; ++v) av[v] = Load(ae + q * r + v * kLanes);
      for (int64_t j = 0; j < kRowBlock; ++j) {
        if (j >= m) break;
        const v16 xv = Splat(xr[j][q]);
        for (int v = 0; v < NV; ++v) acc[j][v] += xv * av[v];
      }
    }
    for (int64_t j = 0; j < m; ++j)
      for (int v = 0; v < NV; ++v) Store(h[j] + v * kLanes, acc[j][v] * Splat(c[j]));
  }
  // Generic rank: h rows live in hbuf (the fixed-size h above is only used when NV > 0).
  float* hp[kRowBlock];
  if constexpr (NV > 0) {
    for (int64_t j = 0; j < kRowBlock; ++j) hp[j] = h[j];
  } else {
    hbuf.assign(kRowBlock * r, 0.0f);
    for (int64_t j = 0; j < kRowBlock; ++j) hp[j] = hbuf.data() + j * r;
  }
  if constexpr (NV == 0) {
    float* const* h = hp;
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t s = 0; s < r; ++s) h[j][s] = 0.0f;
      for (int64_t q = 0; q < d; ++q) {
        const float xv = xr[j][q];
        for (int64_t s = 0; s < r; ++s) h[j][s] += xv * ae[q * r + s];
      }
      for (int64_t s = 0; s < r; ++s) h[j][s] *= c[j];
    }
  }
  // y[j] += h[j] . B_e, 16 output columns at a time with the block's rows in registers.
  int64_t o = 0;
  for (; o + kLanes <= f; o += kLanes) {
    v16 yv[kRowBlock];
    for (int64_t j = 0; j < m; ++j) yv[j] = Load(yr[j] + o);
    for (int64_t s = 0; s < r; ++s) {
      const v16 bv = Load(be + s * f + o);
      for (int64_t j = 0; j < kRowBlock; ++j) {
        if (j >= m) break;
        yv[j] += Splat(hp[j][s]) * bv;
      }
    }
    for (int64_t j = 0; j < m; ++j) Store(yr[j] + o, yv[j]);
  }
  for (; o < f; ++o)
    for (int64_t j = 0; j < m; ++j) {
      float acc = 0.0f;
      for (int64_t s = 0; s < r; ++s) acc += hp[j][s] * be[s * f + o];
      yr[j][o] += acc;
    }
}

// The sorted assignments of experts [e_lo, e_hi) (order/start from SortByExpert), added to y.
void ExpertRange(const float* x, const float* a, const float* b, const float* coef, float* y,
                 const std::vector<int32_t>& start, const std::vector<int32_t>& order,
                 int64_t d, int64_t f, int64_t r, int64_t k, int64_t e_lo, int64_t e_hi) {
  for (int64_t ex = e_lo; ex < e_hi; ++ex) {
    const float* ae = a + ex * d * r;  // [D, R]
    const float* be = b + ex * r * f;  // [R, F]
    for (int64_t p = start[ex]; p < start[ex + 1];) {
      // A block holds up to kRowBlock rows of distinct tokens: a token routed twice to one
      // expert (duplicate ids; adjacent in the sorted order) starts the next block, so no two
      // register rows of a block write the same row of y.
      const float* xr[kRowBlock];
      float* yr[kRowBlock];
      float c[kRowBlock];
      int64_t m = 0;
      for (; m < kRowBlock && p + m < start[ex + 1]; ++m) {
        const int64_t asg = order[p + m];
        if (m > 0 && asg / k == order[p + m - 1] / k) break;
        xr[m] = x + (asg / k) * d;
        yr[m] = y + (asg / k) * f;
        c[m] = coef[asg];
      }
      p += m;
      switch (r) {
        case 16: Block<1>(xr, yr, c, m, ae, be, d, f, r); break;
        case 32: Block<2>(xr, yr, c, m, ae, be, d, f, r); break;
        case 48: Block<3>(xr, yr, c, m, ae, be, d, f, r); break;
        case 64: Block<4>(xr, yr, c, m, ae, be, d, f, r); break;
        default: Block<0>(xr, yr, c, m, ae, be, d, f, r); break;
      }
    }
  }
}

// Tokens [t0, t1), all experts: a task of the token split.
void TokenRange(const float* x, const float* a, const float* b, const int32_t* idx,
                const float* coef, float* y, int64_t d, int64_t f, int64_t e, int64_t r,
                int64_t k, int64_t t0, int64_t t1) {
  std::vector<int32_t> start, order;
  SortByExpert(idx, e, k, t0, t1, &start, &order);
  ExpertRange(x, a, b, coef, y, start, order, d, f, r, k, 0, e);
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs run(0..parts-1): parts-1 tasks go to the pool, the caller claims parts as well and then
// waits only for parts already claimed by running tasks (so a busy pool cannot deadlock it).
// `run` may reference the caller's stack: every part has finished when RunParts returns, and a
// task that starts later finds no part left and touches only `shared`.
template <typename Run>
void RunParts(ffi::ThreadPool& pool, int64_t parts, std::shared_ptr<Shared> shared, Run& run) {
  auto claim = [&run](Shared* sh, int64_t parts) {
    for (;;) {
      const int64_t p = sh->next.fetch_add(1);
      if (p >= parts) return;
      run(p);
      sh->done.fetch_add(1);
    }
  };
  for (int64_t i = 1; i < parts; ++i) {
    std::function<void()> task = [shared, parts, &run, claim]() { claim(shared.get(), parts); };
    pool.Schedule(std::move(task));
  }
  claim(shared.get(), parts);
  while (shared->done.load() < parts) std::this_thread::yield();
}

ffi::Error RoutedLoraImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y_in, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                          ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> coef,
                          ffi::ResultBuffer<ffi::F32> y, int64_t num_threads) {
  auto xd = x.dimensions(), ad = a.dimensions(), bd = b.dimensions(), id = idx.dimensions();
  if (xd.size() != 2 || ad.size() != 3 || bd.size() != 3 || id.size() != 2)
    return ffi::Error::InvalidArgument("routed_lora_cpu: bad ranks");
  const int64_t t = xd[0], d = xd[1], e = ad[0], r = ad[2], f = bd[2], k = id[1];
  if (ad[1] != d || bd[0] != e || bd[1] != r || id[0] != t)
    return ffi::Error::InvalidArgument("routed_lora_cpu: shape mismatch");
  const int32_t* ip = idx.typed_data();
  for (int64_t i = 0; i < t * k; ++i)
    if (ip[i] < 0 || ip[i] >= e)
      return ffi::Error::InvalidArgument("routed_lora_cpu: expert id out of range");
  float* yp = y->typed_data();
  if (y_in.dimensions().size() != 2 || y_in.dimensions()[0] != t || y_in.dimensions()[1] != f)
    return ffi::Error::InvalidArgument("routed_lora_cpu: y shape");
  if (y_in.typed_data() != yp) std::memcpy(yp, y_in.typed_data(), sizeof(float) * t * f);
  const float *xp = x.typed_data(), *ap = a.typed_data(), *bp = b.typed_data(),
              *cp = coef.typed_data();
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(num_threads, t / 64));
  if (parts <= 1) {
    TokenRange(xp, ap, bp, ip, cp, yp, d, f, e, r, k, 0, t);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<Shared>();
  auto run = [=](int64_t p) {
    TokenRange(xp, ap, bp, ip, cp, yp, d, f, e, r, k, t * p / parts, t * (p + 1) / parts);
  };
  RunParts(pool, parts, shared, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhatgooseRoutedLoraF32, RoutedLoraImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_threads"));
