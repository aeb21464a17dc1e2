// CUDA kernels of the per-example squared-gradient ops (semantics: fastsel/ops.py *_ref, csrc/cpu), and
// the launchers that pick a kernel. The 128x128 pipelined linear kernel is in linear_pipelined_kernels.cu.
//
// Torch-free on purpose: CI compiles this file with a bare nvcc, so it sees only raw pointers through
// sq_grad_params.h; the ATen glue lives in sq_grad_cuda.cpp. Torch builds .cu files with
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, hence the explicit conversions.
//
// Work split and writes to `out`:
//  * linear: a block owns a 64x64 tile of out (O x I) and a contiguous range of examples. Within the
//    block every output element belongs to exactly one thread/warp, which forms each example's tile
//    product over t, squares it and keeps a running fp32 sum over its examples. When the examples are
//    not split across blocks (grid.y == 1) out is updated by a plain read-modify-write (deterministic);
//    otherwise each block atomicAdds its partial sum once at the end (order of fp32 adds varies).
//    bf16/fp16: WMMA 16x16x16 tensor cores, fp32 accumulator fragments (sm_80+). fp32 (and the T == 1
//    case of every dtype, where sum_b (g x)^2 = sum_b g^2 x^2 is one GEMM of squares): SIMT fp32 FMA.
//  * norm: a block owns 32 columns and a range of examples; 8 warps split t, reduce in shared memory,
//    square per example; plain RMW when examples are not split, else one atomicAdd per column.
//  * embedding: the glue sorts each example's indices, so an (example, token) group is a contiguous
//    run; a block owns the runs whose first position falls in its chunk of one example and atomicAdds
//    each run's squared row sum into out[v, :] (atomics: two examples may hit the same row). An index
//    outside [0, V) traps (device-side check: no host sync in the glue).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <cstdio>

#include "sq_grad_device.cuh"
#include "sq_grad_params.h"

namespace fastsel {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Linear, bf16/fp16: WMMA. Block = 4 warps (2 x 2), tile 64 (o) x 64 (i); each warp owns 32 x 32 =
// 2 x 2 fragments. Per example: acc = G_b[:, o-tile]^T X_b[:, i-tile] over t in steps of TK staged in
// shared memory (zero-filled past T, O, I), then sq += acc * acc elementwise (both fragments share
// the accumulator layout, so elementwise ops are layout-independent).
// ------------------------------------------------------------------------------------------------

constexpr int kWmmaTile = 64;
constexpr int kWmmaThreads = 128;
constexpr int kWmmaLd = kWmmaTile + 8;  // +16 bytes per row: breaks bank conflicts, keeps 32-byte alignment at k = 16

// Stage rows [t0, t0 + TK) x columns [c0, c0 + 64) of src (B, Tlen, C) for example b into s, in
// 8-element (16-byte) chunks; vectorised when the chunk is in bounds and 16-byte aligned.
template <typename T, int TK>
__device__ __forceinline__ void stage_tile16(T (*s)[kWmmaLd], const T* __restrict__ src, int64_t b, int64_t t0,
                                             int64_t Tlen, int64_t c0, int64_t C, bool vec) {
  constexpr int kChunksPerRow = kWmmaTile / 8;
  constexpr int kChunks = TK * kChunksPerRow;
  for (int ch = threadIdx.x; ch < kChunks; ch += kWmmaThreads) {
    const int r = ch / kChunksPerRow;
    const int cc = (ch % kChunksPerRow) * 8;
    const int64_t t = t0 + r;
    const int64_t c = c0 + cc;
    T* dst = &s[r][cc];
    if (t < Tlen && vec && c + 8 <= C) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src + (b * Tlen + t) * C + c));
    } else {
      const T* row = src + (b * Tlen + t) * C;
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = (t < Tlen && c + j < C) ? row[c + j] : zero_value<T>();
    }
  }
}

