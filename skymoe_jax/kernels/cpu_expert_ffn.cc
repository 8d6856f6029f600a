// The SwiGLU experts' feed-forward, forward and backward, for kernels/cpu_expert_ffn.py: x is an experts' row
// buffer, w_gate and w_up [E, d, f], w_down [E, f, d] (float32, row-major). Forward: gate = x w_gate, up = x w_up,
// y = (silu(gate) * up) w_down, keeping gate and up for the backward. Backward, from dy: dh = dy w_down^T;
// d_gate = dh * up * silu'(gate); d_up = dh * silu(gate); dx = d_gate w_gate^T + d_up w_up^T; and each expert's
// weight gradients x^T d_gate, x^T d_up and h^T dy with h = silu(gate) * up, summed over its blocks.
//
// The buffer is one of two layouts (cpu_common.h's RowRanges): fixed-capacity slot buffers [E, C, d] with the rows
// in use of each run, used [E, K], whose empty slots are skipped (about a fifth of them at capacity factor 1.25);
// or the assignments sorted by expert [A, d] with group sizes [E] (dropless), of which nothing is padding. Each
// (expert, block of up to kMaxRowBlock of its rows) is a task on XLA's intra-op pool running single-threaded OpenBLAS
// sgemms, and the SwiGLU between them runs on the block while it is in cache: XLA's CPU backend makes each
// elementwise step a pass over the whole [E, C, f] buffer, and those passes took as long as the expert matmuls'
// forward (docs/BENCHMARKS.md). The backward is one task per expert, its blocks in turn, so that each block's
// share of the weight gradients is added while d_gate, d_up and h are in cache, without locks and in the same
// order every run: as a separate kernel over the written-out [rows, f] buffers the weight gradients ran at ~111
// GFLOP per CPU second against ~140 for sgemm in cache, and the three buffers were temporaries of the step.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <vector>

#include "cpu_blas.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using skymoe::kNoTrans, skymoe::kRowMajor, skymoe::kTrans, skymoe::sgemm;

// The most rows of a block. OpenBLAS's single-threaded sgemm on the expert shapes runs 10-15% more FLOPs per CPU
// second with 256 rows than with 128, and a fifth fewer with 32 (docs/BENCHMARKS.md); a block of 256 rows of the
// larger config (x and y of width 256, gate, up and h of 256) is 1.25 MiB, which with the expert's 0.75 MiB of
// weights stays in this machine's 2 MiB L2 per core.
constexpr int64_t kMaxRowBlock = 256;

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

using skymoe::RowRanges;

// Rows [r0, r0 + n) of one of an expert's ranges, of which the first `live` are in use; rows past `live` are empty
// slots (zero rows, with zero gradients): a task computes nothing for them and writes zeros, as the matmuls would.
struct Block {
  int64_t expert, r0, n, live;
};

// The blocks of every expert, in order of expert and row. A range's rows in use are split into equal blocks of at
// most kMaxRowBlock (sizes one apart), the last also holding the empty slots after them: fixed blocks left a small
// last one (a sorted expert's 530 rows gave blocks of 256, 256 and 18), on which sgemm runs at a fraction of its
// speed.
std::vector<Block> BlocksOf(const RowRanges& table) {
  std::vector<Block> blocks;
  for (int64_t i = 0; i < static_cast<int64_t>(table.ranges.size()); ++i) {
    const skymoe::RowRange& r = table.ranges[i];
    if (r.rows == 0) continue;
    const int64_t count = std::max<int64_t>(1, (r.live + kMaxRowBlock - 1) / kMaxRowBlock);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t lo = r.live * b / count, hi = r.live * (b + 1) / count;
      blocks.push_back({i / table.per_expert, r.start + lo, (b + 1 == count ? r.rows : hi) - lo, hi - lo});
    }
  }
  return blocks;
}

// Runs task(block) on the pool for every block; the future completes when all have.
template <typename Task>
ffi::Future ForEachBlock(ffi::ThreadPool& pool, const RowRanges& table, Task task) {
  auto blocks = std::make_shared<const std::vector<Block>>(BlocksOf(table));
  return skymoe::RunTasks(pool, blocks->size(), [=](int64_t i) { task((*blocks)[i]); });
}

// Runs task(e, blocks) on the pool for every expert e with its blocks in row order, the experts with the most rows
// in use first, so that the last tasks to start are short ones. One task an expert lets it sum its weight
// gradient over its blocks without locks, in the same order every time.
template <typename Task>
ffi::Future ForEachExpert(ffi::ThreadPool& pool, const RowRanges& table, Task task) {
  auto by_expert = std::make_shared<std::vector<std::vector<Block>>>(table.experts);
  std::vector<int64_t> live(table.experts, 0);
  for (const Block& b : BlocksOf(table)) {
    (*by_expert)[b.expert].push_back(b);
    live[b.expert] += b.live;
  }
  auto order = std::make_shared<std::vector<int64_t>>(table.experts);
  std::iota(order->begin(), order->end(), 0);
  std::stable_sort(order->begin(), order->end(), [&](int64_t a, int64_t b) { return live[a] > live[b]; });
  return skymoe::RunTasks(pool, table.experts, [=](int64_t i) {
    const int64_t e = (*order)[i];
    task(e, (*by_expert)[e]);
  });
}

