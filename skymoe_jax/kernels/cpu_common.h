// What the CPU kernels share: running tasks on XLA's intra-op pool, per-thread scratch, an exp the compiler
// vectorizes, the clones their elementwise loops are built as, and which rows of an experts' buffer each expert
// owns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

// The row loops are built for AVX-512, AVX2 + FMA and the baseline, picked when the library loads: the file is
// compiled once and may be shared by machines of other CPUs (a cluster's home directory).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define SKYMOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SKYMOE_CLONES
#endif

namespace skymoe {

// Runs task(i) for i in [0, count) as tasks on XLA's intra-op pool; the returned future completes when the last
// has, so the call is asynchronous to XLA, which runs its own dots the same way. A kernel with threads of its own
// fought XLA's for the cores, and one that blocked an XLA thread left the other core idle (docs/BENCHMARKS.md).
template <typename Task>
xla::ffi::Future RunTasks(xla::ffi::ThreadPool& pool, int64_t count, Task task) {
  if (count == 0) {  // a count-down promise needs a positive count
    xla::ffi::CountDownPromise done(1);
    xla::ffi::Future future(done);
    done.CountDown(1);
    return future;
  }
  xla::ffi::CountDownPromise done(count);
  xla::ffi::Future future(done);
  for (int64_t i = 0; i < count; ++i) {
    pool.Schedule([=]() mutable {
      task(i);
      done.CountDown(1);
    });
  }
  return future;
}

// Scratch of at least n floats, kept by the calling thread for its next task: a block's buffer allocated per task
// is over glibc's mmap threshold at the default shapes, and mapping, zeroing and unmapping it each time cost
// the step as much as the kernels saved. `slot` tells apart buffers a task needs at once.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// e^x for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n from the exponent bits), within 2
// ulp of expf and exactly 0 below -87, where e^x leaves float's normal range, and for x = -inf. Correct up to
// x = 88 as well, which the callers' rounding can reach by a few ulp. libm's expf does not vectorize without
// -ffast-math.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float n = x * 1.44269504088896341f + magic;
  n -= magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? 0.0f : p * scale;
}

// Rows [start, start + rows) of an experts' buffer, of which the first `live` are in use.
struct RowRange {
  int64_t start, rows, live;
};

// Which rows of an experts' buffer belong to which expert, in the two layouts the expert kernels take, told apart
// by the rank of the counts:
// - slot buffers x [E, C, width] with used [E, K]: each expert's C rows are K equal runs (routing groups, source
//   devices) that fill from their first row, used[e, k] of them; the rest are empty slots (zero rows).
// - sorted rows x [A, width] with group_sizes [E]: the rows sorted by expert, expert e's the group_sizes[e] after
//   the earlier experts'; all in use. Rows past their sum belong to no expert.
// Counts out of range are clamped, so no range leaves the buffer.
struct RowRanges {
  int64_t experts, per_expert;  // expert e's ranges: ranges[e * per_expert, (e + 1) * per_expert)
  std::vector<RowRange> ranges;
  int64_t owned_rows, total_rows;  // rows [owned_rows, total_rows) belong to no expert
};

template <typename Dims>
RowRanges RangesOf(const Dims& x_dims, const xla::ffi::Buffer<xla::ffi::S32>& counts) {
  const auto c = counts.dimensions();
  const int32_t* n = counts.typed_data();
  RowRanges t{c[0], 1, {}, 0, 0};
  if (c.size() == 2) {
    const int64_t rows = x_dims[1], segments = c[1], seg = rows / segments;
    t.per_expert = segments;
    for (int64_t i = 0; i < t.experts * segments; ++i) {
      t.ranges.push_back({i / segments * rows + i % segments * seg, seg, std::clamp<int64_t>(n[i], 0, seg)});
    }
    t.owned_rows = t.total_rows = t.experts * rows;
    return t;
  }
  t.total_rows = x_dims[0];
  for (int64_t e = 0; e < t.experts; ++e) {
    const int64_t size = std::clamp<int64_t>(n[e], 0, t.total_rows - t.owned_rows);
    t.ranges.push_back({t.owned_rows, size, size});
    t.owned_rows += size;
  }
  return t;
}

}  // namespace skymoe