template <typename T, int TK>
__global__ void __launch_bounds__(kWmmaThreads)
    linear_sq_grad_wmma_kernel(float* __restrict__ out, const T* __restrict__ g, const T* __restrict__ x, int64_t B,
                               int64_t Tlen, int64_t O, int64_t I, int64_t tiles_i, int64_t b_chunk) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  static_assert(TK % 16 == 0, "TK must be a multiple of the WMMA k = 16");
  __shared__ __align__(128) T sG[TK][kWmmaLd];
  __shared__ __align__(128) T sX[TK][kWmmaLd];
  __shared__ __align__(128) float sOut[kWmmaThreads / 32][16 * 16];

  const int64_t o0 = static_cast<int64_t>(blockIdx.x / tiles_i) * kWmmaTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % tiles_i) * kWmmaTile;
  const int64_t b_begin = static_cast<int64_t>(blockIdx.y) * b_chunk;
  const int64_t b_end = b_begin + b_chunk < B ? b_begin + b_chunk : B;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // warp's sub-tile inside the block tile
  // 16-byte chunks: whole rows are multiples of 8 elements and the base is aligned.
  const bool vec_g = (O % 8 == 0) && (reinterpret_cast<uintptr_t>(g) % 16 == 0);
  const bool vec_x = (I % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> sq[2][2], acc[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(sq[r][c], 0.f);

  for (int64_t b = b_begin; b < b_end; ++b) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[r][c], 0.f);
    for (int64_t t0 = 0; t0 < Tlen; t0 += TK) {
      stage_tile16<T, TK>(sG, g, b, t0, Tlen, o0, O, vec_g);
      stage_tile16<T, TK>(sX, x, b, t0, Tlen, i0, I, vec_x);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < TK; kk += 16) {
        // A = G^T (o x t): element (m = o, k = t) sits at sG[k][m], i.e. column-major with ld kWmmaLd.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) wmma::load_matrix_sync(a[r], &sG[kk][wm + 16 * r], kWmmaLd);
#pragma unroll
        for (int c = 0; c < 2; ++c) wmma::load_matrix_sync(bf[c], &sX[kk][wn + 16 * c], kWmmaLd);
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int c = 0; c < 2; ++c) wmma::mma_sync(acc[r][c], a[r], bf[c], acc[r][c]);
      }
      __syncthreads();  // before the next stage overwrites sG / sX
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 2; ++c)
#pragma unroll
        for (int e = 0; e < acc[r][c].num_elements; ++e) sq[r][c].x[e] += acc[r][c].x[e] * acc[r][c].x[e];
  }

  // Fragment layout is opaque: go through a per-warp 16x16 scratch to write only in-bounds elements.
  const bool atomic = gridDim.y > 1;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      wmma::store_matrix_sync(sOut[warp], sq[r][c], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t o = o0 + wm + 16 * r + e / 16;
        const int64_t i = i0 + wn + 16 * c + e % 16;
        if (o < O && i < I) {
          float* dst = out + o * I + i;
          if (atomic)
            atomicAdd(dst, sOut[warp][e]);
          else
            *dst += sOut[warp][e];
        }
      }
      __syncwarp();
    }
  }
#else
  __trap();  // the launcher only picks this kernel on sm_80+
#endif
}

// ------------------------------------------------------------------------------------------------
// Linear, SIMT fp32. Block = 256 threads (16 x 16), tile 64 x 64, each thread a 4 x 4 micro-tile with
// stride 16 (rows ty + 16 r, columns tx + 16 c: conflict-free shared reads, coalesced writes).
// kSquareInputs (the T == 1 path): the reduction dim is all positions, inputs are squared while staged
// and the accumulator is not squared: sum_n g_n^2 x_n^2. Blocks then split the positions (grid.y).
// ------------------------------------------------------------------------------------------------

constexpr int kSimtTile = 64;
constexpr int kSimtK = 16;
constexpr int kSimtThreads = 256;

template <typename T, bool kSquareInputs>
__device__ __forceinline__ void stage_tile32(float (*s)[kSimtTile], const T* __restrict__ src, int64_t b, int64_t t0,
                                             int64_t t_end, int64_t Tlen, int64_t c0, int64_t C) {
  for (int e = threadIdx.x; e < kSimtK * kSimtTile; e += kSimtThreads) {
    const int r = e / kSimtTile, cc = e % kSimtTile;
    const int64_t t = t0 + r, c = c0 + cc;
    float v = 0.f;
    if (t < t_end && c < C) v = to_float(src[(b * Tlen + t) * C + c]);
    if (kSquareInputs) v *= v;
    s[r][cc] = v;
  }
}

