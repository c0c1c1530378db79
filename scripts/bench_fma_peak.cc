// Peak float32 FMA rate of this CPU (the ceiling the routing benchmarks compare against).
// 12 independent 16-wide AVX-512 FMA chains per thread, register resident, best of 5 runs.
//   g++ -O3 -march=native -mprefer-vector-width=512 -pthread scripts/bench_fma_peak.cc -o /tmp/fma
//   /tmp/fma 1; /tmp/fma 2        # threads
// docs/benchmarks.md ("Session 6") quotes its result.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
static double run(long iters) {
  __m512 a[12]; __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + i);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], m, c);
  }
  __m512 s = a[0]; for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}
int main(int argc, char** argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1; long iters = 200000000L / 12 * 4;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> ts; std::vector<double> out(threads);
    for (int t = 0; t < threads; ++t) ts.emplace_back([&, t] { out[t] = run(iters); });
    for (auto& th : ts) th.join();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double gf = threads * (double)iters * 12 * 16 * 2 / s / 1e9;
    if (gf > best) best = gf;
    fprintf(stderr, "rep %d: %.1f GFLOP/s (%.3f s) chk %.1f\n", rep, gf, s, out[0]);
  }
  printf("PEAK %d threads: %.1f GFLOP/s\n", threads, best);
}
