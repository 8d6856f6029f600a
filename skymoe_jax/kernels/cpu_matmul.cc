// out[b] = x[b]^T @ g[b] for x [B, C, M] and g [B, C, N] (float32, row-major): the weight gradient of a
// batched matmul, which contracts over the rows of both operands. Each batch entry's C rows are `segments` equal
// runs of which only the first used[b, segment] rows count (the experts' slot buffers fill from the first row of
// each routing group's run; the rest are zero), so the sum skips the others. XLA's CPU backend gives this dot to
// Eigen (YNNPACK takes no transposed left operand), at 50-60 GFLOP/s a core on the expert FFN's shapes against
// OpenBLAS's 88 (docs/BENCHMARKS.md). Built and loaded by kernels/cpu_ffi.py.
//
// Each batch entry is a task of single-threaded sgemms on XLA's own intra-op thread pool (cpu_common.h): with
// threads of its own the kernel made the step take 1.42x as long, blocking an XLA thread 1.09x; as pool tasks it
// made the step faster.
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>

#include "cpu_blas.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace skymoe {
Sgemm sgemm = nullptr;
}  // namespace skymoe

namespace {

using skymoe::kNoTrans, skymoe::kRowMajor, skymoe::kTrans, skymoe::sgemm;

ffi::Future TransAMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                         ffi::Buffer<ffi::S32> used, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims_x = x.dimensions();
  const int64_t batch = dims_x[0], rows = dims_x[1], m = dims_x[2], n = g.dimensions()[2];
  const int64_t segments = used.dimensions()[1], seg = rows / segments;
  const float* px = x.typed_data();
  const float* pg = g.typed_data();
  const int32_t* pused = used.typed_data();
  float* po = out->typed_data();
  return skymoe::RunTasks(pool, batch, [=](int64_t b) {
    float* o = po + b * m * n;
    std::fill(o, o + m * n, 0.0f);
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t live = std::clamp<int64_t>(pused[b * segments + s], 0, seg), r0 = b * rows + s * seg;
      if (live == 0) continue;
      sgemm(kRowMajor, kTrans, kNoTrans, m, n, live, 1.0f, px + r0 * m, m, pg + r0 * n, n, 1.0f, o, n);
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