template <typename T, bool kSquareInputs>
__global__ void __launch_bounds__(kSimtThreads, 2)
    linear_sq_grad_simt_kernel(float* __restrict__ out, const T* __restrict__ g, const T* __restrict__ x, int64_t B,
                               int64_t Tlen, int64_t O, int64_t I, int64_t tiles_i, int64_t chunk) {
  __shared__ float sG[kSimtK][kSimtTile];
  __shared__ float sX[kSimtK][kSimtTile];

  const int64_t o0 = static_cast<int64_t>(blockIdx.x / tiles_i) * kSimtTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % tiles_i) * kSimtTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // Normal mode: grid.y splits the examples. Square mode (B == 1): grid.y splits the positions.
  int64_t b_begin = 0, b_end = B, t_begin = 0, t_end = Tlen;
  if (kSquareInputs) {
    t_begin = static_cast<int64_t>(blockIdx.y) * chunk;
    t_end = t_begin + chunk < Tlen ? t_begin + chunk : Tlen;
  } else {
    b_begin = static_cast<int64_t>(blockIdx.y) * chunk;
    b_end = b_begin + chunk < B ? b_begin + chunk : B;
  }

  float sq[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) sq[r][c] = 0.f;

  for (int64_t b = b_begin; b < b_end; ++b) {
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kSimtK) {
      stage_tile32<T, kSquareInputs>(sG, g, b, t0, t_end, Tlen, o0, O);
      stage_tile32<T, kSquareInputs>(sX, x, b, t0, t_end, Tlen, i0, I);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kSimtK; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) av[r] = sG[k][ty + 16 * r];
#pragma unroll
        for (int c = 0; c < 4; ++c) bv[c] = sX[k][tx + 16 * c];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) sq[r][c] = kSquareInputs ? sq[r][c] + acc[r][c] : fmaf(acc[r][c], acc[r][c], sq[r][c]);
  }

  const bool atomic = gridDim.y > 1;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t o = o0 + ty + 16 * r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = i0 + tx + 16 * c;
      if (o < O && i < I) {
        float* dst = out + o * I + i;
        if (atomic)
          atomicAdd(dst, sq[r][c]);
        else
          *dst += sq[r][c];
      }
    }
  }
}

