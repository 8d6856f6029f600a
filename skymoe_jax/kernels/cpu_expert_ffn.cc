// The SwiGLU experts' feed-forward on fixed-capacity slot buffers, forward and the backward up to the weight
// gradients, for kernels/cpu_expert_ffn.py: x [E, C, d], w_gate and w_up [E, d, f], w_down [E, f, d] (float32,
// row-major). Forward: gate = x w_gate, up = x w_up, y = (silu(gate) * up) w_down, keeping gate and up for the
// backward. Backward, from dy: dh = dy w_down^T; d_gate = dh * up * silu'(gate); d_up = dh * silu(gate);
// dx = d_gate w_gate^T + d_up w_up^T, and h = silu(gate) * up again for the down projection's weight gradient
// (the weight gradients themselves are cpu_matmul.cc's).
//
// Each expert's C slot rows are `segments` equal runs (one per routing group, and per source device under expert
// parallelism) that fill from their first row: used [E, segments] says how many rows of each are in use, and
// the rest, empty slots, are skipped (about a fifth of them at capacity factor 1.25). Each (expert, block of up
// to kRowBlock rows of a segment) is a task on XLA's intra-op pool running single-threaded OpenBLAS sgemms, and the SwiGLU between them runs on the block while it is in cache: XLA's CPU backend makes each
// elementwise step a pass over the whole [E, C, f] buffer, and those passes took as long as the expert matmuls'
// forward (docs/BENCHMARKS.md).
#include <algorithm>
#include <cstdint>

#include "cpu_blas.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using skymoe::kNoTrans, skymoe::kRowMajor, skymoe::kTrans, skymoe::sgemm;

// 128 rows x f = 256 floats of the widest block is 128 KiB: the block's gate, up and h stay in L2.
constexpr int64_t kRowBlock = 128;

