// CUDA kernels of class_stats_update and class_stats_pool (semantics: fastsel/ops/class_stats.py
// class_stats_update_ref, csrc/cpu).
//
// Torch-free on purpose (see class_stats_params.h). Five launches on one stream for all L layers of a
// batch (blockIdx.z, or z / C for the scatter, is the layer), no atomics, so the result is deterministic.
// The glue hands over the examples grouped by class (order, offsets), so the per-class kernels walk their
// class's members only (D^2 B FMAs for the scatter, not C D^2 B):
//  1. pool:    block (example b, 64 features, layer l; 4 token rows): pooled[l, b, d] = masked mean over t,
//              ntok[b]; traps on a label outside [0, C) (device-side check); class_stats_pool is this alone;
//  2. bmean:   block (class c, 256 features, layer l): per-class batch count and mean of the pooled rows;
//  3. scatter: block (16 x 16 tile of D x D, class c and layer l): S = sum_{b in c} (x_b - bmean_c)(x_b -
//              bmean_c)^T staged 16 members at a time in shared memory (a small GEMM), then the Chan merge
//              m2 += S + delta delta^T * n_a n_b / n, reading the OLD mean and count;
//  4. mean:    mean += delta * n_b / n (old count);
//  5. count:   count += n_b.
// The batch's counts per example and class (ntok, batch_count) are the same for every layer: layer 0 writes them.
// Torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, hence
// the explicit conversions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "class_stats_params.h"

