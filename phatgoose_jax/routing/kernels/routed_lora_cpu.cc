// Routed LoRA on CPU as one XLA FFI custom call; built and registered by
// phatgoose_jax/routing/cpu_kernel.py (see its docstring for the contract).
//
//   y[t] = y_in[t] + sum_k coef[t, k] * (x[t] . A[idx[t, k]]) . B[idx[t, k]]
//
// Letters: T tokens, D input, F output, E experts, R rank, K experts per token, M rows of a
// register block. Inputs: y_in [T, F] (aliased to the output by the caller, so the base
// projection is accumulated in place), x [T, D], A [E, D, R], B [E, R, F], idx [T, K] int32,
// coef [T, K]; all float32 except idx. Attribute num_threads: the most tasks run at once.
//
// Two phases, so every expert's weights are read from memory once per call (the library, not
// the tokens, is what a routed site streams: 16-30 MB per T5-base site at E=166):
//   0. the T*K assignments are counting-sorted by expert (stable: a token's duplicate ids stay
//      adjacent);
//   1. h[p] = coef * x[token(p)] . A_e for every sorted assignment p, split over the thread pool
//      by expert ranges of similar cost (rows + weight streaming), into an [T*K, R] buffer;
//   2. y[token(p)] += h[p] . B_e, split over the pool by output-column ranges (no two tasks
//      write the same element of y; each reads only its columns of B_e).
// Both phases work on blocks of up to 8 rows held in vector registers; the row count M is a
// template parameter and a block with few rows runs several independent accumulator chains
// (partial sums over D in phase 1, more output columns in phase 2), so the one or two rows an
// expert gets at a decoder site do not wait on one FMA latency chain. R a multiple of 16: the
// vector path (one to four 16-float vectors per row); other R: scalar loops.
// Tasks go to XLA's intra-op pool (`RunParts`, run_parts.h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "run_parts.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using phatgoose_kernels::RunParts;

constexpr int kMaxRows = 8;
constexpr int64_t kLanes = 16;
typedef float v16 __attribute__((vector_size(64), aligned(4)));

inline v16 Load(const float* p) { v16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
// An explicit lane list (not `v16{} + s`, whose +0.0 the compiler must keep: an extra add per
// broadcast in the inner loops).
inline v16 Splat(float s) { return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

// Phase 1 block: h[j] = c[j] * x_j . A_e for M rows, R = NV * 16. U partial sums over D keep
// at least eight independent accumulators in flight.
template <int M, int NV>
void HBlock(const float* const* xr, const float* c, const float* ae, int64_t d, float* h) {
  constexpr int kR = NV * kLanes;
  constexpr int U = (M * NV >= 16) ? 1 : (16 / (M * NV));
  v16 acc[U][M][NV];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < M; ++j)
      for (int v = 0; v < NV; ++v) acc[u][j][v] = v16{};
  int64_t q = 0;
  for (; q + U <= d; q += U) {
    for (int u = 0; u < U; ++u) {
      v16 av[NV];
      for (int v = 0; v < NV; ++v) av[v] = Load(ae + (q + u) * kR + v * kLanes);
      for (int j = 0; j < M; ++j) {
        const v16 xv = Splat(xr[j][q + u]);
        for (int v = 0; v < NV; ++v) acc[u][j][v] += xv * av[v];
      }
    }
  }
  for (; q < d; ++q) {
    v16 av[NV];
    for (int v = 0; v < NV; ++v) av[v] = Load(ae + q * kR + v * kLanes);
    for (int j = 0; j < M; ++j) {
      const v16 xv = Splat(xr[j][q]);
      for (int v = 0; v < NV; ++v) acc[0][j][v] += xv * av[v];
    }
  }
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < NV; ++v) {
      v16 s = acc[0][j][v];
      for (int u = 1; u < U; ++u) s += acc[u][j][v];
      Store(h + j * kR + v * kLanes, s * Splat(c[j]));
    }
}

