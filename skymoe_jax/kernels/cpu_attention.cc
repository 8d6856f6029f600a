// Causal grouped-query attention within packed documents on the CPU, forward and backward, for
// kernels/cpu_attention.py: q [B, S, H, D], k and v [B, S, KV, D] (float32, row-major, H a multiple of KV),
// segment ids [B, S]; query i sees key j when j <= i and both carry the same segment id.
//
// Each (batch row, head) is a task on XLA's intra-op pool (cpu_common.h). A task takes its queries
// QUERY_BLOCK at a time against the keys up to the block's end, so the blocks above the diagonal are skipped and
// the scratch is QUERY_BLOCK x S floats: memory linear in S. The products are single-threaded OpenBLAS sgemms on
// strided views of the [B, S, H, D] arrays (no transposes); the mask, the softmax and the softmax's gradient are
// loops the compiler vectorizes (-fopenmp-simd: the pragmas let it reorder the row sums and maxima), with the exp
// of cpu_common.h.
// The forward keeps the log-sum-exp of every row [B, H, S], the backward recomputes the probabilities from it
// (FlashAttention's recipe); a backward task owns one KV head, so the dK and dV of its query heads add up in a
// fixed order without locks.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_blas.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using skymoe::exp_nonpositive, skymoe::kNoTrans, skymoe::kRowMajor, skymoe::kTrans, skymoe::sgemm;

// 64 query rows keep the sgemms efficient while skipping 3/8 of the score square at S = 256.
constexpr int64_t kQueryBlock = 64;

// One row of scores s[0..n) for query `qi` (s already scaled): the keys j <= qi of the query's segment become
// e^(s - max), the rest 0. Returns the row's max and stores the sum of the exponentials in *sum.
SKYMOE_CLONES float softmax_row(float* s, const int32_t* seg, int64_t qi, int64_t n, float* sum) {
  const int32_t mine = seg[qi];
  const int64_t visible = qi + 1;
  float max = -INFINITY;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < visible; ++j) {
    s[j] = seg[j] == mine ? s[j] : -INFINITY;
    max = std::max(max, s[j]);
  }
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < visible; ++j) {
    s[j] = exp_nonpositive(s[j] - max);
    total += s[j];
  }
  std::fill(s + visible, s + n, 0.0f);
  *sum = total;
  return max;
}

// One row of the backward for query `qi`: p = e^(s - lse) on the visible keys (0 elsewhere) replaces the scores
// s, and dS = p (dP - delta) replaces dP, where delta = dO . O for the row.
SKYMOE_CLONES void softmax_grad_row(float* s, float* dp, const int32_t* seg, int64_t qi, int64_t n, float lse,
                                    float delta) {
  const int32_t mine = seg[qi];
  const int64_t visible = qi + 1;
  for (int64_t j = 0; j < visible; ++j) {
    const float p = seg[j] == mine ? exp_nonpositive(s[j] - lse) : 0.0f;
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
  std::fill(s + visible, s + n, 0.0f);
  std::fill(dp + visible, dp + n, 0.0f);
}

struct Shape {
  int64_t batch, seq, heads, kv_heads, dim;
  int64_t group() const { return heads / kv_heads; }
  int64_t q_stride() const { return heads * dim; }  // between consecutive positions of one head
  int64_t kv_stride() const { return kv_heads * dim; }
  int64_t q_offset(int64_t b, int64_t h) const { return b * seq * heads * dim + h * dim; }
  int64_t kv_offset(int64_t b, int64_t h) const { return b * seq * kv_heads * dim + h * dim; }
};

Shape ShapeOf(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k) {
  const auto dq = q.dimensions();
  return {dq[0], dq[1], dq[2], k.dimensions()[2], dq[3]};
}

void ForwardTask(const Shape& sh, const float* q, const float* k, const float* v, const int32_t* seg, float* out,
                 float* lse, int64_t b, int64_t h) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(sh.dim));
  const float* Q = q + sh.q_offset(b, h);
  const float* K = k + sh.kv_offset(b, h / sh.group());
  const float* V = v + sh.kv_offset(b, h / sh.group());
  float* O = out + sh.q_offset(b, h);
  float* L = lse + (b * sh.heads + h) * sh.seq;
  const int32_t* S = seg + b * sh.seq;
  const int64_t lq = sh.q_stride(), lkv = sh.kv_stride();
  float* scores = skymoe::scratch(0, std::min(kQueryBlock, sh.seq) * sh.seq);
  float sums[kQueryBlock];
  for (int64_t q0 = 0; q0 < sh.seq; q0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, sh.seq - q0), n = q0 + rows;
    sgemm(kRowMajor, kNoTrans, kTrans, rows, n, sh.dim, scale, Q + q0 * lq, lq, K, lkv, 0.0f, scores, n);
    for (int64_t r = 0; r < rows; ++r) L[q0 + r] = softmax_row(scores + r * n, S, q0 + r, n, &sums[r]);
    sgemm(kRowMajor, kNoTrans, kNoTrans, rows, sh.dim, n, 1.0f, scores, n, V, lkv, 0.0f, O + q0 * lq, lq);
    for (int64_t r = 0; r < rows; ++r) {
      float* o = O + (q0 + r) * lq;
      const float inv = 1.0f / sums[r];
      for (int64_t d = 0; d < sh.dim; ++d) o[d] *= inv;
      L[q0 + r] += std::log(sums[r]);
    }
  }
}