template <typename T>
cudaError_t launch_linear_simt(const LinearSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  const T* g = static_cast<const T*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  int64_t tiles_i = 0;
  const int64_t tiles = out_tiles(p, kSimtTile, &tiles_i);
  if (tiles < 0) return cudaErrorInvalidValue;
  const int64_t target = 4LL * dev.sms;  // ~2 waves of 256-thread blocks
  int64_t splits = 1;
  if (p.T == 1) {
    // (B, 1, F) viewed as one example of B positions.
    const int64_t chunk = split_chunk(p.B, tiles, target, kSimtK, &splits);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
    linear_sq_grad_simt_kernel<T, true><<<grid, kSimtThreads, 0, stream>>>(p.out, g, x, 1, p.B, p.O, p.I, tiles_i, chunk);
  } else {
    const int64_t chunk = split_chunk(p.B, tiles, target, 1, &splits);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
    linear_sq_grad_simt_kernel<T, false><<<grid, kSimtThreads, 0, stream>>>(p.out, g, x, p.B, p.T, p.O, p.I, tiles_i, chunk);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_linear_wmma(const LinearSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  const T* g = static_cast<const T*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  int64_t tiles_i = 0;
  const int64_t tiles = out_tiles(p, kWmmaTile, &tiles_i);
  if (tiles < 0) return cudaErrorInvalidValue;
  int64_t splits = 1;
  const int64_t chunk = split_chunk(p.B, tiles, 8LL * dev.sms, 1, &splits);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  if (p.T <= 16)  // short sequences: the smallest k step wastes the least zero padding
    linear_sq_grad_wmma_kernel<T, 16><<<grid, kWmmaThreads, 0, stream>>>(p.out, g, x, p.B, p.T, p.O, p.I, tiles_i, chunk);
  else
    linear_sq_grad_wmma_kernel<T, 32><<<grid, kWmmaThreads, 0, stream>>>(p.out, g, x, p.B, p.T, p.O, p.I, tiles_i, chunk);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Norm / bias. Block = 32 columns x 8 warps; warp w sums positions t = w, w + 8, ...
// ------------------------------------------------------------------------------------------------

constexpr int kNormCols = 32;
constexpr int kNormRows = 8;

template <typename T>
__global__ void __launch_bounds__(kNormCols* kNormRows)
    norm_sq_grad_kernel(float* __restrict__ out, const T* __restrict__ g, const T* __restrict__ x, int64_t B,
                        int64_t Tlen, int64_t D, int64_t b_chunk) {
  __shared__ float part[kNormRows][kNormCols + 1];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kNormCols + lane;
  const int64_t b_begin = static_cast<int64_t>(blockIdx.y) * b_chunk;
  const int64_t b_end = b_begin + b_chunk < B ? b_begin + b_chunk : B;
  const bool has_x = x != nullptr;
  float total = 0.f;
  for (int64_t b = b_begin; b < b_end; ++b) {
    float s = 0.f;
    if (d < D) {
      for (int64_t t = row; t < Tlen; t += kNormRows) {
        const int64_t off = (b * Tlen + t) * D + d;
        s += has_x ? to_float(g[off]) * to_float(x[off]) : to_float(g[off]);
      }
    }
    part[row][lane] = s;
    __syncthreads();
    if (row == 0) {
      float S = 0.f;
#pragma unroll
      for (int r = 0; r < kNormRows; ++r) S += part[r][lane];
      total = fmaf(S, S, total);
    }
    __syncthreads();
  }
  if (row == 0 && d < D) {
    if (gridDim.y > 1)
      atomicAdd(out + d, total);
    else
      out[d] += total;
  }
}

template <typename T>
cudaError_t launch_norm(const NormSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  const int64_t tiles = ceil_div(p.D, kNormCols);
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
  int64_t splits = 1;
  const int64_t chunk = split_chunk(p.B, tiles, 4LL * dev.sms, 1, &splits);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  const dim3 block(kNormCols, kNormRows);
  norm_sq_grad_kernel<T><<<grid, block, 0, stream>>>(p.out, static_cast<const T*>(p.g), static_cast<const T*>(p.x),
                                                     p.B, p.T, p.D, chunk);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// LayerNorm: the row statistics (one thread per row, two passes over the row in fp32), then the norm kernel's layout
// (32 columns x 8 warps over t) with x_hat made in registers and the weight and bias sums taken together.
// ------------------------------------------------------------------------------------------------

constexpr int kStatRowsPerBlock = 128;  // one thread per row (simple; the rows of a batch fill the GPU)

template <typename T>
__global__ void __launch_bounds__(kStatRowsPerBlock)
    layer_norm_stats_kernel(const T* __restrict__ x, float* __restrict__ mean, float* __restrict__ rstd, int64_t rows,
                            int64_t D, float eps) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kStatRowsPerBlock + threadIdx.x;
  if (r >= rows) return;
  const T* row = x + r * D;
  float sum = 0.f;
  for (int64_t d = 0; d < D; ++d) sum += to_float(row[d]);
  const float mu = sum / static_cast<float>(D);
  float sq = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float c = to_float(row[d]) - mu;
    sq = fmaf(c, c, sq);
  }
  mean[r] = mu;
  rstd[r] = 1.0f / sqrtf(sq / static_cast<float>(D) + eps);
}

template <typename T>
__global__ void __launch_bounds__(kNormCols* kNormRows)
    layer_norm_sq_grad_kernel(float* __restrict__ wout, float* __restrict__ bout, const T* __restrict__ g,
                              const T* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,
                              int64_t B, int64_t Tlen, int64_t D, int64_t b_chunk) {
  __shared__ float part_w[kNormRows][kNormCols + 1];
  __shared__ float part_b[kNormRows][kNormCols + 1];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kNormCols + lane;
  const int64_t b_begin = static_cast<int64_t>(blockIdx.y) * b_chunk;
  const int64_t b_end = b_begin + b_chunk < B ? b_begin + b_chunk : B;
  float total_w = 0.f, total_b = 0.f;
  for (int64_t b = b_begin; b < b_end; ++b) {
    float sw = 0.f, sb = 0.f;
    if (d < D) {
      for (int64_t t = row; t < Tlen; t += kNormRows) {
        const int64_t r = b * Tlen + t;
        const float gv = to_float(g[r * D + d]);
        sw = fmaf(gv, (to_float(x[r * D + d]) - mean[r]) * rstd[r], sw);
        sb += gv;
      }
    }
    part_w[row][lane] = sw;
    part_b[row][lane] = sb;
    __syncthreads();
    if (row == 0) {
      float SW = 0.f, SB = 0.f;
#pragma unroll
      for (int k = 0; k < kNormRows; ++k) {
        SW += part_w[k][lane];
        SB += part_b[k][lane];
      }
      total_w = fmaf(SW, SW, total_w);
      total_b = fmaf(SB, SB, total_b);
    }
    __syncthreads();
  }
  if (row == 0 && d < D) {
    const bool split = gridDim.y > 1;
    if (wout != nullptr) {
      if (split)
        atomicAdd(wout + d, total_w);
      else
        wout[d] += total_w;
    }
    if (bout != nullptr) {
      if (split)
        atomicAdd(bout + d, total_b);
      else
        bout[d] += total_b;
    }
  }
}

template <typename T>
cudaError_t launch_layer_norm(const LayerNormSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  const int64_t rows = p.B * p.T;
  const int64_t stat_blocks = ceil_div(rows, kStatRowsPerBlock);
  const int64_t tiles = ceil_div(p.D, kNormCols);
  if (stat_blocks > 0x7fffffff || tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(p.x);
  const dim3 stat_grid(static_cast<unsigned>(stat_blocks)), stat_block(kStatRowsPerBlock);
  layer_norm_stats_kernel<T><<<stat_grid, stat_block, 0, stream>>>(x, p.mean, p.rstd, rows, p.D, p.eps);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  int64_t splits = 1;
  const int64_t chunk = split_chunk(p.B, tiles, 4LL * dev.sms, 1, &splits);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  const dim3 block(kNormCols, kNormRows);
  layer_norm_sq_grad_kernel<T><<<grid, block, 0, stream>>>(
      p.weight_out, p.bias_out, static_cast<const T*>(p.g), x, p.mean, p.rstd, p.B, p.T, p.D, chunk);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Embedding. Block = 128 columns of one example's chunk of kEmbChunk sorted positions. A run of equal
// tokens is handled by the block whose chunk holds its first position (it may read past the chunk).
// ------------------------------------------------------------------------------------------------

constexpr int kEmbThreads = 128;
constexpr int64_t kEmbChunk = 32;

template <typename T>
__global__ void __launch_bounds__(kEmbThreads)
    embedding_sq_grad_kernel(float* __restrict__ out, const T* __restrict__ g, const int64_t* __restrict__ sorted_idx,
                             const int64_t* __restrict__ perm, int64_t Tlen, int64_t D, int64_t V,
                             int64_t padding_idx, int64_t chunks_per_example) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) / chunks_per_example;
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) % chunks_per_example) * kEmbChunk;
  const int64_t k1 = k0 + kEmbChunk < Tlen ? k0 + kEmbChunk : Tlen;
  const int64_t* srow = sorted_idx + b * Tlen;
  const int64_t* prow = perm + b * Tlen;
  const T* gb = g + b * Tlen * D;
  // Range check: each row is sorted, so its first and last entries bound it (one block per example does it).
  if (k0 == 0 && blockIdx.y == 0 && threadIdx.x == 0 && Tlen > 0 && (srow[0] < 0 || srow[Tlen - 1] >= V)) {
    printf("fastsel: embedding index out of range [0, %lld) in example %lld\n", static_cast<long long>(V),
           static_cast<long long>(b));
    __trap();
  }
  // Skip the rest of a run that started in an earlier chunk (uniform across the block).
  int64_t first = k0;
  while (first < k1 && first > 0 && srow[first - 1] == srow[first]) ++first;

  for (int64_t d0 = static_cast<int64_t>(blockIdx.y) * kEmbThreads; d0 < D;
       d0 += static_cast<int64_t>(gridDim.y) * kEmbThreads) {
    const int64_t d = d0 + threadIdx.x;
    int64_t k = first;
    while (k < k1) {
      const int64_t v = srow[k];
      int64_t e = k;
      if (v == padding_idx || v < 0 || v >= V) {  // out of range: the check above traps  // nn.Embedding never updates its padding row
        while (e < Tlen && srow[e] == v) ++e;
      } else {
        float s = 0.f;
        do {
          if (d < D) s += to_float(gb[prow[e] * D + d]);
          ++e;
        } while (e < Tlen && srow[e] == v);
        if (d < D) atomicAdd(out + v * D + d, s * s);
      }
      k = e;
    }
  }
}