// Phase 2 block: y_j[o0:o1] += h_j . B_e[:, o0:o1] for M rows, CH*16 columns per pass.
template <int M>
void YBlock(float* const* yr, const float* h, const float* be, int64_t f, int64_t r,
            int64_t o0, int64_t o1) {
  constexpr int CH = M <= 2 ? 8 : (16 / M < 2 ? 2 : 16 / M);
  int64_t o = o0;
  for (; o + CH * kLanes <= o1; o += CH * kLanes) {
    v16 yv[M][CH];
    for (int j = 0; j < M; ++j)
      for (int c = 0; c < CH; ++c) yv[j][c] = Load(yr[j] + o + c * kLanes);
    for (int64_t s = 0; s < r; ++s) {
      v16 bv[CH];
      for (int c = 0; c < CH; ++c) bv[c] = Load(be + s * f + o + c * kLanes);
      for (int j = 0; j < M; ++j) {
        const v16 hs = Splat(h[j * r + s]);
        for (int c = 0; c < CH; ++c) yv[j][c] += hs * bv[c];
      }
    }
    for (int j = 0; j < M; ++j)
      for (int c = 0; c < CH; ++c) Store(yr[j] + o + c * kLanes, yv[j][c]);
  }
  for (; o + kLanes <= o1; o += kLanes) {
    v16 yv[M];
    for (int j = 0; j < M; ++j) yv[j] = Load(yr[j] + o);
    for (int64_t s = 0; s < r; ++s) {
      const v16 bv = Load(be + s * f + o);
      for (int j = 0; j < M; ++j) yv[j] += Splat(h[j * r + s]) * bv;
    }
    for (int j = 0; j < M; ++j) Store(yr[j] + o, yv[j]);
  }
  for (; o < o1; ++o)
    for (int j = 0; j < M; ++j) {
      float acc = 0.0f;
      for (int64_t s = 0; s < r; ++s) acc += h[j * r + s] * be[s * f + o];
      yr[j][o] += acc;
    }
}

// Any rank: h[j] = c[j] * x_j . A_e with scalar loops.
void HScalar(const float* const* xr, const float* c, int64_t m, const float* ae, int64_t d,
             int64_t r, float* h) {
  for (int64_t j = 0; j < m; ++j) {
    float* hj = h + j * r;
    for (int64_t s = 0; s < r; ++s) hj[s] = 0.0f;
    for (int64_t q = 0; q < d; ++q) {
      const float xv = xr[j][q];
      for (int64_t s = 0; s < r; ++s) hj[s] += xv * ae[q * r + s];
    }
    for (int64_t s = 0; s < r; ++s) hj[s] *= c[j];
  }
}

template <int NV>
void HDispatch(const float* const* xr, const float* c, int64_t m, const float* ae, int64_t d,
               float* h) {
  switch (m) {
    case 1: HBlock<1, NV>(xr, c, ae, d, h); break;
    case 2: HBlock<2, NV>(xr, c, ae, d, h); break;
    case 3: HBlock<3, NV>(xr, c, ae, d, h); break;
    case 4: HBlock<4, NV>(xr, c, ae, d, h); break;
    case 5: HBlock<5, NV>(xr, c, ae, d, h); break;
    case 6: HBlock<6, NV>(xr, c, ae, d, h); break;
    case 7: HBlock<7, NV>(xr, c, ae, d, h); break;
    default: HBlock<8, NV>(xr, c, ae, d, h); break;
  }
}