namespace fastsel {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 16;

template <typename A>
__device__ __forceinline__ A load_as(const float* p, int64_t i) { return static_cast<A>(p[i]); }
template <typename A>
__device__ __forceinline__ A load_as(const double* p, int64_t i) { return static_cast<A>(p[i]); }
template <typename A>
__device__ __forceinline__ A load_as(const __nv_bfloat16* p, int64_t i) { return static_cast<A>(__bfloat162float(p[i])); }
template <typename A>
__device__ __forceinline__ A load_as(const __half* p, int64_t i) { return static_cast<A>(__half2float(p[i])); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pool: a block owns kPoolCols features of one example; its kPoolRows warp rows split the tokens (so a
// long sequence is read by 4x more loads in flight than one thread per feature would issue) and are
// reduced in shared memory in a fixed order (deterministic).
constexpr int kPoolCols = 64;
constexpr int kPoolRows = kThreads / kPoolCols;

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    pool_kernel(const T* __restrict__ h, const float* __restrict__ mask, const int64_t* __restrict__ labels,
                A* __restrict__ pooled, float* __restrict__ ntok, int64_t B, int64_t T_, int64_t D, int64_t C) {
  __shared__ A part[kPoolRows][kPoolCols];
  __shared__ float cnt[kPoolRows];
  const int64_t b = blockIdx.x, l = blockIdx.z;
  h += l * B * T_ * D;  // layer l's states and pooled rows
  pooled += l * B * D;
  const bool first = blockIdx.y == 0 && l == 0;  // labels (null for class_stats_pool) and ntok: once per example
  if (first && labels != nullptr && threadIdx.x == 0 && (labels[b] < 0 || labels[b] >= C)) {
    printf("fastsel: class_stats_update: label %lld of example %lld out of range [0, %lld)\n",
           static_cast<long long>(labels[b]), static_cast<long long>(b), static_cast<long long>(C));
    __trap();
  }
  const int lane = threadIdx.x % kPoolCols, row = threadIdx.x / kPoolCols;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kPoolCols + lane;
  const float* mrow = mask + b * T_;
  A s = A(0);
  float n = 0.f;
#pragma unroll 4
  for (int64_t t = row; t < T_; t += kPoolRows) {
    if (mrow[t] == 0.f) continue;  // uniform across each warp (a warp is one row): no divergence
    n += 1.f;
    if (d < D) s += load_as<A>(h, (b * T_ + t) * D + d);
  }
  part[row][lane] = s;
  if (lane == 0) cnt[row] = n;
  __syncthreads();
  if (row != 0) return;
  A total = A(0);
  float count = 0.f;
#pragma unroll
  for (int r = 0; r < kPoolRows; ++r) {
    total += part[r][lane];
    count += cnt[r];
  }
  if (d < D) pooled[b * D + d] = count > 0.f ? total / static_cast<A>(count) : A(0);
  if (first && ntok != nullptr && lane == 0) ntok[b] = count;
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    batch_mean_kernel(const A* __restrict__ pooled, const float* __restrict__ ntok, const int64_t* __restrict__ order,
                      const int64_t* __restrict__ offsets, double* __restrict__ batch_count, A* __restrict__ batch_mean,
                      int64_t B, int64_t C, int64_t D) {
  const int64_t c = blockIdx.x, l = blockIdx.z;
  pooled += l * B * D;
  batch_mean += l * C * D;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  A s = A(0);
  double n = 0.0;
  for (int64_t k = offsets[c]; k < offsets[c + 1]; ++k) {
    const int64_t b = order[k];
    if (ntok[b] == 0.f) continue;
    n += 1.0;
    if (d < D) s += pooled[b * D + d];
  }
  if (d < D) batch_mean[c * D + d] = n > 0.0 ? s / static_cast<A>(n) : A(0);
  if (blockIdx.y == 0 && l == 0 && threadIdx.x == 0) batch_count[c] = n;
}

template <typename A>
__global__ void __launch_bounds__(kTile * kTile)
    scatter_merge_kernel(const A* __restrict__ pooled, const float* __restrict__ ntok,
                         const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                         const double* __restrict__ batch_count, const A* __restrict__ batch_mean,
                         const double* __restrict__ count, const A* __restrict__ mean, A* __restrict__ m2, int64_t B,
                         int64_t C, int64_t D) {
  __shared__ A xi[kTile][kTile + 1];  // [example][feature i], +1 against bank conflicts
  __shared__ A xj[kTile][kTile + 1];
  const int64_t c = blockIdx.z % C, l = blockIdx.z / C;
  pooled += l * B * D;  // layer l's rows and accumulators
  batch_mean += l * C * D;
  count += l * C;
  mean += l * C * D;
  m2 += l * C * D * D;
  const double nb = batch_count[c];
  if (nb == 0.0) return;  // uniform per block: no class member in this batch
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t i = i0 + ty, j = j0 + tx;
  const A* bm = batch_mean + c * D;
  A s = A(0);
  const int64_t first = offsets[c], last = offsets[c + 1];
  for (int64_t k0 = first; k0 < last; k0 += kTile) {
    // Thread (ty, tx) stages member k0 + ty, features i0 + tx and j0 + tx (zero past the class's members).
    const int64_t k = k0 + ty;
    const int64_t b = k < last ? order[k] : 0;
    const bool member = k < last && ntok[b] != 0.f;
    const int64_t fi = i0 + tx, fj = j0 + tx;
    xi[ty][tx] = (member && fi < D) ? pooled[b * D + fi] - bm[fi] : A(0);
    xj[ty][tx] = (member && fj < D) ? pooled[b * D + fj] - bm[fj] : A(0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) s += xi[k][ty] * xj[k][tx];
    __syncthreads();
  }
  if (i >= D || j >= D) return;
  const double na = count[c], n = na + nb;
  const A w = static_cast<A>(na * nb / n);
  const A di = bm[i] - mean[c * D + i], dj = bm[j] - mean[c * D + j];
  m2[(c * D + i) * D + j] += s + w * di * dj;
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    mean_update_kernel(const double* __restrict__ batch_count, const A* __restrict__ batch_mean,
                       const double* __restrict__ count, A* __restrict__ mean, int64_t C, int64_t D) {
  const int64_t c = blockIdx.x, l = blockIdx.z;
  batch_mean += l * C * D;
  count += l * C;
  mean += l * C * D;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const double nb = batch_count[c];
  if (nb == 0.0 || d >= D) return;
  const A w = static_cast<A>(nb / (count[c] + nb));
  mean[c * D + d] += (batch_mean[c * D + d] - mean[c * D + d]) * w;
}

// count (L, C) += batch_count (C,) for every layer
__global__ void count_update_kernel(const double* __restrict__ batch_count, double* __restrict__ count, int64_t C,
                                    int64_t LC) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < LC) count[k] += batch_count[k % C];
}

template <typename T, typename A>
cudaError_t launch_typed(const ClassStatsParams& p, cudaStream_t stream) {
  const int64_t dblocks = ceil_div(p.D, kThreads);
  if (dblocks > 65535 || p.C * p.L > 65535 || ceil_div(p.D, kTile) > 65535) return cudaErrorInvalidConfiguration;
  A* pooled = static_cast<A*>(p.pooled);
  A* bmean = static_cast<A*>(p.batch_mean);
  A* mean = static_cast<A*>(p.mean);
  A* m2 = static_cast<A*>(p.m2);
  const int64_t dgrid = dblocks > 0 ? dblocks : 1;
  const int64_t pool_cols = p.D > 0 ? ceil_div(p.D, kPoolCols) : 1;
  const unsigned tiles = static_cast<unsigned>(ceil_div(p.D, kTile));
  // Named launch shapes (one launch per line, nothing but names inside <<< >>>: the CPU emulation of the
  // tests rewrites these launches textually).
  const unsigned layers = static_cast<unsigned>(p.L);
  const dim3 pool_grid(static_cast<unsigned>(p.B), static_cast<unsigned>(pool_cols), layers);
  const dim3 class_grid(static_cast<unsigned>(p.C), static_cast<unsigned>(dgrid), layers);
  const dim3 scatter_grid(tiles, tiles, static_cast<unsigned>(p.C * p.L));
  const dim3 scatter_block(kTile, kTile);
  const dim3 count_grid(static_cast<unsigned>(ceil_div(p.C * p.L, kThreads)));
  pool_kernel<T, A><<<pool_grid, kThreads, 0, stream>>>(static_cast<const T*>(p.hidden), p.mask, p.labels, pooled,
                                                       p.ntok, p.B, p.T, p.D, p.C);
  if (p.labels == nullptr) return cudaGetLastError();  // class_stats_pool: the pooling alone
  batch_mean_kernel<A><<<class_grid, kThreads, 0, stream>>>(pooled, p.ntok, p.order, p.offsets, p.batch_count, bmean,
                                                            p.B, p.C, p.D);
  if (p.D > 0) {
    scatter_merge_kernel<A><<<scatter_grid, scatter_block, 0, stream>>>(pooled, p.ntok, p.order, p.offsets,
                                                                        p.batch_count, bmean, p.count, mean, m2, p.B,
                                                                        p.C, p.D);
    mean_update_kernel<A><<<class_grid, kThreads, 0, stream>>>(p.batch_count, bmean, p.count, mean, p.C, p.D);
  }
  count_update_kernel<<<count_grid, kThreads, 0, stream>>>(p.batch_count, p.count, p.C, p.C * p.L);
  return cudaGetLastError();
}

template <typename A>
cudaError_t launch_acc(const ClassStatsParams& p, cudaStream_t stream) {
  switch (p.input) {
    case ClassStatsInput::F32: return launch_typed<float, A>(p, stream);
    case ClassStatsInput::F64: return launch_typed<double, A>(p, stream);
    case ClassStatsInput::BF16: return launch_typed<__nv_bfloat16, A>(p, stream);
    case ClassStatsInput::F16: return launch_typed<__half, A>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_class_stats_update(const ClassStatsParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.C == 0 || p.L == 0) return cudaSuccess;
  if (p.B > 2147483647LL || p.L > 65535) return cudaErrorInvalidConfiguration;  // grid.x, grid.z
  if (p.labels == nullptr) return cudaErrorInvalidValue;  // the pooling alone is launch_class_stats_pool
  return p.acc == ClassStatsAcc::F64 ? launch_acc<double>(p, stream) : launch_acc<float>(p, stream);
}

cudaError_t launch_class_stats_pool(const ClassStatsParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  if (p.B > 2147483647LL || p.L != 1 || p.labels != nullptr) return cudaErrorInvalidConfiguration;
  return p.acc == ClassStatsAcc::F64 ? launch_acc<double>(p, stream) : launch_acc<float>(p, stream);
}

}  // namespace cuda
}  // namespace fastsel