// sigmoid(g) without overflow: e^-|g| is at most 1.
inline float sigmoid(float g) {
  const float e = skymoe::exp_nonpositive(g >= 0.0f ? -g : g);
  return (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

SKYMOE_CLONES void swiglu(const float* gate, const float* up, float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

// dh arrives in d_gate; h, d_gate and d_up are written.
SKYMOE_CLONES void swiglu_grad(const float* gate, const float* up, float* h, float* d_gate, float* d_up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], s = sigmoid(g), dh = d_gate[i], silu = g * s;
    h[i] = silu * up[i];
    d_gate[i] = dh * up[i] * s * (1.0f + g * (1.0f - s));
    d_up[i] = dh * silu;
  }
}

struct Shape {
  int64_t experts, rows, d, f, segments;
  int64_t segment_rows() const { return rows / segments; }
};

Shape ShapeOf(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w_gate, const ffi::Buffer<ffi::S32>& used) {
  const auto dx = x.dimensions();
  return {dx[0], dx[1], dx[2], w_gate.dimensions()[2], used.dimensions()[1]};
}

// Runs task(e, r0, n, live) for every expert e and block of n <= kRowBlock rows from r0 within one of its
// segments, of which the first `live` are in use, on the pool; the future completes when all have. The rows of
// each segment past used[e, segment] are empty slots (zero rows, with zero gradients): the task computes nothing
// for them and writes zeros, as the matmuls would.
template <typename Task>
ffi::Future ForEachBlock(ffi::ThreadPool& pool, const Shape& sh, const int32_t* used, Task task) {
  const int64_t seg = sh.segment_rows(), blocks = (seg + kRowBlock - 1) / kRowBlock;
  return skymoe::RunTasks(pool, sh.experts * sh.segments * blocks, [=](int64_t i) {
    const int64_t e = i / (sh.segments * blocks), s = i / blocks % sh.segments, b = i % blocks * kRowBlock;
    const int64_t in_use = std::clamp<int64_t>(used[e * sh.segments + s], 0, seg);
    const int64_t n = std::min(kRowBlock, seg - b);
    task(e, s * seg + b, n, std::clamp<int64_t>(in_use - b, 0, n));
  });
}

// Zeroes rows [live, n) of a block of `width` columns.
void ZeroTail(float* block, int64_t live, int64_t n, int64_t width) {
  std::fill(block + live * width, block + n * width, 0.0f);
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_gate,
                    ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, ffi::Buffer<ffi::S32> used,
                    ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> gate, ffi::ResultBuffer<ffi::F32> up) {
  const Shape sh = ShapeOf(x, w_gate, used);
  const float *px = x.typed_data(), *pwg = w_gate.typed_data(), *pwu = w_up.typed_data();
  const float* pwd = w_down.typed_data();
  float *py = y->typed_data(), *pg = gate->typed_data(), *pu = up->typed_data();
  return ForEachBlock(pool, sh, used.typed_data(), [=](int64_t e, int64_t r0, int64_t n, int64_t live) {
    const int64_t d = sh.d, f = sh.f;
    const float* X = px + (e * sh.rows + r0) * d;
    float* G = pg + (e * sh.rows + r0) * f;
    float* U = pu + (e * sh.rows + r0) * f;
    float* Y = py + (e * sh.rows + r0) * d;
    ZeroTail(G, live, n, f);
    ZeroTail(U, live, n, f);
    ZeroTail(Y, live, n, d);
    if (live == 0) return;
    float* h = skymoe::scratch(0, live * f);
    sgemm(kRowMajor, kNoTrans, kNoTrans, live, f, d, 1.0f, X, d, pwg + e * d * f, f, 0.0f, G, f);
    sgemm(kRowMajor, kNoTrans, kNoTrans, live, f, d, 1.0f, X, d, pwu + e * d * f, f, 0.0f, U, f);
    swiglu(G, U, h, live * f);
    sgemm(kRowMajor, kNoTrans, kNoTrans, live, d, f, 1.0f, h, f, pwd + e * f * d, d, 0.0f, Y, d);
  });
}

ffi::Future Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w_gate,
                     ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, ffi::Buffer<ffi::F32> gate,
                     ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::S32> used, ffi::ResultBuffer<ffi::F32> dx,
                     ffi::ResultBuffer<ffi::F32> d_gate, ffi::ResultBuffer<ffi::F32> d_up,
                     ffi::ResultBuffer<ffi::F32> h) {
  const Shape sh = ShapeOf(dy, w_gate, used);
  const float *pdy = dy.typed_data(), *pwg = w_gate.typed_data(), *pwu = w_up.typed_data();
  const float *pwd = w_down.typed_data(), *pg = gate.typed_data(), *pu = up.typed_data();
  float *pdx = dx->typed_data(), *pdg = d_gate->typed_data(), *pdu = d_up->typed_data(), *ph = h->typed_data();
  return ForEachBlock(pool, sh, used.typed_data(), [=](int64_t e, int64_t r0, int64_t n, int64_t live) {
    const int64_t d = sh.d, f = sh.f, wide = (e * sh.rows + r0) * f, narrow = (e * sh.rows + r0) * d;
    float *dG = pdg + wide, *dU = pdu + wide, *H = ph + wide, *dX = pdx + narrow;
    ZeroTail(dG, live, n, f);
    ZeroTail(dU, live, n, f);
    ZeroTail(H, live, n, f);
    ZeroTail(dX, live, n, d);
    if (live == 0) return;
    sgemm(kRowMajor, kNoTrans, kTrans, live, f, d, 1.0f, pdy + narrow, d, pwd + e * f * d, d, 0.0f, dG, f);
    swiglu_grad(pg + wide, pu + wide, H, dG, dU, live * f);
    sgemm(kRowMajor, kNoTrans, kTrans, live, d, f, 1.0f, dG, f, pwg + e * d * f, f, 0.0f, dX, d);
    sgemm(kRowMajor, kNoTrans, kTrans, live, d, f, 1.0f, dU, f, pwu + e * d * f, f, 1.0f, dX, d);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkymoeExpertFfnForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkymoeExpertFfnBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