void YDispatch(float* const* yr, int64_t m, const float* h, const float* be, int64_t f,
               int64_t r, int64_t o0, int64_t o1) {
  switch (m) {
    case 1: YBlock<1>(yr, h, be, f, r, o0, o1); break;
    case 2: YBlock<2>(yr, h, be, f, r, o0, o1); break;
    case 3: YBlock<3>(yr, h, be, f, r, o0, o1); break;
    case 4: YBlock<4>(yr, h, be, f, r, o0, o1); break;
    case 5: YBlock<5>(yr, h, be, f, r, o0, o1); break;
    case 6: YBlock<6>(yr, h, be, f, r, o0, o1); break;
    case 7: YBlock<7>(yr, h, be, f, r, o0, o1); break;
    default: YBlock<8>(yr, h, be, f, r, o0, o1); break;
  }
}

struct Problem {
  const float *x, *a, *b, *coef;
  float* y;
  int64_t t, d, f, e, r, k;
  std::vector<int32_t> start;  // [E + 1] first sorted position of each expert
  std::vector<int32_t> order;  // [T * K] assignment (t * K + k) at each sorted position
  std::vector<float> h;        // [T * K, R] phase-1 rows in sorted order
};

// Phase 1 over experts [e0, e1): h rows of their sorted assignments.
void Phase1(Problem& p, int64_t e0, int64_t e1) {
  const int64_t nv = p.r % kLanes == 0 ? p.r / kLanes : 0;
  for (int64_t ex = e0; ex < e1; ++ex) {
    const float* ae = p.a + ex * p.d * p.r;  // [D, R]
    for (int64_t s = p.start[ex]; s < p.start[ex + 1];) {
      const int64_t m = std::min<int64_t>(kMaxRows, p.start[ex + 1] - s);
      const float* xr[kMaxRows];
      float c[kMaxRows];
      for (int64_t j = 0; j < m; ++j) {
        const int64_t asg = p.order[s + j];
        xr[j] = p.x + (asg / p.k) * p.d;
        c[j] = p.coef[asg];
      }
      float* h = p.h.data() + s * p.r;
      switch (nv) {
        case 1: HDispatch<1>(xr, c, m, ae, p.d, h); break;
        case 2: HDispatch<2>(xr, c, m, ae, p.d, h); break;
        case 3: HDispatch<3>(xr, c, m, ae, p.d, h); break;
        case 4: HDispatch<4>(xr, c, m, ae, p.d, h); break;
        default: HScalar(xr, c, m, ae, p.d, p.r, h); break;
      }
      s += m;
    }
  }
}

// Phase 2 over output columns [o0, o1), all experts.
void Phase2(Problem& p, int64_t o0, int64_t o1) {
  for (int64_t ex = 0; ex < p.e; ++ex) {
    const float* be = p.b + ex * p.r * p.f;  // [R, F]
    for (int64_t s = p.start[ex]; s < p.start[ex + 1];) {
      // A block holds rows of distinct tokens: a token routed twice to one expert (duplicate
      // ids, adjacent in the stable order) starts the next block, so no two register rows of a
      // block hold the same row of y.
      float* yr[kMaxRows];
      int64_t m = 0;
      for (; m < kMaxRows && s + m < p.start[ex + 1]; ++m) {
        const int64_t tok = p.order[s + m] / p.k;
        if (m > 0 && tok == p.order[s + m - 1] / p.k) break;
        yr[m] = p.y + tok * p.f;
      }
      YDispatch(yr, m, p.h.data() + s * p.r, be, p.f, p.r, o0, o1);
      s += m;
    }
  }
}