void BackwardTask(const Shape& sh, const float* q, const float* k, const float* v, const int32_t* seg,
                  const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv, int64_t b,
                  int64_t kvh) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(sh.dim));
  const int64_t lq = sh.q_stride(), lkv = sh.kv_stride();
  const float* K = k + sh.kv_offset(b, kvh);
  const float* V = v + sh.kv_offset(b, kvh);
  float* dK = dk + sh.kv_offset(b, kvh);
  float* dV = dv + sh.kv_offset(b, kvh);
  const int32_t* S = seg + b * sh.seq;
  for (int64_t j = 0; j < sh.seq; ++j) {
    std::fill(dK + j * lkv, dK + j * lkv + sh.dim, 0.0f);
    std::fill(dV + j * lkv, dV + j * lkv + sh.dim, 0.0f);
  }
  const int64_t width = std::min(kQueryBlock, sh.seq) * sh.seq;
  float* P = skymoe::scratch(0, width);
  float* dS = skymoe::scratch(1, width);
  for (int64_t h = kvh * sh.group(); h < (kvh + 1) * sh.group(); ++h) {
    const float* Q = q + sh.q_offset(b, h);
    const float* O = out + sh.q_offset(b, h);
    const float* dO = dout + sh.q_offset(b, h);
    float* dQ = dq + sh.q_offset(b, h);
    const float* L = lse + (b * sh.heads + h) * sh.seq;
    for (int64_t q0 = 0; q0 < sh.seq; q0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, sh.seq - q0), n = q0 + rows;
      sgemm(kRowMajor, kNoTrans, kTrans, rows, n, sh.dim, scale, Q + q0 * lq, lq, K, lkv, 0.0f, P, n);
      sgemm(kRowMajor, kNoTrans, kTrans, rows, n, sh.dim, 1.0f, dO + q0 * lq, lq, V, lkv, 0.0f, dS, n);
      for (int64_t r = 0; r < rows; ++r) {
        const float* o = O + (q0 + r) * lq;
        const float* g = dO + (q0 + r) * lq;
        float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
        for (int64_t d = 0; d < sh.dim; ++d) delta += o[d] * g[d];
        softmax_grad_row(P + r * n, dS + r * n, S, q0 + r, n, L[q0 + r], delta);
      }
      sgemm(kRowMajor, kTrans, kNoTrans, n, sh.dim, rows, 1.0f, P, n, dO + q0 * lq, lq, 1.0f, dV, lkv);
      sgemm(kRowMajor, kNoTrans, kNoTrans, rows, sh.dim, n, scale, dS, n, K, lkv, 0.0f, dQ + q0 * lq, lq);
      sgemm(kRowMajor, kTrans, kNoTrans, n, sh.dim, rows, scale, dS, n, Q + q0 * lq, lq, 1.0f, dK, lkv);
    }
  }
}

ffi::Future AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> out,
                             ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = ShapeOf(q, k);
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const int32_t* ps = seg.typed_data();
  float *po = out->typed_data(), *pl = lse->typed_data();
  return skymoe::RunTasks(pool, sh.batch * sh.heads, [=](int64_t i) {
    ForwardTask(sh, pq, pk, pv, ps, po, pl, i / sh.heads, i % sh.heads);
  });
}

ffi::Future AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out,
                              ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                              ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Shape sh = ShapeOf(q, k);
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float *po = out.typed_data(), *pl = lse.typed_data(), *pg = dout.typed_data();
  const int32_t* ps = seg.typed_data();
  float *pdq = dq->typed_data(), *pdk = dk->typed_data(), *pdv = dv->typed_data();
  return skymoe::RunTasks(pool, sh.batch * sh.kv_heads, [=](int64_t i) {
    BackwardTask(sh, pq, pk, pv, ps, po, pl, pg, pdq, pdk, pdv, i / sh.kv_heads, i % sh.kv_heads);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkymoeAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkymoeAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
