// out[b] = x[b]^T @ g[b] for x [B, C, M] and g [B, C, N] (float32, row-major): the weight gradient of a
// batched matmul, which contracts over the rows of both operands. XLA's CPU backend gives this dot to Eigen
// (YNNPACK takes no transposed left operand), at 50-60 GFLOP/s a core on the expert FFN's shapes against
// OpenBLAS's 88 (docs/BENCHMARKS.md). Compiled and loaded by kernels/cpu_matmul.py.
//
// Each batch entry is one single-threaded sgemm, run as a task on XLA's own intra-op thread pool, and the call
// completes asynchronously when the last one has: the way XLA runs its own Eigen dots. A kernel with threads
// of its own fought XLA's for the cores (the step took 1.42x as long) and one that blocked an XLA thread left
// the other core idle (1.09x); as pool tasks it made the step faster.
#include <dlfcn.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm of OpenBLAS's 64-bit-integer interface, as the scipy-openblas64 package names it.
using Sgemm = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

Sgemm sgemm = nullptr;

ffi::Future TransAMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto dims_x = x.dimensions();
  const int64_t batch = dims_x[0], rows = dims_x[1], m = dims_x[2], n = g.dimensions()[2];
  const float* px = x.typed_data();
  const float* pg = g.typed_data();
  float* po = out->typed_data();
  ffi::CountDownPromise done(batch);
  ffi::Future future(done);
  for (int64_t b = 0; b < batch; ++b) {
    pool.Schedule([=]() mutable {
      sgemm(kRowMajor, kTrans, kNoTrans, m, n, rows, 1.0f, px + b * rows * m, m, pg + b * rows * n, n, 0.0f,
            po + b * m * n, n);
      done.CountDown(1);
    });
  }
  return future;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkymoeTransAMatmul, TransAMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Resolves sgemm in the OpenBLAS library at `path` and keeps it to one thread per call (the pool supplies the
// parallelism). Returns 0, or 1 when the library does not load, 2 when it lacks the symbols.
extern "C" int skymoe_cpu_matmul_init(const char* path) {
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) return 1;
  sgemm = reinterpret_cast<Sgemm>(dlsym(library, "scipy_cblas_sgemm64_"));
  auto set_threads = reinterpret_cast<void (*)(int)>(dlsym(library, "scipy_openblas_set_num_threads64_"));
  if (sgemm == nullptr || set_threads == nullptr) return 2;
  set_threads(1);
  return 0;
}