ffi::Error RoutedLoraImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y_in, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                          ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> coef,
                          ffi::ResultBuffer<ffi::F32> y, int64_t num_threads) {
  auto xd = x.dimensions(), ad = a.dimensions(), bd = b.dimensions(), id = idx.dimensions();
  if (xd.size() != 2 || ad.size() != 3 || bd.size() != 3 || id.size() != 2)
    return ffi::Error::InvalidArgument("routed_lora_cpu: bad ranks");
  Problem p;
  p.t = xd[0], p.d = xd[1], p.e = ad[0], p.r = ad[2], p.f = bd[2], p.k = id[1];
  if (ad[1] != p.d || bd[0] != p.e || bd[1] != p.r || id[0] != p.t)
    return ffi::Error::InvalidArgument("routed_lora_cpu: shape mismatch");
  const int32_t* ip = idx.typed_data();
  const int64_t n = p.t * p.k;
  for (int64_t i = 0; i < n; ++i)
    if (ip[i] < 0 || ip[i] >= p.e)
      return ffi::Error::InvalidArgument("routed_lora_cpu: expert id out of range");
  p.y = y->typed_data();
  if (y_in.dimensions().size() != 2 || y_in.dimensions()[0] != p.t ||
      y_in.dimensions()[1] != p.f)
    return ffi::Error::InvalidArgument("routed_lora_cpu: y shape");
  if (y_in.typed_data() != p.y) std::memcpy(p.y, y_in.typed_data(), sizeof(float) * p.t * p.f);
  if (n == 0 || p.r == 0) return ffi::Error::Success();
  p.x = x.typed_data(), p.a = a.typed_data(), p.b = b.typed_data(), p.coef = coef.typed_data();

  // 0. Stable counting sort of the assignments by expert.
  p.start.assign(p.e + 1, 0);
  p.order.resize(n);
  for (int64_t i = 0; i < n; ++i) p.start[ip[i] + 1]++;
  for (int64_t j = 0; j < p.e; ++j) p.start[j + 1] += p.start[j];
  {
    std::vector<int32_t> fill(p.start.begin(), p.start.end() - 1);
    for (int64_t i = 0; i < n; ++i) p.order[fill[ip[i]]++] = static_cast<int32_t>(i);
  }
  p.h.resize(n * p.r);

  // Small problems run on the calling thread (a task hand-off costs microseconds).
  const double flops = 2.0 * n * p.r * (p.d + p.f);
  const int64_t threads = flops < 2e5 ? 1 : std::max<int64_t>(1, num_threads);

  // 1. Expert ranges of similar cost: an expert costs its rows plus the streaming of A_e, taken
  //    as kStream rows (an estimate, not tuned: 49 KB of A_e at ~35 GB/s per thread against
  //    one 768x16 row product at ~100 GFLOP/s). 4 ranges per thread, claimed dynamically.
  constexpr int64_t kStream = 6;
  std::vector<int64_t> cuts = {0};
  if (threads > 1) {
    int64_t total = 0;
    for (int64_t ex = 0; ex < p.e; ++ex) {
      const int64_t rows = p.start[ex + 1] - p.start[ex];
      total += rows > 0 ? rows + kStream : 0;
    }
    const int64_t parts = std::min<int64_t>(4 * threads, p.e);
    int64_t acc = 0;
    for (int64_t ex = 0; ex < p.e && static_cast<int64_t>(cuts.size()) < parts; ++ex) {
      const int64_t rows = p.start[ex + 1] - p.start[ex];
      acc += rows > 0 ? rows + kStream : 0;
      if (acc * parts >= total * static_cast<int64_t>(cuts.size())) cuts.push_back(ex + 1);
    }
  }
  if (cuts.back() != p.e) cuts.push_back(p.e);
  auto run1 = [&p, &cuts](int64_t i) { Phase1(p, cuts[i], cuts[i + 1]); };
  RunParts(pool, static_cast<int64_t>(cuts.size()) - 1, run1);

  // 2. Output-column ranges (multiples of 16 columns, the tail with the last range).
  const int64_t chunks = p.f / kLanes;
  const int64_t parts2 = std::max<int64_t>(1, std::min<int64_t>(threads, chunks));
  auto run2 = [&p, chunks, parts2](int64_t i) {
    const int64_t o0 = chunks * i / parts2 * kLanes;
    const int64_t o1 = i + 1 == parts2 ? p.f : chunks * (i + 1) / parts2 * kLanes;
    Phase2(p, o0, o1);
  };
  RunParts(pool, parts2, run2);
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