template <typename T>
cudaError_t launch_embedding(const EmbeddingSqGradParams& p, cudaStream_t stream) {
  const int64_t chunks = ceil_div(p.T, kEmbChunk);
  const int64_t blocks = p.B * chunks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  int64_t col_blocks = ceil_div(p.D, kEmbThreads);
  if (col_blocks > 65535) col_blocks = 65535;  // the kernel loops over the remaining columns
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(col_blocks));
  embedding_sq_grad_kernel<T><<<grid, kEmbThreads, 0, stream>>>(p.out, static_cast<const T*>(p.g), p.sorted_idx, p.perm,
                                                                p.T, p.D, p.V, p.padding_idx, chunks);
  return cudaGetLastError();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

// Whether the WMMA kernels have sm_80+ machine code or PTX in this build (a PTX-only build for an older
// arch would trap in them). Asked once per process: the answer is a property of the binary.
template <typename T>
bool wmma_code_loaded() {
  static std::atomic<int> state{-1};  // -1 unknown, 0 no, 1 yes
  int s = state.load(std::memory_order_acquire);
  if (s < 0) {
    cudaFuncAttributes fa;
    s = (cudaFuncGetAttributes(&fa, linear_sq_grad_wmma_kernel<T, 32>) == cudaSuccess && fa.ptxVersion >= 80) ? 1 : 0;
    state.store(s, std::memory_order_release);
  }
  return s == 1;
}