// Zeroes rows [live, n) of a block of `width` columns.
void ZeroTail(float* block, int64_t live, int64_t n, int64_t width) {
  std::fill(block + live * width, block + n * width, 0.0f);
}

// Zeroes the rows of an output that belong to no expert (sorted rows past the group sizes' sum).
void ZeroUnowned(float* out, const RowRanges& table, int64_t width) {
  std::fill(out + table.owned_rows * width, out + table.total_rows * width, 0.0f);
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_gate,
                    ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, ffi::Buffer<ffi::S32> counts,
                    ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> gate, ffi::ResultBuffer<ffi::F32> up) {
  const RowRanges table = skymoe::RangesOf(x.dimensions(), counts);
  const int64_t d = w_gate.dimensions()[1], f = w_gate.dimensions()[2];
  const float *px = x.typed_data(), *pwg = w_gate.typed_data(), *pwu = w_up.typed_data();
  const float* pwd = w_down.typed_data();
  float *py = y->typed_data(), *pg = gate->typed_data(), *pu = up->typed_data();
  ZeroUnowned(py, table, d);
  ZeroUnowned(pg, table, f);
  ZeroUnowned(pu, table, f);
  return ForEachBlock(pool, table, [=](const Block& b) {
    const int64_t e = b.expert, r0 = b.r0, n = b.n, live = b.live;
    const float* X = px + r0 * d;
    float *G = pg + r0 * f, *U = pu + r0 * f, *Y = py + r0 * d;
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

ffi::Future Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                     ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down,
                     ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::S32> counts,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw_gate,
                     ffi::ResultBuffer<ffi::F32> dw_up, ffi::ResultBuffer<ffi::F32> dw_down) {
  const RowRanges table = skymoe::RangesOf(dy.dimensions(), counts);
  const int64_t d = w_gate.dimensions()[1], f = w_gate.dimensions()[2];
  const float *pdy = dy.typed_data(), *px = x.typed_data(), *pwg = w_gate.typed_data();
  const float *pwu = w_up.typed_data(), *pwd = w_down.typed_data(), *pg = gate.typed_data(), *pu = up.typed_data();
  float *pdx = dx->typed_data(), *pdwg = dw_gate->typed_data(), *pdwu = dw_up->typed_data();
  float* pdwd = dw_down->typed_data();
  ZeroUnowned(pdx, table, d);
  return ForEachExpert(pool, table, [=](int64_t e, const std::vector<Block>& blocks) {
    float *dWg = pdwg + e * d * f, *dWu = pdwu + e * d * f, *dWd = pdwd + e * f * d;
    float beta = 0.0f;  // the expert's first block with rows in use writes its weight gradients, the rest add
    for (const Block& b : blocks) {
      float* dX = pdx + b.r0 * d;
      ZeroTail(dX, b.live, b.n, d);
      if (b.live == 0) continue;
      const int64_t live = b.live;
      const float *X = px + b.r0 * d, *dY = pdy + b.r0 * d;
      float *dG = skymoe::scratch(0, live * f), *dU = skymoe::scratch(1, live * f), *H = skymoe::scratch(2, live * f);
      sgemm(kRowMajor, kNoTrans, kTrans, live, f, d, 1.0f, dY, d, pwd + e * f * d, d, 0.0f, dG, f);
      swiglu_grad(pg + b.r0 * f, pu + b.r0 * f, H, dG, dU, live * f);
      sgemm(kRowMajor, kNoTrans, kTrans, live, d, f, 1.0f, dG, f, pwg + e * d * f, f, 0.0f, dX, d);
      sgemm(kRowMajor, kNoTrans, kTrans, live, d, f, 1.0f, dU, f, pwu + e * d * f, f, 1.0f, dX, d);
      sgemm(kRowMajor, kTrans, kNoTrans, d, f, live, 1.0f, X, d, dG, f, beta, dWg, f);
      sgemm(kRowMajor, kTrans, kNoTrans, d, f, live, 1.0f, X, d, dU, f, beta, dWu, f);
      sgemm(kRowMajor, kTrans, kNoTrans, f, d, live, 1.0f, H, f, dY, d, beta, dWd, d);
      beta = 1.0f;
    }
    if (beta == 0.0f) {  // no rows in use: no gradient
      for (float* w : {dWg, dWu, dWd}) std::fill(w, w + d * f, 0.0f);
    }
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
