// OpenBLAS's sgemm for the package's CPU kernels (cpu_matmul.cc, cpu_attention.cc), resolved at load time by
// skymoe_cpu_kernels_init in cpu_matmul.cc.
#pragma once

#include <cstdint>

namespace skymoe {

// cblas_sgemm of OpenBLAS's 64-bit-integer interface, as the scipy-openblas64 package names it.
using Sgemm = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

extern Sgemm sgemm;

}  // namespace skymoe