template <typename T>
cudaError_t launch_linear_half(const LinearSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  // T == 1 is a single GEMM of squares (SIMT, exact fp32 squares) for every variant.
  if (p.T <= 1 || dev.major < 8 || !wmma_code_loaded<T>()) return launch_linear_simt<T>(p, dev, stream);
  // Auto: the pipelined kernel where it applies. Measured on an H200 (bench/gpu_check_h200.json) it beat the
  // 64x64 WMMA kernel on every bf16 shape timed (1.2-2.8x); the choice between it and cuBLAS batched GEMMs
  // is the Python side's (fastsel/backend_table.json).
  if (p.variant != LinearVariant::Wmma && linear_pipelined_eligible(p, dev)) return launch_linear_pipelined(p, dev, stream);
  return launch_linear_wmma<T>(p, dev, stream);
}

template <typename T>
struct ElemTag {
  using type = T;
};

cudaError_t launch_linear_sq_grad(const LinearSqGradParams& p, cudaStream_t stream) {
  if (p.B <= 0 || p.T <= 0 || p.O <= 0 || p.I <= 0) return cudaSuccess;
  DeviceInfo dev;
  const cudaError_t err = device_info(p.device, &dev);
  if (err != cudaSuccess) return err;
  switch (p.dtype) {
    case ElemType::F32:  // fp32 stays exact fp32 (SIMT) in every variant: no TF32 rounding of the Fisher
      return launch_linear_simt<float>(p, dev, stream);
    case ElemType::BF16:
      return launch_linear_half<__nv_bfloat16>(p, dev, stream);
    case ElemType::F16:
      return launch_linear_half<__half>(p, dev, stream);
  }
  return cudaErrorInvalidValue;
}

// The norm-shaped launchers (B, T, D; a DeviceInfo), instantiated for the call's element type.
template <typename Params, typename Launch>
cudaError_t launch_by_elem_type(const Params& p, cudaStream_t stream, Launch launch) {
  if (p.B <= 0 || p.T <= 0 || p.D <= 0) return cudaSuccess;
  DeviceInfo dev;
  const cudaError_t err = device_info(p.device, &dev);
  if (err != cudaSuccess) return err;
  switch (p.dtype) {
    case ElemType::F32:
      return launch(ElemTag<float>{}, dev);
    case ElemType::BF16:
      return launch(ElemTag<__nv_bfloat16>{}, dev);
    case ElemType::F16:
      return launch(ElemTag<__half>{}, dev);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_norm_sq_grad(const NormSqGradParams& p, cudaStream_t stream) {
  return launch_by_elem_type(p, stream, [&](auto tag, const DeviceInfo& dev) {
    return launch_norm<typename decltype(tag)::type>(p, dev, stream);
  });
}

cudaError_t launch_layer_norm_sq_grad(const LayerNormSqGradParams& p, cudaStream_t stream) {
  return launch_by_elem_type(p, stream, [&](auto tag, const DeviceInfo& dev) {
    return launch_layer_norm<typename decltype(tag)::type>(p, dev, stream);
  });
}

cudaError_t launch_embedding_sq_grad(const EmbeddingSqGradParams& p, cudaStream_t stream) {
  if (p.B <= 0 || p.T <= 0 || p.D <= 0) return cudaSuccess;
  switch (p.dtype) {
    case ElemType::F32:
      return launch_embedding<float>(p, stream);
    case ElemType::BF16:
      return launch_embedding<__nv_bfloat16>(p, stream);
    case ElemType::F16:
      return launch_embedding<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastsel
