// out[e] = x_e^T @ g_e, expert e's rows of x [.., M] and g [.., N] (float32, row-major), summed: a weight gradient,
// which contracts over the rows of both operands (the dense projections' on one device, as one entry of all rows;
// the experts' own are summed inside cpu_expert_ffn.cc's backward). The rows are either slot
// buffers [E, C, .] with used [E, K] (each expert's C rows are K equal runs that fill from their first row, the
// rest zero, so the sum skips them) or the rows sorted by expert [A, .] with group sizes [E] (cpu_common.h's
// RowRanges). XLA's CPU backend gives this dot to Eigen (YNNPACK takes no transposed left operand), at 50-60
// GFLOP/s a core on the expert FFN's shapes against OpenBLAS's 88 (docs/BENCHMARKS.md), and has no grouped form
// of it. Built and loaded by kernels/cpu_ffi.py.
//
// Each expert is a task of single-threaded sgemms on XLA's own intra-op thread pool (cpu_common.h): with
// threads of its own the kernel made the step take 1.42x as long, blocking an XLA thread 1.09x; as pool tasks it
// made the step faster.
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "cpu_blas.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace skymoe {
Sgemm sgemm = nullptr;
}  // namespace skymoe

namespace {

using skymoe::kNoTrans, skymoe::kRowMajor, skymoe::kTrans, skymoe::sgemm;

// Tasks enough to keep XLA's pool busy whatever the scheduling (it has a thread per core).
constexpr int64_t kMinTasks = 8;

ffi::Future TransAMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                         ffi::Buffer<ffi::S32> counts, ffi::ResultBuffer<ffi::F32> out) {
  const auto table = std::make_shared<const skymoe::RowRanges>(skymoe::RangesOf(x.dimensions(), counts));
  const int64_t m = x.dimensions().back(), n = g.dimensions().back();
  const float* px = x.typed_data();
  const float* pg = g.typed_data();
  float* po = out->typed_data();
  // Few experts (a dense layer's gradient is one) leave pool threads idle with a task per expert: their output
  // columns are split into parts, in multiples of 16 (a quiet step ran the dense gradients on one core).
  const int64_t parts = std::max<int64_t>(1, std::min((kMinTasks + table->experts - 1) / table->experts, n / 64));
  const int64_t width = (n + parts - 1) / parts + 15 & ~int64_t{15};
  return skymoe::RunTasks(pool, table->experts * parts, [=](int64_t t) {
    const int64_t e = t / parts, c0 = t % parts * width, w = std::min(width, n - c0);
    if (w <= 0) return;
    float* o = po + e * m * n + c0;
    for (int64_t row = 0; row < m; ++row) std::fill(o + row * n, o + row * n + w, 0.0f);
    for (int64_t i = e * table->per_expert; i < (e + 1) * table->per_expert; ++i) {
      const skymoe::RowRange& r = table->ranges[i];
      if (r.live == 0) continue;
      sgemm(kRowMajor, kTrans, kNoTrans, m, w, r.live, 1.0f, px + r.start * m, m, pg + r.start * n + c0, n, 1.0f, o,
            n);
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkymoeTransAMatmul, TransAMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Resolves sgemm in the OpenBLAS library at `path` for every kernel of the library and keeps it to one thread
// per call (the pool supplies the parallelism). Returns 0, or 1 when the library does not load, 2 when it lacks
// the symbols.
extern "C" int skymoe_cpu_kernels_init(const char* path) {
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) return 1;
  skymoe::sgemm = reinterpret_cast<skymoe::Sgemm>(dlsym(library, "scipy_cblas_sgemm64_"));
  auto set_threads = reinterpret_cast<void (*)(int)>(dlsym(library, "scipy_openblas_set_num_threads64_"));
  if (skymoe::sgemm == nullptr || set_threads == nullptr) return 2;
  set_threads(1);
  return 0;
}
